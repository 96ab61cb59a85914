"""The accounting of disclosures (45 CFR 164.528) and the records auditors read (164.312(b)),
attributed to the veteran they are about (docs/hipaa.md). Each test is something an application
team, a privacy officer or an attacker found wrong on 0.1.5."""
import uuid

import psycopg
import pytest

from vetassist_testing import authenticator_code, enrolled_mfa, expect_sqlstate, install, veteran, wait_for, wrong_code

# 45 CFR 164.528(a)(1): disclosures exempt from the accounting, and those it must list.
EXEMPT = ["treatment", "payment", "health_care_operations", "to_individual", "incidental", "authorized",
          "directory_or_involved", "national_security", "correctional_custody", "limited_data_set"]
ACCOUNTABLE = ["required_by_law", "public_health", "abuse_neglect", "health_oversight", "judicial_administrative",
               "law_enforcement", "decedents", "organ_donation", "research_waiver", "serious_threat",
               "specialized_government", "workers_compensation", "impermissible"]

DB = "disclosures"
PERIOD = "now() - interval '1 hour', now() + interval '1 hour'"


@pytest.fixture(scope="module")
def db(cluster):
    install(cluster, DB)
    return cluster


@pytest.fixture
def app(db):
    with db.connect(DB, "app_user") as conn:
        yield conn


@pytest.fixture
def auditor(db):
    with db.connect(DB, "auditor_user") as conn:
        yield conn


@pytest.fixture
def su(db):
    with db.connect(DB) as conn:
        yield conn


def disclosures(auditor, uid):
    return auditor.execute(f"""SELECT actor_user_id, recipient, description, purpose, accountable, recorded_by, event_type
                               FROM vetassist_auth.phi_disclosures(%s, {PERIOD})""", (uid,)).fetchall()


def test_a_caregivers_view_is_in_the_veterans_accounting_not_the_caregivers(app, auditor):
    vet = veteran(app, "8100000001V1")
    caregiver = veteran(app, "8100000002V1", tokens=None)
    with app.transaction():
        app.execute("SELECT vetassist_auth.set_actor(%s)", (caregiver,))
        app.execute("SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', '{\"page\": \"meds\"}', %s)", (vet,))
    assert disclosures(auditor, vet) == [(caregiver, None, "record_viewed", None, False, "application", "record_viewed")]
    assert disclosures(auditor, caregiver) == []
    # Without a subject the event is about the actor, as before 0.2.0 (a veteran's own page).
    with app.transaction():
        app.execute("SELECT vetassist_auth.set_actor(%s)", (caregiver,))
        app.execute("SELECT vetassist_auth.audit_event('phi', 'own_record_viewed', 'success', '{}')")
    assert [r[-1] for r in disclosures(auditor, caregiver)] == ["own_record_viewed"]
    # A four-argument call by name still resolves (one function, no ambiguous overload).
    app.execute("SELECT vetassist_auth.audit_event(category => 'phi', event_type => 'x', outcome => 'info', details => '{}')")
    expect_sqlstate("P0002", app, "SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', '{}', gen_random_uuid())")
    # The extension's own category of disclosures is reserved.
    expect_sqlstate("22023", app, "SELECT vetassist_auth.audit_event('disclosure', 'phi_disclosed', 'success', '{}', %s)", (vet,))


