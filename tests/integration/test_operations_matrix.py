"""Every standard PostgreSQL operation against every background process of ours: stop modes and
terminations while the sweeper seals, while a reserved or a dynamic recorder writes, worker-slot
pressure from parallel query, and the exactly-once record of disclosures under terminations.
Each case is a DBA's procedure that broke on 0.1.5 (docs/ARCHITECTURE.md, "Background worker").
Durations are printed (pytest -s), never asserted. The other supported versions run the cases
whose code differs by version (signals, hooks, recovery); the default version runs them all."""
import re
import subprocess
import threading
import time
import uuid

import psycopg
import pytest

from vetassist_testing import Cluster, PG_MAJOR, free_port, install, installed_cluster, sweeper_passes_since, veteran, wait_for

SWEEPER = "vetassist_auth sweeper"
RECORDER = "vetassist_auth recorder"
RESERVED = "vetassist_auth reserved recorder"


def pids(conn, backend_type, dbname=None):
    return [r[0] for r in conn.execute(
        "SELECT pid FROM pg_stat_activity WHERE backend_type = %s AND (%s::text IS NULL OR datname = %s) ORDER BY pid",
        (backend_type, dbname, dbname)).fetchall()]


def backlog(cluster, rows, dbname="vetassist"):
    """`rows` unsealed audit rows, committed."""
    with cluster.connect(dbname, "app_user") as app:
        app.execute("SELECT count(vetassist_auth.audit_event('phi', 'viewed', 'success', '{}')) "
                    "FROM generate_series(1, %s)", (rows,))


def sweeper_sealing(cluster):
    """The sweeper's pid once it is inside seal_audit_log."""
    with cluster.connect() as su:
        row = su.execute("SELECT pid FROM pg_stat_activity WHERE backend_type = %s AND state = 'active' "
                         "AND query LIKE '%%seal_audit_log%%'", (SWEEPER,)).fetchone()
    return row and row[0]


def pg_ctl_stop(cluster, mode):
    started = time.monotonic()
    out = subprocess.run(["sudo", "-u", "postgres", str(cluster.bin / "pg_ctl"), "-D", str(cluster.dir / "data"),
                          "-m", mode, "-t", "60", "-w", "stop"], capture_output=True, text=True)
    return out, time.monotonic() - started


@pytest.mark.parametrize("mode", ["smart", "fast"])
def test_a_stop_ends_the_sweeper_in_the_middle_of_sealing(mode):
    """0.1.5: `pg_ctl stop -m fast` hung while the sweeper sealed (its loop swallowed the SIGTERM),
    and only -m immediate ended the server."""
    with installed_cluster(f"stop-{mode}", "vetassist_auth.sweep_database = 'vetassist'",
                           "vetassist_auth.sweep_interval = 1") as cluster:
        backlog(cluster, 60_000)
        wait_for("the sweeper to seal", lambda: sweeper_sealing(cluster))
        out, took = pg_ctl_stop(cluster, mode)
        print(f"\npg_ctl stop -m {mode} while sealing: {took:.2f} s")
        assert out.returncode == 0, out.stdout + out.stderr
        assert "parallel worker failed to initialize" not in cluster.log()


def test_terminating_the_sweeper_in_the_middle_of_sealing_removes_it_and_it_comes_back():
    with installed_cluster("terminate-sweeper", "vetassist_auth.sweep_database = 'vetassist'",
                           "vetassist_auth.sweep_interval = 1") as cluster:
        backlog(cluster, 60_000)
        pid = wait_for("the sweeper to seal", lambda: sweeper_sealing(cluster))
        with cluster.connect() as su:
            started = time.monotonic()
            # Waits until the process is gone, or says false after 60 s.
            assert su.execute("SELECT pg_terminate_backend(%s, 60000)", (pid,)).fetchone()[0]
            print(f"\npg_terminate_backend(sweeper) while sealing: {time.monotonic() - started:.2f} s")
            assert pid not in pids(su, SWEEPER)
            # Postgres starts it again (RESTART_AFTER) and it finishes the backlog.
            wait_for("a new sweeper", lambda: pids(su, SWEEPER))
        with cluster.connect("vetassist") as su:
            wait_for("the backlog sealed", lambda: su.execute(
                "SELECT NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_log l WHERE NOT EXISTS "
                "(SELECT 1 FROM vetassist_auth.audit_seals s WHERE s.audit_id = l.id))").fetchone()[0])
            ok, _, _, problem = su.execute("SELECT * FROM vetassist_auth.verify_audit_chain()").fetchone()
            assert ok, problem


def disclose(app, uid):
    return app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0]


def disclosures(su, uid):
    return su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE subject_user_id = %s "
                      "AND event_type = 'va_access_token_read'", (uid,)).fetchone()[0]


