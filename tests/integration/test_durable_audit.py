"""Every PHI or token disclosure and every failed authentication is in the audit
log whatever becomes of the caller's transaction: ROLLBACK, ROLLBACK TO SAVEPOINT, an error, a
cancelled statement, a backend that exits. Each test is an attack that left no row on 0.1.2."""
import threading
import time

import psycopg
import pytest

from vetassist_testing import BIN, authenticator_code, expect_sqlstate, install, installed_cluster, wait_for, wrong_code

MFA_LOCKED = "28000"


def rows(su, uid, category, event_type, outcome=None):
    return su.execute("""SELECT count(*) FROM vetassist_auth.audit_log
                         WHERE subject_user_id = %s AND category = %s AND event_type = %s
                           AND (%s::text IS NULL OR outcome = %s)""",
                      (uid, category, event_type, outcome, outcome)).fetchone()[0]


def veteran(app, icn, tokens=True):
    uid = app.execute("SELECT vetassist_auth.upsert_va_user(%s, 'veteran', %s, 'Rosa', 'Parks')",
                      (icn, f"{icn.lower()}@example.org")).fetchone()[0]
    if tokens:
        app.execute("SELECT vetassist_auth.store_va_tokens(%s, 'VA-ACCESS-' || %s, 'VA-REFRESH-' || %s, now() + interval '1 hour')",
                    (uid, icn, icn))
    return uid


def test_disclosures_rolled_back_are_still_recorded(cluster, su):
    with cluster.connect("vetassist", "app_user", autocommit=False) as app:
        uid = veteran(app, "7000000001V1")
        app.commit()
        before = (rows(su, uid, "phi_access", "user_profile_read"), rows(su, uid, "auth", "va_access_token_read"),
                  rows(su, uid, "auth", "va_refresh_token_read"))
        profile = app.execute("SELECT email FROM vetassist_auth.user_profile(%s)", (uid,)).fetchone()
        access = app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0]
        refresh = app.execute("SELECT vetassist_auth.va_refresh_token(%s)", (uid,)).fetchone()[0]
        assert profile[0] == "7000000001v1@example.org" and access.startswith("VA-ACCESS") and refresh.startswith("VA-REFRESH")
        app.rollback()
    after = (rows(su, uid, "phi_access", "user_profile_read"), rows(su, uid, "auth", "va_access_token_read"),
             rows(su, uid, "auth", "va_refresh_token_read"))
    assert after == tuple(n + 1 for n in before)


def test_a_disclosure_undone_by_rollback_to_savepoint_is_recorded(cluster, su):
    with cluster.connect("vetassist", "app_user") as app:
        uid = veteran(app, "7000000002V1")
        with app.transaction():
            try:
                with app.transaction():  # SAVEPOINT ... ROLLBACK TO SAVEPOINT
                    app.execute("SELECT * FROM vetassist_auth.user_profile(%s)", (uid,))
                    app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,))
                    raise RuntimeError("the application changes its mind")
            except RuntimeError:
                pass
            app.execute("SELECT 1")
    assert rows(su, uid, "phi_access", "user_profile_read") == 1
    assert rows(su, uid, "auth", "va_access_token_read") == 1


def test_a_disclosure_followed_by_an_error_is_recorded(cluster, su):
    with cluster.connect("vetassist", "app_user", autocommit=False) as app:
        uid = veteran(app, "7000000003V1")
        app.commit()
        app.execute("SELECT * FROM vetassist_auth.user_profile(%s)", (uid,))
        with pytest.raises(psycopg.errors.DivisionByZero):
            app.execute("SELECT 1 / 0")
        app.rollback()
    assert rows(su, uid, "phi_access", "user_profile_read") == 1