def test_every_purpose_is_in_the_accounting_exactly_when_164_528_requires_it(app, auditor, su):
    vet = veteran(app, "8100000003V1")
    officer = veteran(app, "8100000004V1", tokens=None)
    ids = {}
    with app.transaction():
        app.execute("SELECT vetassist_auth.set_actor(%s)", (officer,))
        for purpose in EXEMPT + ACCOUNTABLE:
            ids[purpose] = app.execute(
                "SELECT vetassist_auth.record_disclosure(%s, %s, %s, %s, '{\"case\": 7}')",
                (vet, f"Recipient for {purpose}", f"Records sent ({purpose})", purpose)).fetchone()[0]
    listed = auditor.execute(f"SELECT purpose, accountable, recorded_by, recipient, actor_user_id FROM vetassist_auth.phi_disclosures(%s, {PERIOD})",
                             (vet,)).fetchall()
    assert sorted(listed) == sorted((p, p in ACCOUNTABLE, "application", f"Recipient for {p}", officer) for p in EXEMPT + ACCOUNTABLE)
    accounting = auditor.execute("SELECT disclosed_at, recipient, description, purpose FROM vetassist_auth.accounting_of_disclosures(%s)",
                                 (vet,)).fetchall()
    assert [r[1] for r in accounting] == [f"Recipient for {p}" for p in ACCOUNTABLE]
    assert [r[2] for r in accounting] == [f"Records sent ({p})" for p in ACCOUNTABLE]
    assert all(r[3] for r in accounting), "a brief statement of each purpose"
    # The returned id is the audit row's, and the row is the veteran's, not the officer's.
    row = su.execute("SELECT subject_user_id, actor_user_id, category FROM vetassist_auth.audit_log WHERE id = %s",
                     (ids["public_health"],)).fetchone()
    assert row == (vet, officer, "disclosure")
    # The list callers validate against is the function's own.
    assert sorted(app.execute("SELECT purpose FROM vetassist_auth.disclosure_purposes() WHERE accountable").fetchall()) \
        == sorted((p,) for p in ACCOUNTABLE)
    assert auditor.execute("SELECT count(*) FROM vetassist_auth.accounting_of_disclosures(%s, now() + interval '1 minute')",
                           (vet,)).fetchone()[0] == 0


@pytest.mark.parametrize("args", [
    ("'Dept of Health'", "'labs'", "'Public_Health'"),
    ("'Dept of Health'", "'labs'", "' public_health'"),
    ("'Dept of Health'", "'labs'", "NULL"),
    ("'Dept of Health'", "'labs'", "'marketing'"),
    ("''", "'labs'", "'public_health'"),
    ("'Dept of Health'", "NULL", "'public_health'"),
    ("repeat('x', 1001)", "'labs'", "'public_health'"),
])
def test_a_disclosure_without_a_known_purpose_or_a_recipient_is_refused(app, su, args):
    vet = veteran(app, "8100000005V1", tokens=None)
    expect_sqlstate("22023", app, f"SELECT vetassist_auth.record_disclosure(%s, {', '.join(args)})", (vet,))
    expect_sqlstate("22023", app, "SELECT vetassist_auth.record_disclosure(%s, 'x', 'y', 'treatment', '[1]')", (vet,))
    expect_sqlstate("P0002", app, "SELECT vetassist_auth.record_disclosure(gen_random_uuid(), 'x', 'y', 'treatment')")
    assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE category = 'disclosure' AND subject_user_id = %s",
                      (vet,)).fetchone()[0] == 0


def test_a_disclosure_survives_the_applications_rollback(app, auditor, su):
    vet = veteran(app, "8100000006V1", tokens=None)
    with app.transaction():
        audit_id = app.execute("SELECT vetassist_auth.record_disclosure(%s, 'County Sheriff', 'Address and phone', 'law_enforcement')",
                               (vet,)).fetchone()[0]
        raise psycopg.Rollback()
    rows = auditor.execute("SELECT recipient, purpose FROM vetassist_auth.accounting_of_disclosures(%s)", (vet,)).fetchall()
    assert rows == [("County Sheriff", auditor.execute(
        "SELECT statement FROM vetassist_auth.disclosure_purposes() WHERE purpose = 'law_enforcement'").fetchone()[0])]
    assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE id = %s", (audit_id,)).fetchone()[0] == 1


def test_the_accounting_is_for_auditors_and_reading_it_is_recorded(app, auditor, su):
    vet = veteran(app, "8100000007V1", tokens=None)
    for role_conn, fn in ((app, "phi_disclosures(%s, now() - interval '1 day', now())"),
                          (app, "accounting_of_disclosures(%s)"), (app, "session_events_of(%s, '-infinity')"),
                          (app, "crisis_events('-infinity')")):
        expect_sqlstate("42501", role_conn, f"SELECT * FROM vetassist_auth.{fn}", (vet,) if "%s" in fn else None)
    auditor.execute("SELECT * FROM vetassist_auth.accounting_of_disclosures(%s)", (vet,))
    expect_sqlstate("22023", auditor, "SELECT * FROM vetassist_auth.accounting_of_disclosures(NULL)")
    expect_sqlstate("22023", auditor, "SELECT * FROM vetassist_auth.phi_disclosures(%s, now(), now() - interval '1 day')", (vet,))
    assert su.execute("""SELECT count(*) FROM vetassist_auth.audit_log WHERE subject_user_id = %s
                         AND category = 'audit' AND event_type = 'accounting_of_disclosures_read'""", (vet,)).fetchone()[0] == 1


