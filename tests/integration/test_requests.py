"""The application's side (docs/api.md, "One call per request"): authenticate in one round trip,
no traps between calls, and errors that say what was expected and whom to grant. Each test is
what an application team tripped over on 0.1.5."""
import psycopg
import pytest

from vetassist_testing import authenticator_code, expect_sqlstate, install, veteran, wait_for, wrong_code

DB = "requests"


@pytest.fixture(scope="module")
def db(cluster):
    install(cluster, DB)
    return cluster


@pytest.fixture
def app(db):
    with db.connect(DB, "app_user") as conn:
        yield conn


@pytest.fixture
def su(db):
    with db.connect(DB) as conn:
        yield conn


AUTHENTICATE = "SELECT * FROM vetassist_auth.authenticate(%s, %s)"


def test_authenticate_attaches_the_user_session_and_address_to_the_rest_of_the_transaction(app, su):
    uid = veteran(app, "8200000001V1", tokens=None)
    sid = app.execute("SELECT vetassist_auth.create_session(%s, 'jti-auth', now() + interval '2 hours')", (uid,)).fetchone()[0]
    with app.transaction():
        row = app.execute(AUTHENTICATE, ("jti-auth", "203.0.113.9")).fetchone()
        status, reason, user_id, session_id, mfa_required, idle_until, absolute_until = row
        assert (status, reason, user_id, session_id, mfa_required) == ("ACTIVE", None, uid, sid, False)
        assert idle_until < absolute_until
        audit_id = app.execute("SELECT vetassist_auth.audit_event('phi', 'chart_viewed', 'success', '{}')").fetchone()[0]
    actor, session, ip_hash = su.execute("SELECT actor_user_id, session_id, ip_hash FROM vetassist_auth.audit_log WHERE id = %s",
                                         (audit_id,)).fetchone()
    assert (actor, session) == (uid, sid)
    assert su.execute("SELECT %s = ANY (vetassist_auth.field_hashes('203.0.113.9', 'ip'))", (ip_hash,)).fetchone()[0]
    # The actor lasts one transaction: the next one starts without it.
    audit_id = app.execute("SELECT vetassist_auth.audit_event('phi', 'chart_viewed', 'success', '{}')").fetchone()[0]
    assert su.execute("SELECT actor_user_id, session_id FROM vetassist_auth.audit_log WHERE id = %s",
                      (audit_id,)).fetchone() == (None, None)


def test_authenticate_says_why_a_session_is_not_live_and_attaches_nothing(app, su):
    uid = veteran(app, "8200000002V1", tokens=None)
    assert app.execute(AUTHENTICATE, ("jti-never-issued", None)).fetchone() == (None, "unknown", None, None, None, None, None)
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-ended', now() + interval '1 hour')", (uid,))
    app.execute("SELECT vetassist_auth.end_session('jti-ended', 'logout')")
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-short', now() + interval '1 second')", (uid,))
    with app.transaction():
        assert app.execute(AUTHENTICATE, ("jti-ended", "203.0.113.9")).fetchone() \
            == ("TERMINATED", "logout", None, None, None, None, None)
        audit_id = app.execute("SELECT vetassist_auth.audit_event('phi', 'x', 'info', '{}')").fetchone()[0]
    assert su.execute("SELECT actor_user_id, session_id, ip_hash FROM vetassist_auth.audit_log WHERE id = %s",
                      (audit_id,)).fetchone() == (None, None, None)
    expired = wait_for("the one-second session to end",
                       lambda: (row := app.execute(AUTHENTICATE, ("jti-short", None)).fetchone())[0] != "ACTIVE" and row)
    assert expired[:2] == ("EXPIRED", "absolute_timeout")


