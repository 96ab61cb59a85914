"""`make demo`: a veteran signs in, end to end, against a throw-away cluster under target/.

Every step is a plain SQL call a backend would make as role vetassist_app; the superuser
only peeks at the tables to show what is (and is not) stored.
"""
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from vetassist_testing import PG_MAJOR, Cluster, authenticator_code  # noqa: E402

BOLD, DIM, GREEN, RED, RESET = "\033[1m", "\033[2m", "\033[32m", "\033[31m", "\033[0m"
if not sys.stdout.isatty():
    BOLD = DIM = GREEN = RED = RESET = ""
step_no = 0


def step(title):
    global step_no
    step_no += 1
    print(f"\n{BOLD}{step_no}. {title}{RESET}")


def say(text):
    print(f"   {text}")


def sql(text):
    print(f"   {DIM}> {text}{RESET}")


def main():
    step(f"Start a throw-away PostgreSQL {PG_MAJOR} cluster with a generated master key")
    c = Cluster("demo", "shared_preload_libraries = 'vetassist_auth'")
    key_mode = oct(os.stat(c.key_file).st_mode & 0o777)
    say(f"cluster: {c.dir}  (socket), port {c.port}")
    say(f"master key file: {c.key_file}  mode {key_mode}, owner postgres; the key is never a SQL argument")
    try:
        run(c)
    finally:
        if os.environ.get("KEEP"):
            say(f"\nKEEP=1: the cluster keeps running: psql 'host={c.dir} port={c.port} dbname=vetassist'")
        else:
            c.stop()
            print(f"\n{DIM}Cluster stopped (KEEP=1 make demo leaves it running).{RESET}")


