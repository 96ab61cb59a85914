"""A logical replica configured like its primary (docs/ARCHITECTURE.md, "Replicas and failover"): the library preloaded and its
own sweep_database, so maintenance runs after a failover. Until vetassist_auth.promote() declares
the failover, nothing of ours writes the extension's tables there: the replication keeps every
row of the primary, and the application's writes are refused with 55000."""
import time

import psycopg
import pytest

from vetassist_testing import Cluster, expect_sqlstate, install, installed_cluster

SWEEPER = ("vetassist_auth.sweep_database = 'vetassist'", "vetassist_auth.sweep_interval = 1")
TABLES = ("users", "va_tokens", "sessions", "session_routes", "session_activity", "audit_log", "audit_seals", "keys")


def restart(cluster):
    """Restarts a cluster, so its sweeper connects to the database created after it started
    (rather than waiting for its restart interval)."""
    cluster.as_postgres(str(cluster.bin / "pg_ctl"), "-D", str(cluster.dir / "data"), "-l", str(cluster.dir / "server.log"),
                        "-w", "restart")


def poll(what, check, timeout=90):
    """Polls `check` until it returns a true value, which it returns; fails after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(what)
        time.sleep(0.1)


def counts(cluster):
    with cluster.connect("vetassist") as su:
        return {t: su.execute(f"SELECT count(*) FROM vetassist_auth.{t}").fetchone()[0] for t in TABLES}


def unsealed(cluster):
    with cluster.connect("vetassist") as su:
        return su.execute("SELECT count(*) FROM vetassist_auth.audit_log a "
                          "WHERE NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_seals s WHERE s.audit_id = a.id)").fetchone()[0]


def sweeper_passes(cluster, since):
    """The sweeper passes logged since byte `since` of the server log: a chain head line each, on a
    subscriber too (where the pass writes nothing)."""
    return cluster.log()[since:].count("vetassist_auth audit chain head")


def traffic(cluster, n):
    """One round of an application's work: a sign-in, a session, its activity, tokens and their
    disclosure, and free-form audit events."""
    with cluster.connect("vetassist", "app_user") as app:
        uid = app.execute("SELECT vetassist_auth.upsert_va_user(%s, 'veteran', %s, 'Rep', 'Lica')",
                          (f"99000003{n:02d}V1", f"rep{n}@example.org")).fetchone()[0]
        app.execute("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 hour')", (uid, f"jwt-rep-{n}"))
        app.execute("SELECT vetassist_auth.touch_session(%s)", (f"jwt-rep-{n}",))
        app.execute("SELECT vetassist_auth.store_va_tokens(%s, 'access', 'refresh', now() + interval '1 hour', NULL)", (uid,))
        assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0] == "access"
        for _ in range(5):
            app.execute("SELECT vetassist_auth.audit_event('phi', 'viewed', 'success', '{}')")
    return uid


def refused(conn, sql, *args):
    with pytest.raises(psycopg.Error) as err:
        conn.execute(sql, args)
    assert err.value.sqlstate == "55000", err.value
    assert "subscriber" in str(err.value)


def node_role_check(conn):
    return conn.execute("SELECT ok, detail FROM vetassist_auth.verify_installation() "
                        "WHERE check_name = 'replication: node role'").fetchone()


def test_a_subscriber_with_its_own_sweeper_keeps_replicating_until_promote():
    with installed_cluster("rep-primary", "wal_level = logical", *SWEEPER) as primary:
        replica = Cluster("rep-replica", "shared_preload_libraries = 'vetassist_auth'", *SWEEPER)
        try:
            install(replica)
            # The replica opens the same data keys: the same master key file.
            replica.as_postgres("cp", str(primary.key_file), str(replica.key_file))
            restart(primary)
            restart(replica)
            uid = traffic(primary, 0)
            primary.psql("CREATE PUBLICATION vetassist_pub FOR TABLES IN SCHEMA vetassist_auth", "vetassist")
            replica.psql(f"CREATE SUBSCRIPTION vetassist_sub CONNECTION 'host={primary.dir} port={primary.port} "
                         "dbname=vetassist user=postgres' PUBLICATION vetassist_pub", "vetassist")

            # Several rounds, each over several sweep intervals of both nodes: the primary writes
            # and seals, the replica receives every row and writes none of its own.
            for n in range(1, 4):
                traffic(primary, n)
                poll("the primary's sweeper did not seal", lambda: unsealed(primary) == 0)
                since = len(replica.log())
                poll("the replica's sweeper made no pass", lambda: sweeper_passes(replica, since) >= 2)
                poll(f"round {n}: the replica never caught up (its log: {replica.log()[-2000:]})",
                     lambda: counts(replica) == counts(primary))
            assert "audit_seals_pkey" not in replica.log()
            assert "duplicate key" not in replica.log()
            with replica.connect("vetassist") as rsu:
                assert rsu.execute("SELECT vetassist_auth.node_role()").fetchone()[0] == "subscriber"
                ok, detail = node_role_check(rsu)
                assert ok and "subscriber" in detail and "vetassist_sub" in detail, detail

            # The application cannot write on the subscriber, nor read what would be disclosed.
            with replica.connect("vetassist", "app_user") as app:
                refused(app, "SELECT vetassist_auth.upsert_va_user('9900000399V1', 'veteran', 'x@example.org', 'X', 'Y')")
                refused(app, "SELECT vetassist_auth.audit_event('phi', 'viewed', 'success', '{}')")
                refused(app, "SELECT vetassist_auth.va_access_token(%s)", uid)
                refused(app, "SELECT vetassist_auth.touch_session('jwt-rep-1')")
                # Reads that disclose nothing still work.
                assert app.execute("SELECT vetassist_auth.session_status('jwt-rep-1'::text)").fetchone()[0] == "ACTIVE"
            with replica.connect("vetassist", "admin_user") as admin:
                refused(admin, "SELECT vetassist_auth.rotate_key('phi')")
                refused(admin, "SELECT vetassist_auth.expire_sessions()")
            with replica.connect("vetassist") as rsu:
                refused(rsu, "SELECT vetassist_auth.seal_audit_log()")
            assert counts(replica) == counts(primary)

            # Failover: the primary is gone; promote() declares it.
            primary.stop()
            with replica.connect("vetassist", "admin_user") as admin:
                steps = admin.execute("SELECT action, detail FROM vetassist_auth.promote()").fetchall()
                actions = [a for a, _ in steps]
                assert "subscription disabled" in actions, steps
                assert "sequence moved" in actions, steps
                assert "key rotated" in actions, steps
                assert admin.execute("SELECT vetassist_auth.node_role()").fetchone()[0] == "primary"
                ok, detail = node_role_check(admin)
                assert ok and detail.startswith("primary"), detail
            with replica.connect("vetassist") as rsu:
                assert rsu.execute("SELECT subenabled FROM pg_subscription WHERE subname = 'vetassist_sub'").fetchone()[0] is False
            # Writes work, sealing resumes, the chain verifies.
            since = len(replica.log())
            with replica.connect("vetassist", "app_user") as app:
                after = app.execute("SELECT vetassist_auth.upsert_va_user('9900000398V1', 'veteran', 'after@example.org', 'Af', 'Ter')").fetchone()[0]
                assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0] == "access"
                assert app.execute("SELECT vetassist_auth.touch_session('jwt-rep-1')").fetchone()[0] == "ACTIVE"
                assert after is not None
            poll("sealing did not resume on the promoted node",
                 lambda: unsealed(replica) == 0 and "vetassist_auth audit chain head" in replica.log()[since:])
            with replica.connect("vetassist", "auditor_user") as auditor:
                ok, problem = auditor.execute("SELECT ok, problem FROM vetassist_auth.verify_audit_chain()").fetchone()
                assert ok, problem
            assert "audit_seals_pkey" not in replica.log()
        finally:
            replica.stop()


def test_node_role_setting_declares_a_subscriber_until_promote():
    """A replica the extension cannot see (replication by another tool): node_role = 'subscriber',
    until promote() (which only vetassist_admin may run)."""
    with installed_cluster("rep-setting") as c:
        c.set_conf("vetassist_auth.node_role", "subscriber")
        with c.connect("vetassist") as su:
            assert su.execute("SELECT vetassist_auth.node_role()").fetchone()[0] == "subscriber"
            ok, detail = node_role_check(su)
            assert ok and "vetassist_auth.node_role" in detail, detail
        with c.connect("vetassist", "app_user") as app:
            refused(app, "SELECT vetassist_auth.audit_event('phi', 'viewed', 'success', '{}')")
        with c.connect("vetassist", "outsider") as outsider:
            expect_sqlstate("42501", outsider, "SELECT vetassist_auth.promote()")
        with c.connect("vetassist", "admin_user") as admin:
            admin.execute("SELECT * FROM vetassist_auth.promote()")
        with c.connect("vetassist", "app_user") as app:
            app.execute("SELECT vetassist_auth.audit_event('phi', 'viewed', 'success', '{}')")
            assert app.execute("SELECT vetassist_auth.node_role()").fetchone()[0] == "primary"
        with c.connect("vetassist", "auditor_user") as auditor:
            assert auditor.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE event_type = 'node_promoted'").fetchone()[0] == 1
        c.set_conf("vetassist_auth.node_role", "auto")
        with c.connect("vetassist", "app_user") as app:  # still the primary it was promoted to
            app.execute("SELECT vetassist_auth.audit_event('phi', 'viewed', 'success', '{}')")