def test_a_cancelled_statement_and_a_terminated_backend_leave_their_rows(cluster, su):
    with cluster.connect("vetassist", "app_user") as app:
        uid = veteran(app, "7000000004V1")
        # Cancelled once the disclosure is on record (a fixed statement_timeout could fire before
        # the profile was read on a loaded machine), while the statement still runs.
        pid, outcome = app.info.backend_pid, []

        def read_then_sleep():
            try:
                app.execute("SELECT p.email, pg_sleep(60) FROM vetassist_auth.user_profile(%s) p", (uid,))
            except psycopg.Error as e:
                outcome.append(e)

        reader = threading.Thread(target=read_then_sleep)
        reader.start()
        wait_for("the disclosure on record", lambda: rows(su, uid, "phi_access", "user_profile_read"))
        su.execute("SELECT pg_cancel_backend(%s)", (pid,))
        reader.join()
        assert len(outcome) == 1 and isinstance(outcome[0], psycopg.errors.QueryCanceled), outcome
    assert rows(su, uid, "phi_access", "user_profile_read") == 1

    victim = cluster.connect("vetassist", "app_user", autocommit=False)
    victim.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,))
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    su.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    with pytest.raises(psycopg.OperationalError):
        victim.execute("SELECT 1")
    victim.close()
    assert rows(su, uid, "auth", "va_access_token_read") == 1