def test_a_terminated_reserved_recorder_comes_back_even_after_a_dynamic_one_stood_in():
    """0.1.5: terminated while a disclosure started a dynamic recorder for its database, the
    resident recorder found its entry taken, exited with status 0 and was never started again."""
    with installed_cluster("reserved-back", "vetassist_auth.sweep_database = 'vetassist'") as cluster:
        with cluster.connect("vetassist", "app_user") as app, cluster.connect("vetassist") as su:
            uid = veteran(app, "8100000001V1")
            first = wait_for("the reserved recorder", lambda: pids(su, RESERVED, "vetassist"))[0]
            assert su.execute("SELECT pg_terminate_backend(%s, 60000)", (first,)).fetchone()[0]
            # Before the postmaster starts it again (1 s), a disclosure starts a dynamic recorder.
            assert disclose(app, uid) == "VA-ACCESS"
            again = wait_for("the reserved recorder again",
                             lambda: [p for p in pids(su, RESERVED, "vetassist") if p != first])
            assert again
            for _ in range(3):
                assert disclose(app, uid) == "VA-ACCESS"
            assert disclosures(su, uid) == 4


@pytest.mark.load
def test_every_returned_disclosure_is_recorded_exactly_once_while_recorders_are_terminated():
    """0.1.5: a recorder that failed to claim its entry put the running recorder's rows back in the
    queue: disclosures recorded twice (and MFA failures counted twice toward the lock-out). Each
    call names itself as the actor (a call id): a call that returned has exactly one record, one
    that raised at most one."""
    with installed_cluster("exactly-once", "vetassist_auth.sweep_database = 'vetassist'") as cluster:
        with cluster.connect("vetassist", "app_user") as app:
            uids = [veteran(app, f"8200000{i:03d}V1") for i in range(4)]
        returned, raised = [], []
        done = threading.Event()

        def client(uid):
            with cluster.connect("vetassist", "app_user") as app:
                for _ in range(60):
                    call = uuid.uuid4()
                    try:
                        with app.transaction():
                            app.execute("SELECT vetassist_auth.set_actor(%s)", (call,))
                            disclose(app, uid)
                        returned.append(call)
                    except psycopg.Error:
                        raised.append(call)

        def terminator():
            with cluster.connect() as su:
                while not done.is_set():
                    su.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE backend_type IN (%s, %s)",
                               (RECORDER, RESERVED))
                    time.sleep(0.05)  # load only: the assertions do not depend on its timing

        killer = threading.Thread(target=terminator)
        killer.start()
        clients = [threading.Thread(target=client, args=(uid,)) for uid in uids]
        for t in clients:
            t.start()
        for t in clients:
            t.join()
        done.set()
        killer.join()
        with cluster.connect("vetassist") as su:
            records = dict(su.execute("SELECT actor_user_id, count(*) FROM vetassist_auth.audit_log "
                                      "WHERE event_type = 'va_access_token_read' GROUP BY 1").fetchall())
        assert [c for c in returned if records.get(c) != 1] == []
        assert [c for c in raised if records.get(c, 0) > 1] == []
        assert sum(records.values()) <= len(returned) + len(raised)
        print(f"\nunder terminations: {len(returned)} returned, {len(raised)} raised, "
              f"{sum(records.get(c, 0) for c in raised)} of the raised recorded")


def sleep_until_cancelled(conn, seconds):
    try:
        conn.execute("SELECT pg_sleep(%s)", (seconds,))
    except psycopg.errors.QueryCanceled:
        pass


def parallel_sleepers(cluster, dbname, count, seconds):
    """`count` sessions, each holding a parallel worker for `seconds` (as a reporting query would)."""
    setting = "force_parallel_mode" if PG_MAJOR < 16 else "debug_parallel_query"
    conns = [cluster.connect(dbname) for _ in range(count)]
    threads = []
    for conn in conns:
        conn.execute(f"SET {setting} = on")
        t = threading.Thread(target=sleep_until_cancelled, args=(conn, seconds), daemon=True)
        t.start()
        threads.append(t)
    return conns, threads


