"""Sessions with real clients: crisis notifications, concurrency, the background sweeper."""
import concurrent.futures
import json
import re
import time

import pytest

from vetassist_testing import installed_cluster, sweeper_passes_since, wait_for


def new_user(conn, icn):
    return conn.execute("SELECT vetassist_auth.upsert_va_user(%s, 'veteran', NULL, NULL, NULL)", (icn,)).fetchone()[0]


def test_a_listening_responder_receives_the_crisis_notification(cluster, app):
    uid = new_user(app, "1012660000V000101")
    app.execute("SELECT vetassist_auth.create_session(%s, 'jwt-crisis', now() + interval '1 hour')", (uid,))
    with cluster.connect("vetassist", "auditor_user") as responder:
        responder.execute("LISTEN vetassist_auth_crisis")
        event_id = app.execute(
            "SELECT vetassist_auth.log_session_event('jwt-crisis', 'suicidal_ideation_reported', 'crisis', %s)",
            (json.dumps({"note": "PHI that must not travel"}),)).fetchone()[0]
        notes = list(responder.notifies(timeout=5, stop_after=1))
    assert len(notes) == 1
    payload = json.loads(notes[0].payload)
    assert payload["event_id"] == event_id and set(payload) == {"event_id", "session_id", "mac"}
    assert "PHI" not in notes[0].payload
    # The responder can tell the extension's payload from one any role could send.
    assert app.execute("SELECT vetassist_auth.verify_crisis_notice(%s)", (notes[0].payload,)).fetchone()[0]
    unsigned = {key: value for key, value in payload.items() if key != "mac"}
    for forged in ({**payload, "event_id": event_id + 1}, unsigned, {**payload, "mac": "00" * 36},
                   {**payload, "mac": payload["mac"].upper()}, {**payload, "severity": "info"},
                   {**payload, "event_id": f"000{event_id}"}, {**payload, "session_id": payload["session_id"].upper()}):
        assert not app.execute("SELECT vetassist_auth.verify_crisis_notice(%s)", (json.dumps(forged),)).fetchone()[0], forged


def test_session_status_takes_a_text_parameter_from_a_driver(app):
    uid = new_user(app, "1012660000V000102")
    app.execute("SELECT vetassist_auth.create_session(%s, 'jwt-param', now() + interval '1 hour')", (uid,))
    assert app.execute("SELECT vetassist_auth.session_status(%s::text)", ("jwt-param",)).fetchone()[0] == "ACTIVE"
    assert app.execute("SELECT vetassist_auth.touch_session(%s)", ("jwt-param",)).fetchone()[0] == "ACTIVE"


@pytest.mark.load
def test_concurrent_touches_and_sweeps_neither_deadlock_nor_lose_updates(cluster, su):
    with cluster.connect("vetassist", "app_user") as app:
        uid = new_user(app, "1012660000V000103")
        for i in range(200):
            app.execute("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 hour')", (uid, f"jwt-c-{i}"))
    # Half the sessions are overdue; the other half stay live and get touched concurrently.
    su.execute("""UPDATE vetassist_auth.sessions SET live_until = now() - interval '1 second'
                  WHERE jwt_id LIKE 'jwt-c-%' AND substr(jwt_id, 7)::int % 2 = 0""")
    su.execute("""UPDATE vetassist_auth.sessions SET last_activity_at = now() - interval '1 minute'
                  WHERE jwt_id LIKE 'jwt-c-%' AND substr(jwt_id, 7)::int % 2 = 1""")

    def toucher(worker):
        statuses = {}
        with cluster.connect("vetassist", "app_user") as conn:
            for i in range(worker, 200, 4):
                statuses[i] = conn.execute("SELECT vetassist_auth.touch_session(%s)", (f"jwt-c-{i}",)).fetchone()[0]
        return statuses

    def sweeper(_):
        total = 0
        with cluster.connect("vetassist", "app_user") as conn:
            for _ in range(20):
                total += conn.execute("SELECT vetassist_auth.expire_sessions(7)").fetchone()[0]
        return total

    with concurrent.futures.ThreadPoolExecutor(6) as pool:
        touches = [pool.submit(toucher, w) for w in range(4)]
        sweeps = [pool.submit(sweeper, s) for s in range(2)]
        statuses = {k: v for f in touches for k, v in f.result().items()}
        [s.result() for s in sweeps]
    # Odd sessions were live: always ACTIVE, and their touch was recorded (no lost update).
    assert all(statuses[i] == "ACTIVE" for i in range(1, 200, 2))
    # Even sessions were overdue: never reported ACTIVE, whoever got there first.
    assert all(statuses[i] == "EXPIRED" for i in range(0, 200, 2))
    rows = dict(su.execute("""SELECT status, count(*) FROM vetassist_auth.sessions WHERE jwt_id LIKE 'jwt-c-%'
                              GROUP BY 1""").fetchall())
    assert rows == {"ACTIVE": 100, "EXPIRED": 100}
    touched = su.execute("""SELECT count(*) FROM vetassist_auth.sessions WHERE jwt_id LIKE 'jwt-c-%'
                            AND status = 'ACTIVE' AND last_activity_at > now() - interval '30 seconds'""").fetchone()[0]
    assert touched == 100
    # Each expiry is audited exactly once, whether the sweep or a touch ended the session.
    audited = su.execute("""SELECT count(*) FROM vetassist_auth.audit_log a JOIN vetassist_auth.sessions s
                            ON a.target_id = s.id::text WHERE s.jwt_id LIKE 'jwt-c-%'
                            AND a.event_type = 'session_expired'""").fetchone()[0]
    assert audited == 100