def mfa_session(cluster, app, su, icn, jti):
    uid = veteran(app, icn, tokens=False)
    uri = app.execute("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uid,)).fetchone()[0]
    assert app.execute("SELECT vetassist_auth.mfa_confirm_totp(%s, %s)", (uid, authenticator_code(uri))).fetchone()[0]
    app.execute("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 hour')", (uid, jti))
    return uid, uri


def test_fifty_rolled_back_mfa_failures_lock_the_user_out(cluster, su):
    with cluster.connect("vetassist", "app_user") as app:
        uid, uri = mfa_session(cluster, app, su, "7000000006V1", "jti-mfa-rollback")
        outcomes, wrong = [], wrong_code(uri, "000000")
        for _ in range(50):
            try:
                with app.transaction():
                    ok = app.execute("SELECT vetassist_auth.mfa_verify('jti-mfa-rollback', %s)", (wrong,)).fetchone()[0]
                    outcomes.append(ok)
                    raise psycopg.Rollback()
            except psycopg.errors.InvalidAuthorizationSpecification:
                outcomes.append(MFA_LOCKED)
        # mfa_max_failures (5) failures, then locked out for every later attempt.
        assert outcomes == [False] * 5 + [MFA_LOCKED] * 45
        # Even the right code is refused while the lock-out lasts.
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
            app.execute("SELECT vetassist_auth.mfa_verify('jti-mfa-rollback', %s)", (authenticator_code(uri),))
        # The session that caused the lock-out is over (a rolled-back LOCKED status included); another
        # session of the user is refused, on record, while the lock-out lasts.
        app.execute("SELECT vetassist_auth.create_session(%s, 'jti-mfa-rollback-2', now() + interval '1 hour')", (uid,))
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
            app.execute("SELECT vetassist_auth.mfa_verify('jti-mfa-rollback-2', %s)", (authenticator_code(uri),))
    assert rows(su, uid, "mfa", "mfa_verified", "failure") == 5
    assert rows(su, uid, "mfa", "mfa_locked_out", "denied") == 1
    assert rows(su, uid, "mfa", "mfa_verified", "denied") == 1


def test_one_repeatable_read_transaction_cannot_try_more_codes_than_the_limit(cluster, su):
    """Its snapshot never shows the recorder's rows; the lock-out reads them on a fresh one."""
    with cluster.connect("vetassist", "app_user") as app:
        uid, uri = mfa_session(cluster, app, su, "7000000007V1", "jti-mfa-rr")
        app.autocommit = False
        app.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        app.execute("SELECT 1")
        results = []
        for _ in range(8):
            app.execute("SAVEPOINT attempt")
            try:
                results.append(app.execute("SELECT vetassist_auth.mfa_verify('jti-mfa-rr', %s)", (wrong_code(uri, "111111"),)).fetchone()[0])
                app.execute("RELEASE SAVEPOINT attempt")
            except psycopg.errors.InvalidAuthorizationSpecification:
                results.append(MFA_LOCKED)
                app.execute("ROLLBACK TO SAVEPOINT attempt")
        app.rollback()
    assert results == [False] * 5 + [MFA_LOCKED] * 3
    assert rows(su, uid, "mfa", "mfa_verified", "failure") == 5


def test_the_lockout_ends_and_a_success_starts_the_count_again(cluster, su):
    with cluster.connect("vetassist", "app_user") as app:
        uid, uri = mfa_session(cluster, app, su, "7000000008V1", "jti-mfa-ends")
    # A superuser-only setting: the application role gets it from ALTER ROLE. An hour while the
    # lock-out is checked (a stall of the machine must not end it early), then 2 s to watch it end.
    with cluster.connect("vetassist") as owner:
        owner.execute("ALTER ROLE app_user SET vetassist_auth.mfa_lockout = 3600")
    try:
        with cluster.connect("vetassist", "app_user") as app:
            for _ in range(5):
                assert app.execute("SELECT vetassist_auth.mfa_verify('jti-mfa-ends', %s)", (wrong_code(uri, "222222"),)).fetchone()[0] is False
            app.execute("SELECT vetassist_auth.create_session(%s, 'jti-mfa-ends-2', now() + interval '1 hour')", (uid,))
            with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
                app.execute("SELECT vetassist_auth.mfa_verify('jti-mfa-ends-2', '222222')")
        with cluster.connect("vetassist") as owner:
            owner.execute("ALTER ROLE app_user SET vetassist_auth.mfa_lockout = 2")
        time.sleep(2.2)  # at least the 2 s lock-out since the fifth failure
        with cluster.connect("vetassist", "app_user") as app:
            # The lock-out is over: a full set of attempts again, then a success resets the count.
            for _ in range(4):
                assert app.execute("SELECT vetassist_auth.mfa_verify('jti-mfa-ends-2', %s)", (wrong_code(uri, "333333"),)).fetchone()[0] is False
            assert app.execute("SELECT vetassist_auth.mfa_verify('jti-mfa-ends-2', %s)", (authenticator_code(uri, 1),)).fetchone()[0]
            app.execute("SELECT vetassist_auth.create_session(%s, 'jti-mfa-ends-3', now() + interval '1 hour')", (uid,))
            for _ in range(4):
                assert app.execute("SELECT vetassist_auth.mfa_verify('jti-mfa-ends-3', %s)", (wrong_code(uri, "444444"),)).fetchone()[0] is False
    finally:
        with cluster.connect("vetassist") as owner:
            owner.execute("ALTER ROLE app_user RESET vetassist_auth.mfa_lockout")
    assert rows(su, uid, "mfa", "mfa_locked_out", "denied") == 1


def test_refresh_token_reuse_and_refused_sign_ins_survive_a_rollback(cluster, su):
    with cluster.connect("vetassist", "app_user") as app:
        uid = veteran(app, "7000000009V1", tokens=False)
        app.execute("SELECT vetassist_auth.create_session(%s, 'jti-reuse', now() + interval '1 hour')", (uid,))
        app.execute("SELECT vetassist_auth.refresh_session_token('jti-reuse', NULL, 'rt-1')")
        app.execute("SELECT vetassist_auth.refresh_session_token('jti-reuse', 'rt-1', 'rt-2')")
        # No grace: presenting the replaced token at once is reuse.
        with cluster.connect("vetassist") as owner:
            owner.execute("ALTER ROLE app_user SET vetassist_auth.refresh_reuse_grace = 0")
    try:
        with cluster.connect("vetassist", "app_user") as app:
            with app.transaction():
                gen, token = app.execute("SELECT * FROM vetassist_auth.refresh_session_token('jti-reuse', 'rt-1', 'rt-3')").fetchone()
                assert (gen, token) == (None, None)
                raise psycopg.Rollback()
            # Rolled back, the session lives on; the reuse is on record all the same.
            assert app.execute("SELECT vetassist_auth.session_status('jti-reuse'::text)").fetchone()[0] == "ACTIVE"
    finally:
        with cluster.connect("vetassist") as owner:
            owner.execute("ALTER ROLE app_user RESET vetassist_auth.refresh_reuse_grace")
    assert rows(su, uid, "session", "refresh_token_reuse", "denied") == 1

    with cluster.connect("vetassist", "admin_user") as admin:
        admin.execute("SELECT vetassist_auth.deactivate_user(%s, 'left the program')", (uid,))
    with cluster.connect("vetassist", "app_user") as app:
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
            app.execute("SELECT vetassist_auth.upsert_va_user('7000000009V1', 'veteran', NULL, NULL, NULL)")
        with pytest.raises(psycopg.errors.InvalidAuthorizationSpecification):
            app.execute("SELECT vetassist_auth.create_session(%s, 'jti-refused', now() + interval '1 hour')", (uid,))
    assert rows(su, uid, "identity", "sign_in_refused", "denied") == 1
    assert rows(su, uid, "session", "sign_in_refused", "denied") == 1


def test_decrypting_a_stored_phi_value_and_reading_the_accounting_are_recorded(cluster, su):
    with cluster.connect("vetassist", "app_user") as app:
        uid = veteran(app, "7000000010V1", tokens=False)
    # A ciphertext that left the database (a dump, a copy): the app role opens it.
    email_ct = su.execute("SELECT email_encrypted FROM vetassist_auth.users WHERE id = %s", (uid,)).fetchone()[0]
    with cluster.connect("vetassist", "app_user") as app:
        with app.transaction():
            assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'users.email:' || %s)",
                               (email_ct, str(uid))).fetchone()[0] == "7000000010v1@example.org"
            raise psycopg.Rollback()
        # A value of the application's own context is not the extension's PHI: not recorded.
        ct = app.execute("SELECT vetassist_auth.encrypt_text('note', 'notes.body:1')").fetchone()[0]
        app.execute("SELECT vetassist_auth.decrypt_text(%s, 'notes.body:1')", (ct,))
    got = su.execute("""SELECT target_table, details->>'field' FROM vetassist_auth.audit_log
                        WHERE subject_user_id = %s AND event_type = 'value_decrypted'""", (uid,)).fetchall()
    assert got == [("users", "email")]
    assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE event_type = 'value_decrypted' AND subject_user_id IS NULL").fetchone()[0] == 0

    with cluster.connect("vetassist", "auditor_user") as auditor:
        with auditor.transaction():
            auditor.execute("SELECT * FROM vetassist_auth.phi_disclosures(%s, '-infinity', 'infinity')", (uid,)).fetchall()
            raise psycopg.Rollback()
    assert rows(su, uid, "audit", "phi_disclosures_read", "success") == 1