@pytest.mark.load
def test_parallel_query_cannot_starve_the_recorders_of_the_named_databases():
    """0.1.5: with the default max_worker_processes = 8, a few parallel queries in another database
    made every disclosure of a second extension database fail with 53000."""
    with installed_cluster("slots", "vetassist_auth.sweep_database = 'vetassist'",
                           "vetassist_auth.databases = 'vetassist, second'",
                           "max_worker_processes = 8", "max_parallel_workers = 8") as cluster:
        install(cluster, "second")
        install(cluster, "unnamed")
        cluster.psql("CREATE DATABASE reports")
        with cluster.connect("second", "app_user") as app, cluster.connect() as su:
            uid = veteran(app, "8300000001V1")
            wait_for("the reserved recorders", lambda: len(pids(su, RESERVED)) == 2)
            # The dynamic recorder that created the first keys leaves after a second idle: then
            # four of the eight slots are ours (sweeper, two recorders) or the replication
            # launcher's, and the parallel queries can take the other four.
            wait_for("the dynamic recorder to leave", lambda: not pids(su, RECORDER))
            conns, threads = parallel_sleepers(cluster, "reports", 8, 30)
            try:
                # Every slot left is a parallel worker now.
                wait_for("the parallel workers", lambda: su.execute(
                    "SELECT count(*) >= 4 FROM pg_stat_activity WHERE backend_type = 'parallel worker'").fetchone()[0])
                for _ in range(5):
                    assert disclose(app, uid) == "VA-ACCESS"
                with cluster.connect("unnamed", "admin_user") as other:
                    detail = other.execute("SELECT detail FROM vetassist_auth.verify_installation() "
                                           "WHERE check_name LIKE 'audit: disclosures%'").fetchone()[0]
                    assert "no recorder is reserved for this database" in detail
            finally:
                for conn in conns:
                    su.execute("SELECT pg_cancel_backend(%s)", (conn.info.backend_pid,))
                for t in threads:
                    t.join()
                for conn in conns:
                    conn.close()


def test_verify_installation_fails_when_a_named_database_gets_no_recorder():
    """0.1.5: with too few worker slots every disclosure failed with 53000 while
    verify_installation() reported nothing."""
    with installed_cluster("no-slot", "vetassist_auth.databases = 'postgres, vetassist'",
                           "max_worker_processes = 1") as cluster:
        with cluster.connect("vetassist", "admin_user") as admin:
            ok, detail = admin.execute("SELECT ok, detail FROM vetassist_auth.verify_installation() "
                                       "WHERE check_name LIKE 'audit: disclosures%'").fetchone()
            assert not ok
            assert "max_worker_processes" in detail


def pg_tool(cluster, *args):
    return subprocess.run(["sudo", "-u", "postgres", str(cluster.bin / args[0]), *args[1:], "-h", str(cluster.dir),
                           "-p", str(cluster.port), "-U", "postgres"], capture_output=True, text=True)


def used_database(cluster, dbname="vetassist", rows=2000):
    """A veteran with a profile and VA tokens, `rows` application audit rows, all sealed, and a
    row-audited application table: what a dump of a database in use holds."""
    with cluster.connect(dbname, "app_user") as app:
        uid = veteran(app, "8400000001V1", first="Ada")
        app.execute("SELECT count(vetassist_auth.audit_event('phi', 'viewed', 'success', '{}')) FROM generate_series(1, %s)",
                    (rows,))
    cluster.psql("CREATE TABLE public.notes (id int PRIMARY KEY, body text)", dbname)
    with cluster.connect(dbname, "admin_user") as admin:
        admin.execute("SELECT vetassist_auth.enable_row_audit('public.notes')")
    cluster.psql("INSERT INTO public.notes VALUES (1, 'first')", dbname)
    with cluster.connect(dbname) as su:
        count = su.execute("SELECT count(*) FROM vetassist_auth.audit_log").fetchone()[0]
    return uid, count


def restored_intact(cluster, dbname, uid, audit_rows):
    with cluster.connect(dbname, "app_user") as app:
        assert disclose(app, uid) == "VA-ACCESS"
        assert app.execute("SELECT first_name FROM vetassist_auth.user_profile(%s)", (uid,)).fetchone()[0] == "Ada"
    with cluster.connect(dbname) as su:
        assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE id <= %s", (audit_rows + 100,)).fetchone()[0] >= audit_rows
        ok, _, _, problem = su.execute("SELECT * FROM vetassist_auth.verify_audit_chain()").fetchone()
        assert ok, problem


@pytest.mark.load
def test_a_whole_database_restore_into_the_sweep_database_loses_nothing():
    """0.1.5: between the restore's pre-data and data sections the sweeper created an audit key and a
    key_created row; COPY audit_log then failed (23505), COPY keys failed (55000) and every token
    read was XX001."""
    with installed_cluster("restore-sweep", "vetassist_auth.sweep_database = 'vetassist'",
                           "vetassist_auth.sweep_interval = 1") as cluster:
        uid, audit_rows = used_database(cluster)
        dump = cluster.dir / "whole.dump"
        out = pg_tool(cluster, "pg_dump", "-Fc", "-f", str(dump), "vetassist")
        assert out.returncode == 0, out.stderr
        # The README's commands: the database dropped (our processes leave it) and created again.
        cluster.psql("DROP DATABASE vetassist WITH (FORCE)")
        cluster.psql("CREATE DATABASE vetassist")
        out = pg_tool(cluster, "pg_restore", "--section=pre-data", "-d", "vetassist", str(dump))
        assert out.returncode == 0, out.stderr
        with cluster.connect() as su:
            since = su.execute("SELECT now()").fetchone()[0]
        wait_for("a whole sweeper pass", sweeper_passes_since(cluster, since))
        for section in ("data", "post-data"):
            out = pg_tool(cluster, "pg_restore", f"--section={section}", "-d", "vetassist", str(dump))
            assert out.returncode == 0, out.stderr
        restored_intact(cluster, "vetassist", uid, audit_rows)


