"""Master key configuration (docs/operations.md, "Keys: setup, rotation, master key change"): missing, malformed, hidden, changed, rewrapped."""
import concurrent.futures

import psycopg
import pytest

from vetassist_testing import expect_sqlstate, installed_cluster


@pytest.fixture(scope="module")
def keyless():
    """A cluster whose master key settings we change during the tests."""
    with installed_cluster("keys") as c:
        yield c


def test_no_master_key_is_55000_with_a_hint_naming_both_settings(keyless):
    keyless.set_conf("vetassist_auth.master_key_file", "")
    with keyless.connect("vetassist", "app_user") as conn:
        for sql in ("SELECT vetassist_auth.encrypt_text('x', 'c')",
                    "SELECT vetassist_auth.field_hash('x', 'email')",
                    "SELECT vetassist_auth.decrypt_text('\\x0100000001000000000000000000000000000000000000000000000000000000000000'::bytea, 'c')"):
            hint = expect_sqlstate("55000", conn, sql).diag.message_hint
            assert "vetassist_auth.master_key_file" in hint and "vetassist_auth.master_key" in hint


def test_malformed_inline_key_is_55000_and_never_echoed(keyless):
    bad = "zz" + "ab" * 31
    keyless.set_conf("vetassist_auth.master_key", f"{bad}")
    with keyless.connect("vetassist", "app_user") as conn:
        diag = expect_sqlstate("55000", conn, "SELECT vetassist_auth.encrypt_text('x', 'c')").diag
    message, hint = diag.message_primary, diag.message_hint
    assert "malformed" in message
    assert bad not in (message + (hint or ""))
    assert bad not in keyless.log()


def test_unreadable_key_file_is_55000(keyless):
    keyless.set_conf("vetassist_auth.master_key_file", "/nonexistent/master.key")
    with keyless.connect("vetassist", "app_user") as conn:
        hint = expect_sqlstate("55000", conn, "SELECT vetassist_auth.encrypt_text('x', 'c')").diag.message_hint
    assert "master_key_file" in hint


def test_inline_key_is_hidden_from_everyone_but_superusers(keyless):
    secret = "5e" * 32
    keyless.set_conf("vetassist_auth.master_key_file", "")
    keyless.set_conf("vetassist_auth.master_key", f"{secret}")
    with keyless.connect("vetassist", "app_user") as conn:
        assert conn.execute("SELECT vetassist_auth.decrypt_text(vetassist_auth.encrypt_text('ok', 'c'), 'c')").fetchone()[0] == "ok"
        expect_sqlstate("42501", conn, "SHOW vetassist_auth.master_key")
        rows = conn.execute("SELECT name, setting FROM pg_settings WHERE name LIKE 'vetassist_auth.%'").fetchall()
        assert all(secret not in (setting or "") for _, setting in rows)
        assert conn.execute("SELECT count(*) FROM pg_settings WHERE setting LIKE %s", (f"%{secret}%",)).fetchone()[0] == 0
        # A session cannot override a SIGHUP setting.
        with pytest.raises(psycopg.Error) as refused:
            conn.execute("SET vetassist_auth.master_key = '" + "00" * 32 + "'")
        assert refused.value.sqlstate in ("55P02", "42501")  # which check comes first varies by version
    with keyless.connect("vetassist", "outsider") as conn:
        expect_sqlstate("42501", conn, "SHOW vetassist_auth.master_key")
    assert secret not in keyless.log()