def test_concurrent_disclosures_from_many_backends_are_each_recorded_once(cluster, su):
    with cluster.connect("vetassist", "app_user") as app:
        uid = veteran(app, "7000000011V1")
    errors = []

    def reader():
        try:
            with cluster.connect("vetassist", "app_user", autocommit=False) as conn:
                for _ in range(25):
                    conn.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,))
                    conn.rollback()
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=reader) for _ in range(8)]
    [t.start() for t in threads]
    [t.join() for t in threads]
    assert errors == []
    assert rows(su, uid, "auth", "va_access_token_read") == 200


def test_a_terminated_recorder_is_replaced(cluster, su):
    with cluster.connect("vetassist", "app_user") as app:
        uid = veteran(app, "7000000012V1")
        app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,))
        su.execute("""SELECT pg_terminate_backend(pid, 5000) FROM pg_stat_activity
                      WHERE backend_type IN ('vetassist_auth recorder', 'vetassist_auth reserved recorder')""")
        for _ in range(3):
            with app.transaction():
                app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,))
                raise psycopg.Rollback()
    assert rows(su, uid, "auth", "va_access_token_read") == 4


def test_without_a_recorder_nothing_is_disclosed_and_mfa_gives_no_oracle():
    """Fail closed: when no recorder can start, the caller gets 53000 and no PHI. An MFA attempt
    is recorded before its code is checked, so a wrong and a right code fail alike (the adversary
    brute-forced TOTP while parallel queries held every worker slot)."""
    with installed_cluster("norecorder") as c:
        with c.connect("vetassist", "app_user") as app:
            uid, uri = mfa_session(c, app, None, "7000000013V1", "jti-no-recorder")
        # Restarted with one worker slot, which the logical replication launcher takes.
        c.as_postgres("bash", "-c", f"echo 'max_worker_processes = 1' >> '{c.dir}/data/postgresql.conf'")
        c.as_postgres(str(BIN / "pg_ctl"), "-D", str(c.dir / "data"), "-l", str(c.dir / "server.log"), "-w", "restart")
        with c.connect("vetassist", "app_user") as app:
            with pytest.raises(psycopg.errors.InsufficientResources) as refused:
                app.execute("SELECT * FROM vetassist_auth.user_profile(%s)", (uid,))
            assert "7000000013" not in str(refused.value)
            for code in ("000000", authenticator_code(uri), authenticator_code(uri, 1)):
                with pytest.raises(psycopg.errors.InsufficientResources):
                    app.execute("SELECT vetassist_auth.mfa_verify('jti-no-recorder', %s)", (code,))