def test_a_data_only_restore_after_a_schema_only_restore_and_verify_installation():
    """0.1.5: the schema-only restore's CREATE TRIGGER on a row-audited table wrote an audit row, and
    verify_installation() created five keys: either made the data-only restore fail."""
    with installed_cluster("restore-split") as cluster:
        uid, audit_rows = used_database(cluster)
        dump = cluster.dir / "split.dump"
        out = pg_tool(cluster, "pg_dump", "-Fc", "-f", str(dump), "vetassist")
        assert out.returncode == 0, out.stderr
        cluster.psql("CREATE DATABASE target")
        out = pg_tool(cluster, "pg_restore", "--schema-only", "--exit-on-error", "-d", "target", str(dump))
        assert out.returncode == 0, out.stderr
        with cluster.connect("target", "admin_user") as admin:
            failed = admin.execute("SELECT check_name, detail FROM vetassist_auth.verify_installation() WHERE NOT ok").fetchall()
            assert not [f for f in failed if f[0].startswith("key ")], failed
        with cluster.connect("target") as su:
            assert su.execute("SELECT count(*) FROM vetassist_auth.keys").fetchone()[0] == 0
            assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log").fetchone()[0] == 0
        out = pg_tool(cluster, "pg_restore", "--data-only", "--single-transaction", "--exit-on-error", "-d", "target", str(dump))
        assert out.returncode == 0, out.stderr
        restored_intact(cluster, "target", uid, audit_rows)
        with cluster.connect("target") as su:
            assert su.execute("SELECT body FROM public.notes").fetchone()[0] == "first"


@pytest.mark.load
def test_twenty_thousand_accounts_in_one_transaction():
    """0.1.5: one identity lock per new account filled the shared lock table: "out of shared memory"."""
    with installed_cluster("import") as cluster:
        with cluster.connect("vetassist", "app_user") as app:
            created = app.execute("SELECT count(vetassist_auth.upsert_va_user(lpad(i::text, 10, '0') || 'V1', 'veteran', "
                                  "NULL, 'Imported', 'Veteran')) FROM generate_series(1, 20000) i").fetchone()[0]
            assert created == 20000


@pytest.mark.load
def test_a_transaction_left_open_in_another_database_does_not_slow_sealing():
    """0.1.5: an idle transaction in database postgres held the sealer's horizon: each 1,000-row
    seal reread the rows since it began (32 ms became 412 ms as the backlog grew)."""
    from test_operations import seal_backlog
    with installed_cluster("horizon", "autovacuum = off") as cluster:
        with cluster.connect("postgres", autocommit=False) as elsewhere:
            elsewhere.execute("SELECT txid_current()")  # open, with a transaction id, for the whole run
            seal_backlog(cluster)


def missing_database_lines(cluster, dbname):
    return cluster.log().count(f'database "{dbname}" does not exist')


@pytest.mark.load
def test_processes_of_a_database_created_later_wait_quietly_and_connect_when_it_is_created():
    """0.1.5: with sweep_database set before the database existed, a FATAL and a LOG line every
    second until it was created."""
    cluster = Cluster("created-later", "shared_preload_libraries = 'vetassist_auth'",
                      "vetassist_auth.sweep_database = 'later'")
    try:
        # The sweeper and the reserved recorder each tried once; restarted (after 10 s and 1 s),
        # they wait for a CREATE DATABASE instead of trying again (any CREATE DATABASE: each
        # one is worth one more attempt).
        wait_for("the first failed attempts", lambda: missing_database_lines(cluster, "later") >= 2)
        with cluster.connect() as su:
            # As long as the sweeper's restart time (10 s): a measured rate, not an ordering.
            time.sleep(11)
            assert missing_database_lines(cluster, "later") == 2, cluster.log()[-2000:]
            install(cluster, "later")
            wait_for("the reserved recorder in the new database", lambda: pids(su, RESERVED, "later"))
            wait_for("the sweeper in the new database", lambda: pids(su, SWEEPER, "later"))
    finally:
        cluster.stop()