def test_changed_master_key_needs_rewrap_then_everything_reads(keyless):
    old, new = "11" * 32, "22" * 32
    old_file = keyless.dir / "old.key"
    keyless.as_postgres("bash", "-c", f"umask 077; echo {old} > '{old_file}'")
    keyless.set_conf("vetassist_auth.master_key", f"{old}")
    with keyless.connect("vetassist") as su:
        su.execute("DELETE FROM vetassist_auth.keys")  # start from keys wrapped under `old`
        ct = su.execute("SELECT vetassist_auth.encrypt_text('survives', 'c')").fetchone()[0]
        h = su.execute("SELECT vetassist_auth.field_hash('a@b.c', 'email')").fetchone()[0]
    keyless.set_conf("vetassist_auth.master_key", f"{new}")
    with keyless.connect("vetassist") as su:
        assert "rewrap_keys" in expect_sqlstate("XX001", su, "SELECT vetassist_auth.decrypt_text(%s, 'c')",
                                                (ct,)).diag.message_hint
    with keyless.connect("vetassist", "admin_user") as admin:
        # vetassist_admin alone may not read server files.
        expect_sqlstate("42501", admin, "SELECT vetassist_auth.rewrap_keys(%s)", (str(old_file),))
    keyless.psql("GRANT pg_read_server_files TO admin_user")
    with keyless.connect("vetassist", "admin_user") as admin:
        expect_sqlstate("55000", admin, "SELECT vetassist_auth.rewrap_keys(%s)", (str(keyless.dir / "nope.key"),))
        assert admin.execute("SELECT vetassist_auth.rewrap_keys(%s)", (str(old_file),)).fetchone()[0] == 2  # phi and hash
        assert admin.execute("SELECT vetassist_auth.rewrap_keys(%s)", (str(old_file),)).fetchone()[0] == 0
    with keyless.connect("vetassist", "app_user") as conn:
        assert conn.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "survives"
        assert conn.execute("SELECT vetassist_auth.field_hash('A@B.C', 'email')").fetchone()[0] == h
    keyless.psql("REVOKE pg_read_server_files FROM admin_user")


def test_first_use_creates_one_key_per_purpose_under_concurrency():
    with installed_cluster("keyrace", "max_connections = 40") as c:

        def first_use(i):
            with c.connect("vetassist", "app_user") as conn:
                ct = conn.execute("SELECT vetassist_auth.encrypt_text(%s, 'c')", (f"v{i}",)).fetchone()[0]
                conn.execute("SELECT vetassist_auth.field_hash('x', 'email')")
                return conn.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0]

        with concurrent.futures.ThreadPoolExecutor(16) as pool:
            assert sorted(pool.map(first_use, range(16))) == sorted(f"v{i}" for i in range(16))
        with c.connect("vetassist") as su:
            rows = su.execute("SELECT purpose, count(*) FROM vetassist_auth.keys WHERE status = 'active' GROUP BY 1").fetchall()
        assert dict(rows) == {"phi": 1, "hash": 1}


def test_rotation_in_one_backend_is_seen_by_another(cluster):
    with cluster.connect("vetassist", "app_user") as a, cluster.connect("vetassist", "admin_user") as admin:
        # Bytes 1..5 of the envelope are the key id.
        key_of = "SELECT get_byte(c, 1) << 24 | get_byte(c, 2) << 16 | get_byte(c, 3) << 8 | get_byte(c, 4) FROM (SELECT vetassist_auth.encrypt_text('x', 'c') AS c) s"
        before = a.execute(key_of).fetchone()[0]
        rotated = admin.execute("SELECT vetassist_auth.rotate_key('phi')").fetchone()[0]
        after = a.execute(key_of).fetchone()[0]
        assert before != rotated and after == rotated


def test_reading_keys_takes_no_transaction_id(cluster):
    """A look-up (field_hashes, the first key read of a session) runs read-only queries only: a
    transaction id would make it fail on a hot standby, and cost one per call."""
    with cluster.connect("vetassist", "app_user") as app:
        app.execute("SELECT vetassist_auth.field_hash('x', 'email')")  # the hash key exists
    with cluster.connect("vetassist", "app_user", autocommit=False) as app:
        app.execute("SELECT vetassist_auth.field_hashes('x', 'email')")
        assert app.execute("SELECT pg_current_xact_id_if_assigned()").fetchone()[0] is None