def signed_in(app, icn, jti, mfa=True):
    """A veteran with TOTP, a session `jti` and (when `mfa`) the code verified on it."""
    uid = veteran(app, icn, tokens=None)
    uri = enrolled_mfa(app, uid)
    app.execute("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 hour')", (uid, jti))
    if mfa:
        # The next step: the confirmation used this one, and a code is good once.
        assert app.execute("SELECT vetassist_auth.mfa_verify(%s, %s)", (jti, authenticator_code(uri, 1))).fetchone()[0]
    return uid, uri


def test_a_veteran_sees_only_their_own_disclosures_and_only_signed_in_with_mfa(app, su):
    vet, _ = signed_in(app, "8100000008V1", "jti-mine")
    other, _ = signed_in(app, "8100000009V1", "jti-other")
    app.execute("SELECT vetassist_auth.record_disclosure(%s, 'State registry', 'Immunizations', 'public_health')", (vet,))
    app.execute("SELECT vetassist_auth.record_disclosure(%s, 'Court', 'Records', 'judicial_administrative')", (other,))
    mine = app.execute("SELECT recipient, purpose, accountable, recorded_by FROM vetassist_auth.my_disclosures('jti-mine')").fetchall()
    assert mine == [("State registry", "public_health", True, "application")]
    assert [r[0] for r in app.execute("SELECT recipient FROM vetassist_auth.my_disclosures('jti-other')").fetchall()] == ["Court"]
    # The read is an access by the veteran, in that session.
    session = su.execute("SELECT id FROM vetassist_auth.sessions WHERE jwt_id = 'jti-mine'").fetchone()[0]
    assert su.execute("""SELECT actor_user_id, subject_user_id, session_id FROM vetassist_auth.audit_log
                         WHERE category = 'audit' AND event_type = 'my_disclosures_read' AND subject_user_id = %s""",
                      (vet,)).fetchall() == [(vet, vet, session)]
    # A session that still needs MFA, one that has ended, one that never was: all 28000.
    signed_in(app, "8100000010V1", "jti-pending", mfa=False)
    expect_sqlstate("28000", app, "SELECT * FROM vetassist_auth.my_disclosures('jti-pending')")
    app.execute("SELECT vetassist_auth.end_session('jti-mine', 'logout')")
    expect_sqlstate("28000", app, "SELECT * FROM vetassist_auth.my_disclosures('jti-mine')")
    expect_sqlstate("28000", app, "SELECT * FROM vetassist_auth.my_disclosures('jti-never-issued')")
    expect_sqlstate("28000", app, "SELECT * FROM vetassist_auth.my_disclosures(NULL)")


def test_auditors_read_crisis_and_session_events_and_each_read_is_recorded(app, auditor, su):
    vet, _ = signed_in(app, "8100000011V1", "jti-events")
    since = su.execute("SELECT clock_timestamp()").fetchone()[0]
    crisis = app.execute("SELECT vetassist_auth.log_session_event('jti-events', 'crisis_line_offered', 'crisis', '{\"score\": 3}')").fetchone()[0]
    app.execute("SELECT vetassist_auth.log_session_event('jti-events', 'page_help', 'info', '{}')")
    rows = auditor.execute("SELECT event_id, user_id, event_type FROM vetassist_auth.crisis_events(%s)", (since,)).fetchall()
    assert (crisis, vet, "crisis_line_offered") in rows and all(r[2] != "page_help" for r in rows)
    assert [r[0] for r in auditor.execute("SELECT event_type FROM vetassist_auth.session_events_of(%s, %s) ORDER BY occurred_at",
                                          (vet, since)).fetchall()] == ["crisis_line_offered", "page_help"]
    reads = su.execute("""SELECT event_type, subject_user_id FROM vetassist_auth.audit_log
                          WHERE category = 'audit' AND event_type IN ('crisis_events_read', 'session_events_read') AND id > (
                              SELECT max(id) FROM vetassist_auth.audit_log WHERE event_type = 'session_event' AND target_id = %s::text)
                          ORDER BY id""", (crisis,)).fetchall()
    assert reads == [("crisis_events_read", None), ("session_events_read", vet)]
    expect_sqlstate("22023", auditor, "SELECT * FROM vetassist_auth.crisis_events(NULL)")


