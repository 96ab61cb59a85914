"""`make citus-demo`: the sign-in journey of `make demo` for several veterans, through the
coordinator of a throw-away Citus cluster (a coordinator and two workers on localhost, under
target/clusters/citus-demo-*), showing where each veteran's rows live.

Every veteran call is a plain SQL call as role vetassist_app on the coordinator.
"""
import os
import sys
from pathlib import Path

import psycopg

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from vetassist_testing import authenticator_code, citus_cluster  # noqa: E402
from demo import DIM, GREEN, RED, RESET, say, sql, step  # noqa: E402

NAME, DB = "citus-demo", "vetassist"
VETERANS = [("1012667985V123456", "maria@example.com", "Maria", "Lopez"),
            ("1012667986V223344", "james@example.com", "James", "Carter"),
            ("1012667987V334455", "aisha@example.com", "Aisha", "Reed"),
            ("1012667988V445566", "tom@example.com", "Tom", "Nguyen")]


def main():
    step("Start a coordinator and two workers (one master key file, shared_preload_libraries = 'citus,vetassist_auth')")
    nodes = citus_cluster("start", NAME, 2, DB)
    for role, port, socket_dir in nodes:
        say(f"{role:<11} 127.0.0.1:{port}  {socket_dir}")
    _, port, socket_dir = nodes[0]
    try:
        run(lambda user: psycopg.connect(f"host={socket_dir} port={port} dbname={DB} user={user}", autocommit=True))
    finally:
        if os.environ.get("KEEP"):
            say(f"\nKEEP=1: the cluster keeps running: psql 'host={socket_dir} port={port} dbname={DB}'")
        else:
            citus_cluster("stop", NAME)
            print(f"\n{DIM}Cluster stopped (KEEP=1 make citus-demo leaves it running).{RESET}")


def run(connect):
    with connect("postgres") as su:
        su.execute("CREATE EXTENSION vetassist_auth")
        su.execute("CREATE ROLE vetassist_web LOGIN IN ROLE vetassist_app")
        su.execute("CREATE ROLE key_officer LOGIN IN ROLE vetassist_admin")
        su.execute("CREATE ROLE privacy_officer LOGIN IN ROLE vetassist_auditor")
        sql("CREATE EXTENSION vetassist_auth;  -- on the coordinator; Citus creates it on every worker")
        step("Distribute the tables with one call")
        sql("SELECT vetassist_auth.distribute();")
        tables = [r[0] for r in su.execute("SELECT vetassist_auth.distribute()")]
        say(f"distributed: {', '.join(t.removeprefix('vetassist_auth.') for t in tables)}")
        say("per-veteran tables co-located by user id; keys replicated to every node; session_routes by jwt_id")

    with connect("vetassist_web") as app, connect("postgres") as su:
        for n, (icn, email, first, last) in enumerate(VETERANS, 1):
            step(f"{first} signs in through the coordinator")
            uid = app.execute("SELECT vetassist_auth.upsert_va_user(%s, 'veteran', %s, %s, %s)",
                              (icn, email, first, last)).fetchone()[0]
            app.execute("SELECT vetassist_auth.store_va_tokens(%s, %s, %s, now() + interval '1 hour', 'openid')",
                        (uid, f"va-access-{n}", f"va-refresh-{n}"))
            jti = f"jti-{first.lower()}-1"
            app.execute("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 day', '203.0.113.7')",
                        (uid, jti))
            uri = app.execute("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uid,)).fetchone()[0]
            app.execute("SELECT vetassist_auth.mfa_confirm_totp(%s, %s)", (uid, authenticator_code(uri)))
            # From here on, a statement that asked more than one shard would fail the call.
            app.execute("SET citus.multi_task_query_log_level = error")
            verified = app.execute("SELECT vetassist_auth.mfa_verify(%s, %s)",
                                   (jti, authenticator_code(uri, 1))).fetchone()[0]
            status = app.execute("SELECT vetassist_auth.touch_session(%s)", (jti,)).fetchone()[0]
            token = app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0]
            app.execute("SELECT vetassist_auth.set_actor(%s, '203.0.113.7')", (uid,))
            app.execute("SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', '{}')")
            ended = app.execute("SELECT vetassist_auth.end_session(%s, 'logout')", (jti,)).fetchone()[0]
            app.execute("RESET citus.multi_task_query_log_level")
            shard, node = su.execute("SELECT * FROM vetassist_auth.veteran_placement(%s)", (uid,)).fetchone()
            say(f"user {uid}: tokens, session, MFA verified={verified}, touch={status}, "
                f"token read back={'yes' if token == f'va-access-{n}' else 'NO'}, logout={ended}")
            say(f"{GREEN}rows on shard {shard} on worker {node}{RESET}; every call after sign-in asked that shard only")

    step("Rotate the token key on the coordinator; reencrypt moves every worker's values")
    with connect("key_officer") as admin:
        sql("SELECT vetassist_auth.rotate_key('token'); SELECT vetassist_auth.reencrypt();")
        new_key = admin.execute("SELECT vetassist_auth.rotate_key('token')").fetchone()[0]
        moved = 0
        while (batch := admin.execute("SELECT vetassist_auth.reencrypt()").fetchone()[0]) > 0:
            moved += batch
        say(f"new token key {new_key}; {moved} rows re-encrypted on the workers, from the coordinator")
        sql("SELECT vetassist_auth.seal_audit_log(); SELECT vetassist_auth.seal_worker_audit_logs();")
        while admin.execute("SELECT vetassist_auth.seal_audit_log()").fetchone()[0] > 0:
            pass
        admin.execute("SELECT vetassist_auth.seal_worker_audit_logs()")

    step("A privacy officer verifies every node's audit chain from the coordinator")
    with connect("privacy_officer") as officer:
        sql("SELECT * FROM vetassist_auth.verify_audit_chain();")
        ok, checked, bad, problem = officer.execute("SELECT * FROM vetassist_auth.verify_audit_chain()").fetchone()
        colour = GREEN if ok else RED
        say(f"{colour}ok={ok}{RESET}: {checked} sealed rows checked on the coordinator and both workers"
            + (f"; first bad seq {bad}: {problem}" if not ok else ""))
        sql("SELECT * FROM vetassist_auth.audit_chain_heads();  -- one anchor per node, to keep outside")
        for node, seq, digest, _ in officer.execute("SELECT * FROM vetassist_auth.audit_chain_heads()"):
            say(f"{node:<16} seq {seq:>4}  {digest.hex()[:16]}...")


if __name__ == "__main__":
    main()