def test_drop_database_and_a_template_copy_go_through_while_our_processes_are_connected():
    """0.1.5: the always-connected sweeper (and the reserved recorder) made a plain DROP DATABASE
    and CREATE DATABASE … TEMPLATE fail with "being accessed by other users"."""
    with installed_cluster("drop-copy", "vetassist_auth.sweep_database = 'vetassist'",
                           "vetassist_auth.sweep_interval = 1") as cluster:
        with cluster.connect("vetassist", "app_user") as app:
            uid = veteran(app, "8500000001V1")
        with cluster.connect() as su:
            wait_for("the sweeper and the reserved recorder",
                     lambda: pids(su, SWEEPER, "vetassist") and pids(su, RESERVED, "vetassist"))
            su.execute("CREATE DATABASE copy TEMPLATE vetassist")
        with cluster.connect("copy", "app_user") as copied:
            assert disclose(copied, uid) == "VA-ACCESS"
        with cluster.connect() as su:
            wait_for("the sweeper back", lambda: pids(su, SWEEPER, "vetassist"))
            su.execute("DROP DATABASE vetassist")
            # Created again: ours come back to it without a restart of the server.
            install(cluster, "vetassist")
            wait_for("the reserved recorder back", lambda: pids(su, RESERVED, "vetassist"))
            wait_for("the sweeper back", lambda: pids(su, SWEEPER, "vetassist"))


ANCHOR = re.compile(r"audit chain head seq=(\d+) hash=([0-9a-f]{64}) timeline=(\d+) lsn=([0-9A-F]+/[0-9A-F]+)")


def anchors(log):
    return [(int(s), bytes.fromhex(h), int(t), lsn) for s, h, t, lsn in ANCHOR.findall(log)]


@pytest.mark.load
def test_a_point_in_time_recovery_is_told_apart_from_seals_removed():
    """0.1.5: after a point-in-time recovery the last logged anchor read as tampering ("the chain
    ends before the anchor's seq"), indistinguishable from an attack."""
    with installed_cluster("pitr", "vetassist_auth.sweep_database = 'vetassist'", "vetassist_auth.sweep_interval = 1",
                           "wal_level = replica", "archive_mode = on",
                           "archive_command = 'cp %p ../archive/%f'") as cluster:
        cluster.as_postgres("mkdir", "-p", str(cluster.dir / "archive"))
        backlog(cluster, 100)
        first = wait_for("an anchor", lambda: anchors(cluster.log()))[-1]
        base = cluster.dir / "base"
        out = pg_tool(cluster, "pg_basebackup", "-D", str(base), "-X", "stream")
        assert out.returncode == 0, out.stderr
        with cluster.connect() as su:
            su.execute("SELECT pg_create_restore_point('before_second_batch')")
        backlog(cluster, 100)
        later = wait_for("an anchor after the second batch",
                         lambda: [a for a in anchors(cluster.log()) if a[0] > first[0]])[-1]
        with cluster.connect() as su:
            segment = su.execute("SELECT pg_walfile_name(pg_switch_wal())").fetchone()[0]
            wait_for("the WAL archived", lambda: su.execute(
                "SELECT last_archived_wal >= %s FROM pg_stat_archiver", (segment,)).fetchone()[0])
        cluster.stop()
        # The operator's point-in-time recovery: the base backup, the archive, a named target.
        cluster.as_postgres("bash", "-c", f"""
            set -e; chmod 700 '{base}'; touch '{base}/recovery.signal'
            cat >> '{base}/postgresql.conf' <<CONF
restore_command = 'cp {cluster.dir}/archive/%f %p'
recovery_target_name = 'before_second_batch'
recovery_target_action = 'promote'
vetassist_auth.sweep_database = ''
archive_mode = off
CONF""")
        cluster.as_postgres(str(cluster.bin / "pg_ctl"), "-D", str(base), "-l", str(cluster.dir / "recovered.log"),
                            "-w", "-t", "60", "start")
        try:
            with cluster.connect("vetassist") as su:
                wait_for("the promotion", lambda: not su.execute("SELECT pg_is_in_recovery()").fetchone()[0])
            with cluster.connect("vetassist", "auditor_user") as auditor:
                ok, _, _, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain(%s, %s, %s, %s)",
                                                    later).fetchone()
                assert not ok and problem.startswith("the database was recovered to before this anchor"), problem
                # Without its position the anchor still reads as a cut: nothing says otherwise.
                ok, _, _, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain(%s, %s)",
                                                    later[:2]).fetchone()
                assert not ok and "removed" in problem, problem
                # The anchor from before the recovery point is in the recovered chain.
                ok, _, _, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain(%s, %s, %s, %s)",
                                                    first).fetchone()
                assert ok, problem
            with cluster.connect("vetassist") as su:
                # A real cut after the recovery: the newest seal removed by a superuser.
                su.execute("SET session_replication_role = replica")
                su.execute("DELETE FROM vetassist_auth.audit_seals WHERE seq >= %s", (first[0],))
            with cluster.connect("vetassist", "auditor_user") as auditor:
                ok, _, _, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain(%s, %s, %s, %s)",
                                                    first).fetchone()
                assert not ok and "removed" in problem, problem
        finally:
            cluster.as_postgres(str(cluster.bin / "pg_ctl"), "-D", str(base), "-m", "fast", "-w", "stop")