def audit_rows(su):
    return su.execute("SELECT count(*) FROM vetassist_auth.audit_log").fetchone()[0]


def test_a_role_without_privileges_cannot_raise_row_audit_alarms(db, su):
    """The event triggers matched the trigger's name: any role could fake 'row audit switched off'."""
    before = audit_rows(su)
    with db.connect(DB, "outsider") as outsider:
        outsider.execute("CREATE TEMP TABLE users (id int)")
        outsider.execute("CREATE FUNCTION pg_temp.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$")
        outsider.execute("CREATE TRIGGER vetassist_row_audit AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION pg_temp.noop()")
        for _ in range(20):
            outsider.execute("ALTER TABLE users ADD COLUMN IF NOT EXISTS x int")
        outsider.execute("ALTER TABLE users DISABLE TRIGGER vetassist_row_audit")
        outsider.execute("ALTER TABLE users ENABLE REPLICA TRIGGER vetassist_row_audit")
        outsider.execute("ALTER TRIGGER vetassist_row_audit ON users RENAME TO other")
        outsider.execute("ALTER TRIGGER other ON users RENAME TO vetassist_row_audit")
        outsider.execute("CREATE OR REPLACE TRIGGER vetassist_row_audit AFTER UPDATE ON users FOR EACH ROW EXECUTE FUNCTION pg_temp.noop()")
        outsider.execute("DROP TRIGGER vetassist_row_audit ON users")
        outsider.execute("CREATE TRIGGER vetassist_row_audit AFTER INSERT ON users FOR EACH ROW EXECUTE FUNCTION pg_temp.noop()")
        outsider.execute("DROP TABLE users")
        # Nor can it attach the real row audit to a table of its own.
        outsider.execute("CREATE TEMP TABLE notes (id int)")
        expect_sqlstate("42501", outsider,
                        "CREATE TRIGGER vetassist_row_audit AFTER INSERT ON notes FOR EACH ROW EXECUTE FUNCTION vetassist_auth.row_audit()")
    assert audit_rows(su) == before


def test_a_session_locked_by_mfa_failures_stays_locked_when_the_caller_rolls_back(db, app, su):
    uid, uri = signed_in(app, "8100000012V1", "jti-lock", mfa=False)
    wrong = wrong_code(uri)
    with db.connect(DB) as owner:
        owner.execute(f"ALTER ROLE app_user IN DATABASE {DB} SET vetassist_auth.mfa_lockout = 3600")
    try:
        with db.connect(DB, "app_user") as app2:
            for _ in range(4):
                assert app2.execute("SELECT vetassist_auth.mfa_verify('jti-lock', %s)", (wrong,)).fetchone()[0] is False
            with app2.transaction():
                assert app2.execute("SELECT vetassist_auth.mfa_verify('jti-lock', %s)", (wrong,)).fetchone()[0] is False
                raise psycopg.Rollback()
            assert app2.execute("SELECT vetassist_auth.session_status('jti-lock'::text)").fetchone()[0] == "LOCKED"
        # The user's lock-out ends (a short one from now on); a fresh session of the user verifies again.
        with db.connect(DB) as owner:
            owner.execute(f"ALTER ROLE app_user IN DATABASE {DB} SET vetassist_auth.mfa_lockout = 1")
        app.execute("SELECT vetassist_auth.create_session(%s, 'jti-lock-2', now() + interval '1 hour')", (uid,))

        def verifies_again():
            with db.connect(DB, "app_user") as fresh:
                try:
                    return fresh.execute("SELECT vetassist_auth.mfa_verify('jti-lock-2', %s)", (authenticator_code(uri, 1),)).fetchone()[0]
                except psycopg.errors.InvalidAuthorizationSpecification:
                    return False
        wait_for("the user's lock-out to end", verifies_again)
        attempts = su.execute("""SELECT count(*) FROM vetassist_auth.audit_log a JOIN vetassist_auth.sessions s
                                 ON a.target_id = s.id::text WHERE s.jwt_id = 'jti-lock' AND a.event_type = 'mfa_attempt'""").fetchone()[0]
        with db.connect(DB, "app_user") as app3:
            # The locked session never has another code evaluated, the right one included.
            expect_sqlstate("28000", app3, "SELECT vetassist_auth.mfa_verify('jti-lock', %s)", (authenticator_code(uri),))
            assert app3.execute("SELECT vetassist_auth.session_status('jti-lock'::text)").fetchone()[0] == "LOCKED"
            # The next request's touch ends it for good.
            assert app3.execute("SELECT vetassist_auth.touch_session('jti-lock')").fetchone()[0] == "LOCKED"
        assert su.execute("SELECT status, end_reason FROM vetassist_auth.sessions WHERE jwt_id = 'jti-lock'").fetchone() \
            == ("LOCKED", "mfa_lockout")
        assert su.execute("""SELECT count(*) FROM vetassist_auth.audit_log a JOIN vetassist_auth.sessions s
                             ON a.target_id = s.id::text WHERE s.jwt_id = 'jti-lock' AND a.event_type = 'mfa_attempt'""").fetchone()[0] == attempts
    finally:
        with db.connect(DB) as owner:
            owner.execute(f"ALTER ROLE app_user IN DATABASE {DB} RESET vetassist_auth.mfa_lockout")