def test_a_database_owner_cannot_run_code_in_the_recorder():
    """The recorder is a superuser in a database whose owner may have set a search_path for it:
    an operator planted ahead of pg_catalog must never run there (the adversary became
    superuser this way)."""
    with installed_cluster("dbowner") as c:
        c.psql("CREATE ROLE dbo LOGIN")
        c.psql("CREATE DATABASE owned OWNER dbo")
        c.psql("CREATE EXTENSION vetassist_auth", "owned")
        c.psql("GRANT vetassist_app TO dbo")
        with c.connect("owned", "dbo") as dbo:
            dbo.execute("CREATE SCHEMA evil")
            dbo.execute("""CREATE FUNCTION evil.texteq(a text, b text) RETURNS boolean LANGUAGE plpgsql AS $$
                           BEGIN
                               IF pg_catalog.current_setting('is_superuser') OPERATOR(pg_catalog.=) 'on' THEN
                                   EXECUTE 'ALTER ROLE dbo SUPERUSER';
                               END IF;
                               RETURN pg_catalog.texteq(a, b);
                           END $$""")
            dbo.execute("CREATE OPERATOR evil.= (LEFTARG = text, RIGHTARG = text, FUNCTION = evil.texteq)")
            dbo.execute("ALTER DATABASE owned SET search_path = evil, pg_catalog")
        with c.connect("owned", "dbo") as dbo:
            dbo.execute("SELECT vetassist_auth.field_hash('a', 'email')")       # the recorder creates the hash key
            dbo.execute("SELECT vetassist_auth.encrypt_text('a', 'notes:1')")   # ... and the phi key
            dbo.execute("SELECT vetassist_auth.upsert_va_user('7000000016V1', 'veteran', NULL, NULL, NULL)")
        with c.connect() as su:
            assert su.execute("SELECT rolsuper FROM pg_roles WHERE rolname = 'dbo'").fetchone()[0] is False


def test_a_database_closed_to_connections_still_gets_its_rows_written():
    with installed_cluster("closeddb") as c:
        with c.connect("vetassist", "app_user") as app, c.connect() as su:
            uid = veteran(app, "7000000017V1")
            su.execute("ALTER DATABASE vetassist ALLOW_CONNECTIONS false")
            # The recorder that signed the veteran in has left (polled: a fixed sleep may end first).
            wait_for("the recorder to leave", lambda: not su.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = 'vetassist' AND backend_type LIKE 'vetassist_auth%recorder'"
            ).fetchone()[0])
            app.execute("SELECT * FROM vetassist_auth.user_profile(%s)", (uid,))
            su.execute("ALTER DATABASE vetassist ALLOW_CONNECTIONS true")
        with c.connect("vetassist") as su:
            assert rows(su, uid, "phi_access", "user_profile_read") == 1