def test_a_physical_standby_refuses_disclosures_at_once_and_serves_them_after_promotion():
    """On a hot standby no recorder can run (it starts when recovery ends): a disclosure waited
    10 s for one, then failed with 53000. It is refused at once, and works after pg_promote()."""
    with installed_cluster("physical", "vetassist_auth.sweep_database = 'vetassist'",
                           "wal_level = replica") as cluster:
        with cluster.connect("vetassist", "app_user") as app:
            uid = veteran(app, "8600000001V1")
        standby = cluster.dir / "standby"
        out = pg_tool(cluster, "pg_basebackup", "-D", str(standby), "-X", "stream", "-R")
        assert out.returncode == 0, out.stderr
        port = free_port()
        cluster.as_postgres("bash", "-c", f"chmod 700 '{standby}' && echo 'port = {port}' >> '{standby}/postgresql.conf'")
        cluster.as_postgres(str(cluster.bin / "pg_ctl"), "-D", str(standby), "-l", str(cluster.dir / "standby.log"),
                            "-w", "-t", "60", "start")
        conninfo = f"host={cluster.dir} port={port} dbname=vetassist user=app_user"
        try:
            with psycopg.connect(conninfo, autocommit=True) as app:
                started = time.monotonic()
                with pytest.raises(psycopg.Error) as refused:
                    disclose(app, uid)
                print(f"\nstandby disclosure refused after {time.monotonic() - started:.2f} s")
                assert refused.value.sqlstate == "55000", refused.value
                assert "hot standby" in str(refused.value)
            with psycopg.connect(f"host={cluster.dir} port={port} dbname=vetassist user=postgres", autocommit=True) as su:
                assert su.execute("SELECT pg_promote()").fetchone()[0]
            with psycopg.connect(conninfo, autocommit=True) as app:
                assert disclose(app, uid) == "VA-ACCESS"
        finally:
            cluster.as_postgres(str(cluster.bin / "pg_ctl"), "-D", str(standby), "-m", "fast", "-w", "stop")


@pytest.mark.load
def test_maintenance_checks_do_not_read_the_audit_log():
    """0.1.5: verify_installation() scanned audit_log for the row-audit registry (1.4 s at 5.6M
    rows), and a purge with nothing to remove joined every seal to its row under the chain lock."""
    with installed_cluster("no-scan", "autovacuum = off") as cluster:
        backlog(cluster, 20000)
        cluster.psql("CREATE TABLE public.charts (id int PRIMARY KEY)", "vetassist")
        with cluster.connect("vetassist", "admin_user") as admin:
            admin.execute("SELECT vetassist_auth.enable_row_audit('public.charts')")
            while admin.execute("SELECT vetassist_auth.seal_audit_log(10000)").fetchone()[0] > 0:
                pass
        cluster.psql("DROP TRIGGER vetassist_row_audit ON public.charts", "vetassist")
        reads = """SELECT coalesce(sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)), 0)
                   FROM pg_stat_xact_user_tables WHERE schemaname = 'vetassist_auth' AND relname = 'audit_log'"""
        with cluster.connect("vetassist", "admin_user", autocommit=False) as admin:
            before = admin.execute(reads).fetchone()[0]
            failed = dict(admin.execute("SELECT check_name, detail FROM vetassist_auth.verify_installation() "
                                        "WHERE NOT ok").fetchall())
            assert "public.charts" in failed.get("audit: row audit enabled everywhere it was enabled", ""), failed
            assert admin.execute(reads).fetchone()[0] - before < 100
            admin.rollback()
        with cluster.connect("vetassist", autocommit=False) as su:
            su.execute("SET vetassist_auth.audit_min_retention = 0")
            before = su.execute(reads).fetchone()[0]
            assert su.execute("SELECT vetassist_auth.purge_audit_log('1 day')").fetchone()[0] == 0
            assert su.execute(reads).fetchone()[0] - before < 100
            su.rollback()
        # 0.1.5: a reencrypt that moved nothing read every audit row (6 s at 3-5M rows) to find
        # the keys still used. Now a key is looked up on its own, through the audit log's index
        # (seq scans off: what must read the whole log still does). The last rows carry an IP
        # hash under an audit_ip key that is then rotated: still used, found after a few rows.
        with cluster.connect("vetassist", "app_user") as app:
            for _ in range(3):
                with app.transaction():
                    app.execute("SELECT vetassist_auth.set_actor(NULL, '192.0.2.77')")
                    app.execute("SELECT vetassist_auth.audit_event('phi', 'viewed', 'success', '{}')")
        with cluster.connect("vetassist", "admin_user") as admin:
            for purpose in ("audit_ip", "hash", "phi"):
                admin.execute("SELECT vetassist_auth.rotate_key(%s)", (purpose,))
            while admin.execute("SELECT vetassist_auth.reencrypt(1000)").fetchone()[0] > 0:
                pass
        cluster.psql("VACUUM vetassist_auth.audit_log", "vetassist")  # what autovacuum does (off here)
        with cluster.connect("vetassist", "admin_user", autocommit=False) as admin:
            admin.execute("SET enable_seqscan = off")
            before = admin.execute(reads).fetchone()[0]
            assert admin.execute("SELECT vetassist_auth.reencrypt(1000)").fetchone()[0] == 0
            assert admin.execute(reads).fetchone()[0] - before < 2500  # a block range or two of 20,000 rows
            statuses = dict(admin.execute("SELECT purpose, status FROM vetassist_auth.keys WHERE status <> 'active'").fetchall())
            assert statuses.get("audit_ip") == "decrypt_only", statuses
            admin.rollback()