# Found by an adversary.

def test_a_disclosure_up_to_the_documented_size_is_recorded_and_one_over_is_refused(app, su):
    vet = veteran(app, "8100000013V1", tokens=None)
    # Two-byte characters (the limit is on stored bytes, not characters) and details: under 3 KiB.
    app.execute("SELECT vetassist_auth.record_disclosure(%s, repeat('é', 400), repeat('ü', 400), 'public_health', "
                "jsonb_build_object('note', repeat('x', 900)))", (vet,))
    expect_sqlstate("22023", app, "SELECT vetassist_auth.record_disclosure(%s, repeat('é', 1000), repeat('ü', 1000), "
                                  "'public_health')", (vet,))
    expect_sqlstate("22023", app, "SELECT vetassist_auth.record_disclosure(%s, 'Registry', 'Labs', 'public_health', "
                                  "jsonb_build_object('note', repeat('x', 3100)))", (vet,))
    assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE category = 'disclosure' AND subject_user_id = %s",
                      (vet,)).fetchone()[0] == 1


def test_a_statement_run_twice_is_redacted_in_the_log_both_times(db, app):
    vet = veteran(app, "8100000014V1", tokens=None)
    secret = f"Recipient-{uuid.uuid4().hex}"
    sql = f"SELECT vetassist_auth.record_disclosure('{vet}', '{secret}', 'HIV test result', 'no_such_purpose')"
    for _ in range(2):
        expect_sqlstate("22023", app, sql)
    # Each ERROR and its STATEMENT line reach server.log before the client gets the error.
    assert secret not in db.log()


def test_a_session_ended_after_a_repeatable_read_snapshot_discloses_nothing(db, app):
    signed_in(app, "8100000015V1", "jti-rr")
    with db.connect(DB, "app_user", autocommit=False) as rr:
        rr.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        assert rr.execute("SELECT vetassist_auth.session_status('jti-rr'::text)").fetchone()[0] == "ACTIVE"
        assert app.execute("SELECT vetassist_auth.end_session('jti-rr', 'logout')").fetchone()[0]
        with pytest.raises(psycopg.Error) as refused:
            rr.execute("SELECT * FROM vetassist_auth.my_disclosures('jti-rr')")
        assert refused.value.sqlstate in ("40001", "28000"), refused.value.sqlstate


def test_my_disclosures_read_names_the_actor_who_asked_for_it(app, su):
    vet, _ = signed_in(app, "8100000016V1", "jti-clerk")
    clerk = veteran(app, "8100000017V1", tokens=None)
    with app.transaction():
        app.execute("SELECT vetassist_auth.set_actor(%s)", (clerk,))
        app.execute("SELECT * FROM vetassist_auth.my_disclosures('jti-clerk')")
    row = su.execute("""SELECT actor_user_id, details ->> 'requested_by' FROM vetassist_auth.audit_log
                        WHERE event_type = 'my_disclosures_read' AND subject_user_id = %s""", (vet,)).fetchone()
    assert row == (vet, str(clerk))
