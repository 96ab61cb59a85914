"""pg_dump/pg_restore keeps every row (nothing double-encrypted), and no secret reaches the log."""
import subprocess

import psycopg

from vetassist_testing import BIN, installed_cluster


def test_dump_and_restore_into_a_second_database(cluster, su):
    su.execute("""
        INSERT INTO vetassist_auth.users (id, va_icn_encrypted, va_icn_hash, email_encrypted, email_hash)
        SELECT id, vetassist_auth.seal_phi_text('ICN' || n, 'users.va_icn:' || id), vetassist_auth.field_hash('ICN' || n, 'va_icn'),
               vetassist_auth.seal_phi_text('vet' || n || '@example.org', 'users.email:' || id), vetassist_auth.field_hash('vet' || n || '@example.org', 'email')
        FROM (SELECT gen_random_uuid() AS id, n FROM generate_series(1, 50) n) s""")
    before = su.execute("SELECT id, va_icn_encrypted, email_hash FROM vetassist_auth.users ORDER BY id").fetchall()
    keys_before = su.execute("SELECT key_id, purpose, status, wrapped_key FROM vetassist_auth.keys ORDER BY key_id").fetchall()
    dump = cluster.dir / "vetassist.dump"
    cluster.as_postgres(str(BIN / "pg_dump"), "-Fc", "-h", str(cluster.dir), "-p", str(cluster.port), "-U", "postgres",
                        "-f", str(dump), "vetassist")
    cluster.psql("DROP DATABASE IF EXISTS restored")
    cluster.psql("CREATE DATABASE restored")
    cluster.as_postgres(str(BIN / "pg_restore"), "--exit-on-error", "-h", str(cluster.dir), "-p", str(cluster.port),
                        "-U", "postgres", "-d", "restored", str(dump))
    with cluster.connect("restored") as restored:
        after = restored.execute("SELECT id, va_icn_encrypted, email_hash FROM vetassist_auth.users ORDER BY id").fetchall()
        keys_after = restored.execute("SELECT key_id, purpose, status, wrapped_key FROM vetassist_auth.keys ORDER BY key_id").fetchall()
        assert after == before  # byte for byte: nothing re-encrypted
        assert keys_after == keys_before
        plain = restored.execute("""SELECT count(*) FROM vetassist_auth.users
                                    WHERE vetassist_auth.decrypt_text(va_icn_encrypted, 'users.va_icn:' || id) LIKE 'ICN%'""").fetchone()[0]
        assert plain == 50  # the rows inserted above (other tests' users share the database)
        # The key sequence was restored too: a new key does not reuse an id.
        new_id = restored.execute("SELECT vetassist_auth.rotate_key('phi')").fetchone()[0]
        assert new_id > max(k[0] for k in keys_before)
        ok = restored.execute("SELECT bool_and(ok) FROM vetassist_auth.verify_installation()").fetchone()[0]
        assert ok


SECRET_TOKEN = "eyJhbGciOiJSUzI1NiJ9.VA-ACCESS-TOKEN-e1f0c2d9"
SECRET_PARAM = "VA-REFRESH-TOKEN-77aa0b1c3d"


def test_no_secret_in_the_server_log_even_with_full_statement_logging():
    with installed_cluster("logs", "log_statement = 'all'",
                           "log_min_duration_statement = 0", "log_min_error_statement = 'debug5'",
                           "log_parameter_max_length = -1", "log_parameter_max_length_on_error = -1",
                           "log_error_verbosity = 'verbose'") as c:
        with c.connect("vetassist", "app_user") as conn:
            # A literal (simple protocol) and a bind parameter (extended protocol).
            ct = conn.execute(f"SELECT vetassist_auth.encrypt_text('{SECRET_TOKEN}', 'va')").fetchone()[0]
            conn.execute("SELECT vetassist_auth.encrypt_text(%s, 'va')", (SECRET_PARAM,))
            conn.execute("SELECT vetassist_auth.field_hash(%s, 'email')", (SECRET_PARAM,))
            # Errors: the failing statement carries the secret too.
            for sql, params in ((f"SELECT vetassist_auth.decrypt_text('\\x00'::bytea, '{SECRET_TOKEN}')", None),
                                ("SELECT vetassist_auth.decrypt_text(%s, %s)", (ct, SECRET_PARAM)),
                                ("SELECT vetassist_auth.field_hash(%s, 'ip')", (SECRET_PARAM,))):
                try:
                    conn.execute(sql, params)
                except psycopg.Error:
                    pass
            # Unrelated statements are still logged as usual.
            conn.execute("SELECT 'harmless-marker-4242'")
        log = c.log()
        master = c.key_file.read_text().strip() if c.key_file.exists() else None
        assert "harmless-marker-4242" in log
        assert "redacted by vetassist_auth" in log
        assert SECRET_TOKEN not in log
        assert SECRET_PARAM not in log
        if master is None:
            master = subprocess.run(["sudo", "-u", "postgres", "cat", str(c.key_file)], capture_output=True, text=True).stdout.strip()
        assert len(master) == 64 and master not in log