@pytest.mark.load
def test_the_application_cannot_hold_the_sweeper_off_by_calling_itself_pg_restore():
    """The sweeper pauses while pg_restore is connected; a session that only names itself so,
    as the application, must not stop sessions expiring and the log being sealed."""
    with installed_cluster("fake-restore", "vetassist_auth.sweep_database = 'vetassist'",
                           "vetassist_auth.sweep_interval = 1") as cluster:
        with psycopg.connect(cluster.conninfo("vetassist", "app_user") + " application_name=pg_restore",
                             autocommit=True) as app:
            backlog(cluster, 10)
            with cluster.connect("vetassist") as su:
                wait_for("the backlog sealed", lambda: su.execute(
                    "SELECT NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_log l WHERE NOT EXISTS "
                    "(SELECT 1 FROM vetassist_auth.audit_seals s WHERE s.audit_id = l.id))").fetchone()[0])
            assert app.execute("SELECT current_setting('application_name')").fetchone()[0] == "pg_restore"


@pytest.mark.load
def test_a_pause_for_pg_restore_is_logged_when_it_starts_and_ends():
    """The database owner may restore, so a session of its own named pg_restore holds the sweeper
    off; the pause must not go unseen (and is reported again as a WARNING while it lasts)."""
    with installed_cluster("restore-pause", "vetassist_auth.sweep_database = 'vetassist'",
                           "vetassist_auth.sweep_interval = 1") as cluster:
        cluster.psql("CREATE ROLE dbo LOGIN; ALTER DATABASE vetassist OWNER TO dbo")
        backlog(cluster, 10)
        with psycopg.connect(cluster.conninfo("vetassist", "dbo") + " application_name=pg_restore",
                             autocommit=True) as restore:
            pid = restore.execute("SELECT pg_backend_pid()").fetchone()[0]
            wait_for("the pause logged", lambda: f"pg_restore (pid {pid}) is connected to database vetassist"
                     in cluster.log())
        wait_for("the end of the pause logged", lambda: "pg_restore has left database vetassist; maintenance resumes"
                 in cluster.log())


def test_only_a_role_that_may_drop_or_copy_a_database_makes_our_processes_leave_it():
    """A monitoring role (pg_monitor) whose DROP DATABASE, CREATE DATABASE … TEMPLATE or RENAME
    fails on privileges must not terminate our processes on the way (a loop of such statements
    stopped every disclosure); the owner of a reserved database can drop it."""
    with installed_cluster("leave-rights", "vetassist_auth.sweep_database = 'vetassist'",
                           "vetassist_auth.databases = 'vetassist, owned'") as cluster:
        cluster.psql("CREATE ROLE watcher LOGIN IN ROLE pg_monitor; CREATE ROLE dbo LOGIN CREATEDB")
        cluster.psql("CREATE DATABASE owned OWNER dbo")
        with cluster.connect("vetassist", "app_user") as app, cluster.connect() as su:
            uid = veteran(app, "8700000001V1")
            before = wait_for("our processes", lambda: (pids(su, SWEEPER, "vetassist"), pids(su, RESERVED, "vetassist"))
                              if pids(su, SWEEPER, "vetassist") and pids(su, RESERVED, "vetassist") else None)
            with cluster.connect("postgres", "watcher") as watcher:
                for statement in ("DROP DATABASE vetassist", "CREATE DATABASE stolen TEMPLATE vetassist",
                                  "ALTER DATABASE vetassist RENAME TO gone"):
                    for _ in range(10):
                        with pytest.raises(psycopg.errors.InsufficientPrivilege):
                            watcher.execute(statement)
            # A disclosure waits for the reserved recorder: one asked to stop would be gone by then.
            assert disclose(app, uid) == "VA-ACCESS"
            assert (pids(su, SWEEPER, "vetassist"), pids(su, RESERVED, "vetassist")) == before
            wait_for("the reserved recorder of the owned database", lambda: pids(su, RESERVED, "owned"))
        with cluster.connect("postgres", "dbo") as dbo:
            dbo.execute("DROP DATABASE owned")