def run(c):
    c.psql("CREATE DATABASE vetassist")
    c.psql("CREATE EXTENSION vetassist_auth", "vetassist")
    c.psql("CREATE ROLE vetassist_web LOGIN IN ROLE vetassist_app; CREATE ROLE privacy_officer LOGIN IN ROLE vetassist_auditor", "vetassist")
    # A short idle time-out for this demo's web role, so automatic logoff shows within seconds.
    c.psql("ALTER ROLE vetassist_web SET vetassist_auth.session_idle_timeout = '3s'", "vetassist")
    sql("CREATE EXTENSION vetassist_auth;")
    with c.connect("vetassist") as su:
        failed = su.execute("SELECT count(*) FILTER (WHERE NOT ok), count(*) FROM vetassist_auth.verify_installation()").fetchone()
    say(f"verify_installation(): {failed[1] - failed[0]} of {failed[1]} checks ok")

    app = c.connect("vetassist", "vetassist_web")
    su = c.connect("vetassist")

    step("VA.gov sign-in callback: link the veteran's identity (ICN) to an account")
    sql("SELECT vetassist_auth.upsert_va_user($icn, 'veteran', $email, $first, $last)")
    uid = app.execute("SELECT vetassist_auth.upsert_va_user(%s, 'veteran', %s, %s, %s)",
                      ("1012667985V123456", "Maria.Lopez@example.org", "Maria", "Lopez")).fetchone()[0]
    say(f"user id {uid}")
    row = su.execute("""SELECT octet_length(va_icn_encrypted), octet_length(email_hash),
                               position(convert_to('Lopez', 'UTF8') IN users::text::bytea) = 0
                        FROM vetassist_auth.users WHERE id = %s""", (uid,)).fetchone()
    say(f"stored: ICN as {row[0]} bytes of AES-256-GCM ciphertext, e-mail as a {row[1]}-byte keyed hash; "
        f"no clear PHI in the row: {GREEN}{row[2]}{RESET}")
    again = app.execute("SELECT vetassist_auth.find_user_by_icn(' 1012667985v123456 ')").fetchone()[0]
    say(f"find_user_by_icn (any spacing or case) finds the same account: {again == uid}")

    step("Store the VA OAuth tokens, encrypted under the token key")
    sql("SELECT vetassist_auth.store_va_tokens($user, $access, $refresh, now() + '1 hour', 'openid profile')")
    access = "eyJhbGciOiJSUzI1NiJ9.va-access-" + os.urandom(8).hex()
    gen = app.execute("SELECT vetassist_auth.store_va_tokens(%s, %s, %s, now() + interval '1 hour', 'openid profile')",
                      (uid, access, "va-refresh-" + os.urandom(8).hex())).fetchone()[0]
    back = app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0]
    say(f"generation {gen}; va_access_token() gives it back intact: {back == access} ({back[:18]}…)")
    due = app.execute("SELECT count(*) FROM vetassist_auth.va_tokens_due('2 hours')").fetchone()[0]
    say(f"va_tokens_due('2 hours') lists {due} user(s) for the refresher job")

    step("Create the application session for the JWT just issued")
    sql("SELECT vetassist_auth.create_session($user, $jti, now() + '1 day', $ip, $ua, $fingerprint)")
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-maria-1', now() + interval '1 day', '203.0.113.7', "
                "'Mozilla/5.0 (iPhone)', 'device-fp-9f3a')", (uid,))
    s = su.execute("SELECT expires_at - created_at, idle_timeout FROM vetassist_auth.sessions WHERE jwt_id = 'jti-maria-1'").fetchone()
    say(f"absolute lifetime capped at {s[0]} (asked for 1 day); idle time-out {s[1]} for this demo role (15 min by default)")
    say("IP address and device fingerprint stored only as keyed hashes")

    step("MFA: enrol TOTP, confirm it, then verify the session")
    uri = app.execute("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uid,)).fetchone()[0]
    say(f"enrolment URI for the QR code: {uri.split('secret=')[0]}secret=…")
    ok = app.execute("SELECT vetassist_auth.mfa_confirm_totp(%s, %s)", (uid, authenticator_code(uri))).fetchone()[0]
    say(f"mfa_confirm_totp with the app's current code: {ok}")
    need = app.execute("SELECT vetassist_auth.mfa_required('jti-maria-1')").fetchone()[0]
    say(f"mfa_required('jti-maria-1'): {need}")
    replay = app.execute("SELECT vetassist_auth.mfa_verify('jti-maria-1', %s)", (authenticator_code(uri),)).fetchone()[0]
    say(f"the same code again is refused (replay): {RED if replay else GREEN}{not replay}{RESET}")
    # The phone's clock runs a little ahead: the next 30-second code is still inside the window.
    ok = app.execute("SELECT vetassist_auth.mfa_verify('jti-maria-1', %s)", (authenticator_code(uri, 1),)).fetchone()[0]
    say(f"mfa_verify with the next code: {GREEN}{ok}{RESET}; mfa_required now: "
        f"{app.execute('SELECT vetassist_auth.mfa_required(%s)', ('jti-maria-1',)).fetchone()[0]}")
    codes = app.execute("SELECT vetassist_auth.mfa_generate_backup_codes(%s, 5)", (uid,)).fetchone()[0]
    say(f"5 backup codes shown once, e.g. {codes[0]}; only keyed hashes are kept")

    step("Requests: one call per request validates the session and names who is acting")
    sql("BEGIN; SELECT * FROM vetassist_auth.authenticate($jti, $client_ip); …the request's calls…; COMMIT")
    for path in ("/health-records", "/appointments", "/messages"):
        with app.transaction():
            status, _, _, _, mfa_required, idle_until, _ = app.execute(
                "SELECT * FROM vetassist_auth.authenticate('jti-maria-1', '203.0.113.7')").fetchone()
            app.execute("SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', %s)",
                        (json.dumps({"path": path}),))
        say(f"GET {path:16} authenticate → {status}, MFA required: {mfa_required}, idle until {idle_until:%H:%M:%S}; "
            "audit_event carries actor, session and hashed IP")
    profile = app.execute("SELECT first_name, email FROM vetassist_auth.user_profile(%s)", (uid,)).fetchone()
    say(f"user_profile() decrypts for display ({profile[0]}, {profile[1]}) and is audited as a PHI disclosure")

    step("Disclosures: a caregiver views Maria's chart; the clinic reports her immunizations to the state")
    nurse = app.execute("SELECT vetassist_auth.upsert_va_user('1012667985V654321', 'caregiver', NULL, 'Ana', 'Ruiz')").fetchone()[0]
    with app.transaction():
        app.execute("SELECT vetassist_auth.set_actor(%s)", (nurse,))
        sql("SELECT vetassist_auth.audit_event('phi', 'chart_viewed', 'success', '{}', $maria)")
        app.execute("SELECT vetassist_auth.audit_event('phi', 'chart_viewed', 'success', '{}', %s)", (uid,))
        sql("SELECT vetassist_auth.record_disclosure($maria, 'State immunization registry', "
            "'Immunization history', 'public_health')")
        app.execute("SELECT vetassist_auth.record_disclosure(%s, 'State immunization registry', "
                    "'Immunization history', 'public_health')", (uid,))
        app.execute("SELECT vetassist_auth.record_disclosure(%s, 'Dr. Okafor, cardiology referral', "
                    "'Visit notes', 'treatment')", (uid,))
    say("the rows name Maria as their subject and the caregiver as their actor; record_disclosure commits "
        "before it returns, whatever the application's transaction does next")
    mine = app.execute("SELECT count(*), count(*) FILTER (WHERE accountable) FROM vetassist_auth.my_disclosures('jti-maria-1')").fetchone()
    say(f"my_disclosures('jti-maria-1') for Maria's own 'who saw my record' page: {mine[0]} entries, "
        f"{mine[1]} of them accountable under 164.528")

    step("A crisis event reaches a listening responder at once")
    with c.connect("vetassist", "privacy_officer") as responder:
        responder.execute("LISTEN vetassist_auth_crisis")
        app.execute("SELECT vetassist_auth.log_session_event('jti-maria-1', 'crisis_line_requested', 'crisis', %s)",
                    (json.dumps({"screen": "PHQ-9 item 9"}),))
        note = next(responder.notifies(timeout=5, stop_after=1))
    say(f"NOTIFY {note.channel}: {note.payload}  (ids only, no PHI)")

    step("HIPAA automatic logoff: idle past the time-out")
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-maria-2', now() + interval '1 day')", (uid,))
    say("a second session (another tab) is left alone; waiting 4 s …")
    time.sleep(4)
    status = app.execute("SELECT vetassist_auth.touch_session('jti-maria-1')").fetchone()[0]
    say(f"touch_session('jti-maria-1') → {RED}{status}{RESET}: never ACTIVE past the idle time-out")
    swept = app.execute("SELECT vetassist_auth.expire_sessions()").fetchone()[0]
    say(f"expire_sessions() ended {swept} more overdue session(s) in its batch "
        f"(the background worker or pg_cron runs this every minute)")

    step("Logout: end the session, delete the VA tokens")
    app.execute("SELECT vetassist_auth.create_session(%s, 'jti-maria-3', now() + interval '1 day')", (uid,))
    ended = app.execute("SELECT vetassist_auth.end_session('jti-maria-3', 'logout')").fetchone()[0]
    gone = app.execute("SELECT vetassist_auth.delete_va_tokens(%s)", (uid,)).fetchone()[0]
    say(f"end_session → {ended}; delete_va_tokens → {gone}; touch now says "
        f"{app.execute('SELECT vetassist_auth.touch_session(%s)', ('jti-maria-3',)).fetchone()[0]}")

    step("Seal the audit log into its HMAC chain (the background worker does this every minute)")
    with c.connect("vetassist") as admin:
        sealed = admin.execute("SELECT vetassist_auth.seal_audit_log()").fetchone()[0]
    say(f"seal_audit_log() sealed {sealed} rows of finished transactions")

    step("The audit trail a privacy officer sees")
    with c.connect("vetassist", "privacy_officer") as officer:
        ok, checked, _, problem = officer.execute("SELECT * FROM vetassist_auth.verify_audit_chain()").fetchone()
        say(f"verify_audit_chain(): ok={GREEN if ok else RED}{ok}{RESET}, {checked} rows checked"
            + (f", {problem}" if problem else ""))
        rows = officer.execute("""SELECT category, event_type, count(*) FROM vetassist_auth.audit_log
                                  WHERE subject_user_id = %s AND category <> 'data'
                                  GROUP BY 1, 2 ORDER BY 1, 2""", (uid,)).fetchall()
        for category, event, n in rows:
            say(f"{category:10} {event:26} {n}")
        say("every access to and disclosure of Maria's PHI today (phi_disclosures):")
        for when, by, description, recipient, purpose, accountable in officer.execute(
                """SELECT occurred_at, recorded_by, description, recipient, purpose, accountable
                   FROM vetassist_auth.phi_disclosures(%s, now() - interval '1 day', now() + interval '1 minute')""",
                (uid,)).fetchall():
            say(f"  {when:%H:%M:%S}  {by:11} {description:32.32} {recipient or '':30.30} {purpose or '':14} "
                f"{'accountable' if accountable else ''}")
        say("the accounting of disclosures Maria would receive on request (45 CFR 164.528(b)(2)):")
        for when, recipient, description, purpose in officer.execute(
                "SELECT * FROM vetassist_auth.accounting_of_disclosures(%s)", (uid,)).fetchall():
            say(f"  {when:%Y-%m-%d}  {recipient} — {description} — {purpose}")
        leaked = officer.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE audit_log::text LIKE %s",
                                 (f"%{access}%",)).fetchone()[0]
        say(f"token bytes anywhere in the audit log: {GREEN if leaked == 0 else RED}{leaked}{RESET}")
    app.close()
    su.close()
    print(f"\n{GREEN}{BOLD}Demo complete.{RESET}")


if __name__ == "__main__":
    main()
