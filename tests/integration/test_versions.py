"""Moving between PostgreSQL versions: a dump of a PostgreSQL 15 database restores into the version
under test (16, 17, 18) with every value decrypting, the session and TOTP carrying on, and the
audit chain verifying. Runs in `make test`'s pass over each other version."""
from pathlib import Path

import pytest

from vetassist_testing import BIN, PG_MAJOR, Cluster, authenticator_code, install, seal_all

DEBIAN_15 = Path("/usr/lib/postgresql/15/bin/pg_config")

pytestmark = pytest.mark.skipif(PG_MAJOR == 15 or not DEBIAN_15.exists(),
                                reason="needs PostgreSQL 15 and another version under test")


def test_a_dump_of_15_restores_with_everything_decrypting_and_the_chain_verifying():
    old = Cluster("from15", "shared_preload_libraries = 'vetassist_auth'", pg_config=str(DEBIAN_15))
    new = None
    try:
        install(old)
        with old.connect("vetassist", "app_user") as app:
            uid = app.execute("SELECT vetassist_auth.upsert_va_user('1012667145V762150', 'veteran', "
                              "'moved@example.org', 'Ana', 'Ruiz')").fetchone()[0]
            app.execute("SELECT vetassist_auth.store_va_tokens(%s, 'va-access-moved', 'va-refresh-moved', "
                        "now() + interval '1 hour')", (uid,))
            app.execute("SELECT vetassist_auth.create_session(%s, 'jti-moved', now() + interval '8 hours')", (uid,))
            uri = app.execute("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uid,)).fetchone()[0]
            assert app.execute("SELECT vetassist_auth.mfa_confirm_totp(%s, %s)", (uid, authenticator_code(uri))).fetchone()[0]
            app.execute("SELECT * FROM vetassist_auth.user_profile(%s)", (uid,))
        with old.connect("vetassist", "admin_user") as admin:
            seal_all(admin)
            head = admin.execute("SELECT seq, hash FROM vetassist_auth.audit_chain_head()").fetchone()
        dump = old.dir / "moved.dump"
        # The newer pg_dump reads the older server.
        old.as_postgres(str(BIN / "pg_dump"), "-Fc", "-h", str(old.dir), "-p", str(old.port), "-U", "postgres",
                        "-f", str(dump), "vetassist")

        new = Cluster("to-new", "shared_preload_libraries = 'vetassist_auth'")
        # The same master key: copy the old cluster's key file over the new one's, and reload.
        new.as_postgres("cp", str(old.key_file), str(new.key_file))
        with new.connect() as su:
            su.execute("SELECT pg_reload_conf()")
        for role in ("app_user", "admin_user", "auditor_user"):
            new.psql(f"CREATE ROLE {role} LOGIN")
        new.psql("CREATE DATABASE vetassist")
        new.as_postgres(str(BIN / "pg_restore"), "--exit-on-error", "-h", str(new.dir), "-p", str(new.port),
                        "-U", "postgres", "-d", "vetassist", str(dump))
        new.psql("GRANT vetassist_app TO app_user; GRANT vetassist_admin TO admin_user; "
                 "GRANT vetassist_auditor TO auditor_user", "vetassist")

        with new.connect("vetassist") as su:
            assert su.execute("SELECT current_setting('server_version_num')::int / 10000").fetchone()[0] == PG_MAJOR
        with new.connect("vetassist", "app_user") as app:
            profile = app.execute("SELECT va_icn, email, first_name FROM vetassist_auth.user_profile(%s)", (uid,)).fetchone()
            assert profile == ("1012667145V762150", "moved@example.org", "Ana")
            assert app.execute("SELECT vetassist_auth.find_user_by_icn('1012667145V762150')").fetchone()[0] == uid
            assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0] == "va-access-moved"
            assert app.execute("SELECT vetassist_auth.touch_session('jti-moved')::text").fetchone()[0] == "ACTIVE"
            assert app.execute("SELECT vetassist_auth.mfa_verify('jti-moved', %s)", (authenticator_code(uri, 1),)).fetchone()[0]
        with new.connect("vetassist", "admin_user") as admin:
            seal_all(admin)
        with new.connect("vetassist", "auditor_user") as auditor:
            ok, _, bad, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain(%s, %s)", head).fetchone()
            assert (ok, bad, problem) == (True, None, None)
    finally:
        old.stop()
        if new is not None:
            new.stop()