def test_authenticate_reports_mfa_still_required_and_confirming_totp_can_verify_the_session(app, su):
    uid = veteran(app, "8200000003V1", tokens=None)
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-enrol', now() + interval '1 hour')", (uid,))
    uri = app.execute("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uid,)).fetchone()[0]
    code = authenticator_code(uri)
    # Another user's session, an unknown one: refused before the code is looked at.
    other = veteran(app, "8200000004V1", tokens=None)
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-other-user', now() + interval '1 hour')", (other,))
    expect_sqlstate("22023", app, "SELECT vetassist_auth.mfa_confirm_totp(%s, %s, 'jti-other-user')", (uid, code))
    expect_sqlstate("P0002", app, "SELECT vetassist_auth.mfa_confirm_totp(%s, %s, 'jti-nobody')", (uid, code))
    assert app.execute("SELECT vetassist_auth.mfa_confirm_totp(%s, %s, 'jti-enrol')", (uid, code)).fetchone()[0]
    assert app.execute(AUTHENTICATE, ("jti-enrol", None)).fetchone()[4] is False
    # A second session of the same user still needs its own second factor.
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-second', now() + interval '1 hour')", (uid,))
    assert app.execute(AUTHENTICATE, ("jti-second", None)).fetchone()[4] is True
    assert su.execute("""SELECT count(*) FROM vetassist_auth.audit_log WHERE subject_user_id = %s
                         AND event_type = 'mfa_verified' AND outcome = 'failure'""", (uid,)).fetchone()[0] == 0


def test_a_session_has_a_finite_end_like_every_other_expiry(app):
    uid = veteran(app, "8200000005V1", tokens=None)
    for value in ("infinity", "-infinity"):
        err = expect_sqlstate("22023", app, "SELECT vetassist_auth.create_session(%s, 'jti-inf', %s)", (uid, value))
        assert "expires_at" in err.diag.message_primary


def server_text(err):
    """What the server said (not libpq's rendering of the client's own statement text)."""
    return " ".join(filter(None, (err.diag.message_primary, err.diag.message_detail, err.diag.message_hint,
                                  err.diag.context)))


def test_malformed_input_is_22P02_naming_what_was_expected_never_the_value(app, db):
    secret_ip = "not-an-ip-7f3a9c"
    err = expect_sqlstate("22P02", app, "SELECT vetassist_auth.set_actor(NULL, %s)", (secret_ip,))
    assert "client_ip" in err.diag.message_primary and secret_ip not in server_text(err)
    err = expect_sqlstate("22P02", app, f"SELECT vetassist_auth.create_session(gen_random_uuid(), 'j', now() + interval '1 hour', '{secret_ip}')")
    assert "203.0.113.7" in (err.diag.message_hint or "") and secret_ip not in server_text(err)
    secret_uuid = "bad-uuid-51c2e8"
    err = expect_sqlstate("22P02", app, f"SELECT vetassist_auth.user_profile('{secret_uuid}')")
    assert "32 hexadecimal digits" in (err.diag.message_hint or "") and secret_uuid not in server_text(err)
    err = expect_sqlstate("22P02", app, "SELECT vetassist_auth.session_status('jti-literal')")
    assert "jwt_id =>" in (err.diag.message_hint or "")
    assert app.execute("SELECT count(*) FROM vetassist_auth.authenticate(jwt_id => 'jti-literal')").fetchone()[0] == 1
    assert secret_ip not in db.log() and secret_uuid not in db.log()


def test_a_denied_call_names_the_role_to_grant(db):
    with db.connect(DB, "outsider") as outsider:
        err = expect_sqlstate("42501", outsider, "SELECT * FROM vetassist_auth.authenticate('x')")
        assert "GRANT vetassist_app (the application)" in (err.diag.message_hint or ""), err.diag.message_hint
    with db.connect(DB, "app_user") as app:
        err = expect_sqlstate("42501", app, "SELECT * FROM vetassist_auth.accounting_of_disclosures(gen_random_uuid())")
        assert "granted to vetassist_auditor;" in (err.diag.message_hint or ""), err.diag.message_hint


def test_verify_installation_names_a_createrole_login_in_an_extension_role(db, su):
    check = """SELECT ok, detail FROM vetassist_auth.verify_installation()
               WHERE check_name LIKE 'roles: no extension role or member of one holds SUPERUSER%'"""
    assert su.execute(check).fetchone()[0]
    su.execute("CREATE ROLE team_lead CREATEROLE")
    su.execute("CREATE ROLE web_group")
    try:
        su.execute("GRANT vetassist_app TO web_group")
        su.execute("GRANT web_group TO team_lead")
        ok, detail = su.execute(check).fetchone()
        assert not ok and "team_lead (vetassist_app: CREATEROLE)" in detail
    finally:
        su.execute("DROP ROLE team_lead")
        su.execute("DROP ROLE web_group")
    assert su.execute(check).fetchone()[0]
    # The extension role itself (found by an adversary: only members were looked at).
    for attribute in ("SUPERUSER", "CREATEROLE", "REPLICATION", "BYPASSRLS"):
        su.execute(f"ALTER ROLE vetassist_app {attribute}")
        try:
            ok, detail = su.execute(check).fetchone()
            assert not ok and f"vetassist_app (vetassist_app: {attribute})" in detail, detail
        finally:
            su.execute(f"ALTER ROLE vetassist_app NO{attribute}")
    assert su.execute(check).fetchone()[0]


# Found by an adversary.

def probe(conn):
    return conn.execute("SELECT vetassist_auth.audit_event('phi', 'probe', 'info', '{}')").fetchone()[0]


def actor_and_session(su, audit_id):
    return su.execute("SELECT actor_user_id, session_id FROM vetassist_auth.audit_log WHERE id = %s", (audit_id,)).fetchone()


def test_no_row_names_one_user_in_anothers_session_or_outlives_a_refused_authenticate(db, app, su):
    a = veteran(app, "8200000006V1", tokens=None)
    b = veteran(app, "8200000007V1", tokens=None)
    sid_a = app.execute("SELECT vetassist_auth.create_session(%s, 'jti-a', now() + interval '1 hour')", (a,)).fetchone()[0]
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-b', now() + interval '1 hour')", (b,))
    app.execute("SELECT vetassist_auth.end_session('jti-b', 'logout')")
    with app.transaction():
        app.execute(AUTHENTICATE, ("jti-a", None))
        same = probe(app)
        app.execute("SELECT vetassist_auth.set_actor(%s)", (a,))   # the same user: the session stays
        still = probe(app)
        app.execute("SELECT vetassist_auth.set_actor(%s)", (b,))   # another user: not in A's session
        other = probe(app)
    assert [actor_and_session(su, i) for i in (same, still, other)] == [(a, sid_a), (a, sid_a), (b, None)]
    with app.transaction():
        app.execute(AUTHENTICATE, ("jti-a", None))
        assert app.execute(AUTHENTICATE, ("jti-b", None)).fetchone()[0] == "TERMINATED"
        refused = probe(app)
        app.execute(AUTHENTICATE, ("jti-a", None))
        assert app.execute(AUTHENTICATE, ("jti-unknown", None)).fetchone()[1] == "unknown"
        unknown = probe(app)
    assert actor_and_session(su, refused) == (None, None) and actor_and_session(su, unknown) == (None, None)


def test_a_session_ended_after_a_repeatable_read_snapshot_is_never_active(db, app):
    uid = veteran(app, "8200000008V1", tokens=None)
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-rr', now() + interval '1 hour')", (uid,))
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-rr2', now() + interval '1 hour')", (uid,))
    for check, jti in ((AUTHENTICATE, "jti-rr"), ("SELECT vetassist_auth.touch_session(%s), %s", "jti-rr2")):
        with db.connect(DB, "app_user", autocommit=False) as rr:
            rr.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            rr.execute("SELECT 1")  # the snapshot
            assert app.execute("SELECT vetassist_auth.lock_session(%s, 'suspected compromise')", (jti,)).fetchone()[0]
            with pytest.raises(psycopg.Error) as raised:
                rr.execute(check, (jti, None))
            assert raised.value.sqlstate == "40001", raised.value.sqlstate


def test_a_lockout_caused_through_mfa_confirm_totp_locks_that_session(db, app):
    uid = veteran(app, "8200000009V1", tokens=None)
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-confirm-lock', now() + interval '1 hour')", (uid,))
    uri = app.execute("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uid,)).fetchone()[0]
    wrong = wrong_code(uri)
    for _ in range(5):  # mfa_max_failures
        assert app.execute("SELECT vetassist_auth.mfa_confirm_totp(%s, %s, 'jti-confirm-lock')", (uid, wrong)).fetchone()[0] is False
    assert app.execute(AUTHENTICATE, ("jti-confirm-lock", None)).fetchone()[:2] == ("LOCKED", "mfa_lockout")


def test_a_malformed_time_is_22007_with_a_hint_and_a_foreign_functions_denial_names_ours_only_conditionally(db, app, su):
    err = expect_sqlstate("22007", app, "SELECT vetassist_auth.create_session(gen_random_uuid(), 'j', 'not-a-time-5d1')")
    assert "2026-12-04 15:30:00+00" in (err.diag.message_hint or "") and "not-a-time-5d1" not in server_text(err)
    su.execute("CREATE SCHEMA other_app; GRANT USAGE ON SCHEMA other_app TO PUBLIC;"
               "CREATE FUNCTION other_app.end_user_sessions(uuid, text) RETURNS int LANGUAGE sql AS 'SELECT 1';"
               "REVOKE ALL ON FUNCTION other_app.end_user_sessions(uuid, text) FROM PUBLIC")
    try:
        with db.connect(DB, "outsider") as outsider:
            err = expect_sqlstate("42501", outsider, "SELECT other_app.end_user_sessions(NULL, 'x')")
            assert (err.diag.message_hint or "").startswith("If this is vetassist_auth.end_user_sessions:")
            assert "vetassist_app or vetassist_admin" in err.diag.message_hint
    finally:
        su.execute("DROP SCHEMA other_app CASCADE")