def test_the_background_worker_sweeps_a_preloaded_cluster():
    with installed_cluster("sweeper", "vetassist_auth.sweep_database = 'vetassist'",
                           "vetassist_auth.sweep_interval = 1") as c:
        with c.connect("vetassist", "app_user") as app:
            uid = new_user(app, "1012660000V000104")
            app.execute("SELECT vetassist_auth.create_session(%s, 'jwt-bg', now() + interval '1 hour')", (uid,))
        with c.connect("vetassist") as su:
            su.execute("UPDATE vetassist_auth.sessions SET live_until = now() - interval '1 second'")
            wait_for("the sweeper to expire jwt-bg", lambda: su.execute(
                "SELECT status = 'EXPIRED' FROM vetassist_auth.sessions WHERE jwt_id = 'jwt-bg'").fetchone()[0])
            workers = su.execute("SELECT count(*) FROM pg_stat_activity WHERE backend_type = 'vetassist_auth sweeper'").fetchone()[0]
            assert workers == 1
            # Without the extension its passes write nothing and log nothing, and it keeps going.
            su.execute("DROP EXTENSION vetassist_auth")
            since = su.execute("SELECT now()").fetchone()[0]
            wait_for("a sweeper pass without the extension", sweeper_passes_since(c, since), timeout=10)
            su.execute("CREATE EXTENSION vetassist_auth")
        with c.connect("vetassist", "app_user") as app:
            uid = new_user(app, "1012660000V000105")
            app.execute("SELECT vetassist_auth.create_session(%s, 'jwt-bg2', now() + interval '1 hour')", (uid,))
        with c.connect("vetassist") as su:
            su.execute("UPDATE vetassist_auth.sessions SET live_until = now() - interval '1 second'")
            wait_for("the sweeper to expire jwt-bg2", lambda: su.execute(
                "SELECT status = 'EXPIRED' FROM vetassist_auth.sessions WHERE jwt_id = 'jwt-bg2'").fetchone()[0])
        with c.connect("vetassist") as su:
            # Only a postmaster shutdown stops the worker for good: terminated, it comes back.
            find = "SELECT pid FROM pg_stat_activity WHERE backend_type = 'vetassist_auth sweeper'"
            (pid,) = su.execute(find).fetchone()
            su.execute("SELECT pg_terminate_backend(%s)", (pid,))
            terminated = time.monotonic()
            while time.monotonic() - terminated < 15:
                row = su.execute(find).fetchone()
                if row and row[0] != pid:
                    break
                time.sleep(0.2)
            else:
                raise AssertionError("the sweeper did not come back within its restart interval")
        # The anchor for auditors, in the server log every interval (no PHI: a seq and a hash);
        # a pass that ran while the extension was dropped logs none, so the next one is awaited.
        anchor = r"LOG:  vetassist_auth audit chain head seq=\d+ hash=[0-9a-f]{64} timeline=\d+ lsn=[0-9A-F]+/[0-9A-F]+\n"
        wait_for("the audit chain head in the log", lambda: re.search(anchor, c.log()))
        log = c.log()
        assert "vetassist_auth sweeper: expire_sessions failed" not in log
        assert "terminated by signal" not in log and "server process" not in log
    # Stopped by the shutdown as every backend is (SIGTERM: Postgres's die()).
    assert 'terminating background worker "vetassist_auth sweeper" due to administrator command' in c.log()