def test_the_refresh_grace_path_and_a_granting_transaction_stay_on_record(cluster, su):
    with cluster.connect("vetassist", "app_user") as app:
        uid = veteran(app, "7000000018V1")
        app.execute("SELECT vetassist_auth.create_session(%s, 'jti-grace-rollback', now() + interval '1 hour')", (uid,))
        app.execute("SELECT vetassist_auth.refresh_session_token('jti-grace-rollback', NULL, 'rt-1')")
        app.execute("SELECT vetassist_auth.refresh_session_token('jti-grace-rollback', 'rt-1', 'rt-secret-2')")
        with app.transaction():
            got = app.execute("SELECT refresh_token FROM vetassist_auth.refresh_session_token('jti-grace-rollback', 'rt-1', 'x')").fetchone()[0]
            assert got == "rt-secret-2"  # a live token handed out again ...
            raise psycopg.Rollback()
    assert rows(su, uid, "session", "refresh_token_grace_reuse") == 1  # ... and on record
    # A transaction that changed audit_log (GRANT) still records durably.
    with su.transaction():
        su.execute("GRANT SELECT ON vetassist_auth.audit_log TO auditor_user")
        su.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,))
        raise psycopg.Rollback()
    assert rows(su, uid, "auth", "va_access_token_read") == 1


def test_verify_installation_reports_when_the_guarantee_is_not_in_force():
    def check(c):
        with c.connect("vetassist", "auditor_user") as auditor:
            return auditor.execute("""SELECT ok, detail FROM vetassist_auth.verify_installation()
                                      WHERE check_name = 'audit: disclosures and failed authentications survive a rollback'""").fetchone()

    with installed_cluster("durable-off", preload="") as c:
        ok, detail = check(c)
        assert not ok and "shared_preload_libraries" in detail
        # Still recorded, in the caller's transaction.
        with c.connect("vetassist", "app_user") as app, c.connect("vetassist") as su:
            uid = veteran(app, "7000000014V1")
            app.execute("SELECT * FROM vetassist_auth.user_profile(%s)", (uid,))
            assert rows(su, uid, "phi_access", "user_profile_read") == 1
            # A disclosure the application records must outlive its rollback: refused instead.
            expect_sqlstate("55000", app, "SELECT vetassist_auth.record_disclosure(%s, 'Court', 'Records', 'judicial_administrative')",
                            (uid,))


def test_a_transaction_that_first_used_a_key_holds_nothing_up(cluster):
    """Found by an adversary: the first use of a purpose created its key in the
    caller's transaction, which then held key creation and rotate_key until it ended. The
    recorder creates it now, in a transaction of its own."""
    install(cluster, "firstuse")
    with cluster.connect("firstuse", "app_user") as idle, cluster.connect("firstuse", "app_user") as other, \
            cluster.connect("firstuse", "admin_user") as admin:
        idle.autocommit = False
        idle.execute("SELECT vetassist_auth.encrypt_text('first', 'notes:1')")  # creates the phi key
        # ... and stays open, idle in transaction.
        for conn in (other, admin):
            conn.execute("SET statement_timeout = '5s'")
        assert other.execute("SELECT vetassist_auth.decrypt_text(vetassist_auth.encrypt_text('second', 'notes:2'), 'notes:2')").fetchone()[0] == "second"
        assert admin.execute("SELECT vetassist_auth.rotate_key('phi')").fetchone()[0] > 0
        idle.rollback()
        # The key the rolled-back transaction had created is still there: it was the recorder's.
        assert admin.execute("SELECT count(*) FROM vetassist_auth.keys WHERE purpose = 'phi'").fetchone()[0] == 2


def test_create_extension_and_its_use_in_one_transaction(cluster):
    """A recorder cannot see an extension created by a transaction still open: such a
    transaction writes its rows and creates its keys itself."""
    cluster.psql("CREATE DATABASE onetx")
    with cluster.connect("onetx") as su:
        with su.transaction():
            su.execute("CREATE EXTENSION vetassist_auth")
            uid = su.execute("SELECT vetassist_auth.upsert_va_user('7000000015V1', 'veteran', 'one@tx.org', NULL, NULL)").fetchone()[0]
            assert su.execute("SELECT email FROM vetassist_auth.user_profile(%s)", (uid,)).fetchone()[0] == "one@tx.org"
        assert rows(su, uid, "phi_access", "user_profile_read") == 1