def assert_waits_on_the_extension_alone(su, sweeper):
    """Waits until the sweeper waits on a lock; it must be the extension's, with none of our
    tables held meanwhile (what a drop or update in the other order would deadlock on)."""
    waiting = wait_for("the sweeper to wait on a lock", lambda: su.execute(
        """SELECT locktype, classid = 'pg_catalog.pg_extension'::regclass, relation
             FROM pg_locks WHERE pid = %s AND NOT granted""", (sweeper,)).fetchone(), timeout=10)
    assert waiting == ("object", True, None)
    held = su.execute("""SELECT count(*) FROM pg_locks l JOIN pg_class c ON c.oid = l.relation
                           JOIN pg_namespace n ON n.oid = c.relnamespace
                          WHERE l.pid = %s AND l.granted AND n.nspname = 'vetassist_auth'""",
                      (sweeper,)).fetchone()[0]
    assert held == 0


def whole_pass_logged(cluster, logged):
    """A check for wait_for: each pass ends by logging the chain head, so a second such line after
    `logged` characters of the server log means a whole pass ran after that point."""
    return lambda: cluster.log()[logged:].count("vetassist_auth audit chain head") >= 2


def test_drop_extension_and_the_sweeper_wait_for_each_other_in_one_order_never_a_deadlock():
    """CI, 0.2.0 in development: DROP EXTENSION failed with "deadlock detected" against a sweeper
    pass that held one of our tables and asked for another. DROP EXTENSION locks the extension
    before any of our tables, so each transaction of ours takes that lock first: a pass waits for
    an open DROP on the extension itself, holding none of our tables, and finds it gone after."""
    with installed_cluster("drop-extension", "vetassist_auth.sweep_database = 'vetassist'",
                           "vetassist_auth.sweep_interval = 1") as cluster:
        with cluster.connect("vetassist", "app_user") as app:
            veteran(app, "8100000009V1")
        with cluster.connect("vetassist") as su, cluster.connect("vetassist", autocommit=False) as dba:
            sweeper = wait_for("the sweeper", lambda: pids(su, SWEEPER, "vetassist"))[0]
            dba.execute("DROP EXTENSION vetassist_auth")  # held open: every lock of the drop is taken
            assert_waits_on_the_extension_alone(su, sweeper)
            logged = len(cluster.log())
            dba.commit()
            # Gone: the pass ends quietly, and the sweeper keeps going without the extension.
            since = su.execute("SELECT now()").fetchone()[0]
            wait_for("a sweeper pass without the extension", sweeper_passes_since(cluster, since), timeout=10)
            assert "vetassist_auth sweeper:" not in cluster.log()[logged:]


def test_an_extension_update_and_the_sweeper_wait_for_each_other_in_one_order_never_a_deadlock():
    """The neighbour of DROP EXTENSION: ALTER EXTENSION UPDATE alters our tables in its script's
    order, and Postgres takes no lock on the extension for it. Our ProcessUtility hook takes that
    lock for the extension's owner when the version changes, so a sweeper pass waits for an open
    update on the extension, holding none of our tables, and then runs on the updated SQL."""
    c = Cluster("update-extension", "shared_preload_libraries = 'vetassist_auth'",
                "vetassist_auth.sweep_database = 'vetassist'", "vetassist_auth.sweep_interval = 1")
    try:
        install(c, version="0.1.5")
        with c.connect("vetassist", "app_user") as app:
            veteran(app, "8100000010V1")
        with c.connect("vetassist") as su, c.connect("vetassist", autocommit=False) as dba:
            sweeper = wait_for("the sweeper", lambda: pids(su, SWEEPER, "vetassist"))[0]
            dba.execute("ALTER EXTENSION vetassist_auth UPDATE")  # held open
            assert_waits_on_the_extension_alone(su, sweeper)
            logged = len(c.log())
            dba.commit()
            wait_for("a sweeper pass on the updated SQL", whole_pass_logged(c, logged), timeout=10)
            assert "vetassist_auth sweeper:" not in c.log()[logged:]
            assert su.execute("SELECT extversion FROM pg_extension WHERE extname = 'vetassist_auth'").fetchone()[0] \
                != "0.1.5"
            # An update to the version in force (a migration tool runs one at the start of every
            # migration) takes no lock of ours: passes go on while its transaction is open.
            dba.execute("ALTER EXTENSION vetassist_auth UPDATE")
            logged = len(c.log())
            wait_for("a sweeper pass while a no-op update is open", whole_pass_logged(c, logged), timeout=10)
            dba.rollback()
    finally:
        c.stop()
