"""The audit chain under concurrent writers, with transactions still running, and after purge."""
import concurrent.futures
import threading
import time

import psycopg
import pytest

from conftest import installed_cluster, seal_all


def verify(conn):
    return conn.execute("SELECT ok, checked, first_bad_seq, problem FROM vetassist_auth.verify_audit_chain()").fetchone()


def test_sixteen_writers_then_seal_then_verify_without_gaps():
    with installed_cluster("audit16", "max_connections = 40") as c:
        barrier = threading.Barrier(16)

        def writer(i):
            with c.connect("vetassist", "app_user") as conn:
                uid = conn.execute("SELECT vetassist_auth.upsert_va_user(%s, 'veteran', NULL, NULL, NULL)",
                                   (f"10126600{i:02d}V000016",)).fetchone()[0]
                barrier.wait()
                for n in range(50):
                    with conn.transaction():
                        conn.execute("SELECT vetassist_auth.set_actor(%s)", (uid,))
                        conn.execute("SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', %s)",
                                     (f'{{"n": {n}}}',))

        def sealer():
            with c.connect("vetassist", "admin_user") as conn:
                return sum(conn.execute("SELECT vetassist_auth.seal_audit_log(50)").fetchone()[0] for _ in range(20))

        with concurrent.futures.ThreadPoolExecutor(17) as pool:
            writers = [pool.submit(writer, i) for i in range(16)]
            sealed_meanwhile = pool.submit(sealer)
            [w.result() for w in writers]
            sealed_meanwhile.result()
        with c.connect("vetassist", "admin_user") as admin:
            seal_all(admin)
        with c.connect("vetassist") as su:
            rows, seals, lo, hi = su.execute("""SELECT (SELECT count(*) FROM vetassist_auth.audit_log), count(*), min(seq), max(seq)
                                                FROM vetassist_auth.audit_seals""").fetchone()
            assert rows == seals and lo == 1 and hi == seals  # every row sealed once, no gaps
            assert su.execute("""SELECT count(*) FROM vetassist_auth.audit_log a WHERE NOT EXISTS
                                 (SELECT 1 FROM vetassist_auth.audit_seals s WHERE s.audit_id = a.id)""").fetchone()[0] == 0
        with c.connect("vetassist", "auditor_user") as auditor:
            ok, checked, bad, problem = verify(auditor)
            assert (ok, checked, bad, problem) == (True, seals, None, None)


def test_sealing_skips_rows_of_running_transactions_and_seals_them_later(cluster):
    with cluster.connect("vetassist", "app_user", autocommit=False) as slow, \
            cluster.connect("vetassist", "admin_user") as admin, cluster.connect("vetassist", "app_user") as fast:
        slow.execute("SELECT vetassist_auth.audit_event('app', 'slow_transaction', 'info', '{}')")
        fast.execute("SELECT vetassist_auth.audit_event('app', 'fast_transaction', 'info', '{}')")
        seal_all(admin)
        with cluster.connect("vetassist") as su:
            sealed_types = {r[0] for r in su.execute("""SELECT a.event_type FROM vetassist_auth.audit_log a
                                                        JOIN vetassist_auth.audit_seals s ON s.audit_id = a.id""").fetchall()}
        assert "fast_transaction" in sealed_types and "slow_transaction" not in sealed_types
        slow.commit()
        seal_all(admin)
        with cluster.connect("vetassist") as su:
            sealed = su.execute("""SELECT count(*) FROM vetassist_auth.audit_log a JOIN vetassist_auth.audit_seals s
                                   ON s.audit_id = a.id WHERE a.event_type = 'slow_transaction'""").fetchone()[0]
            assert sealed == 1
            ok, *_ = verify(su)
            assert ok


def test_rows_the_sealer_cannot_date_are_sealed_once_committed():
    """Two transactions whose start pg_stat_activity does not show: one prepared (two-phase
    commit) and one in a session with track_activities off. Sealing while they are open must not
    pass their rows by, or verification would later call them inserted afterwards."""
    with installed_cluster("auditlate", "max_prepared_transactions = 2") as c, \
            c.connect("vetassist", "admin_user") as admin, c.connect("vetassist") as su:
        su.execute("ALTER ROLE app_user SET track_activities = off")  # superuser-only setting
        with c.connect("vetassist", "app_user", autocommit=False) as untracked, \
                c.connect("vetassist", "app_user", autocommit=False) as two_phase:
            untracked.execute("SELECT vetassist_auth.audit_event('app', 'untracked_transaction', 'info', '{}')")
            two_phase.execute("SELECT vetassist_auth.audit_event('app', 'prepared_transaction', 'info', '{}')")
            time.sleep(1.5)  # older than the sealer's one-second margin
            two_phase.execute("PREPARE TRANSACTION 'audit_2pc'")
            su.execute("SELECT vetassist_auth.audit_event('app', 'meanwhile', 'info', '{}')")
            seal_all(admin)
            untracked.commit()
            su.execute("COMMIT PREPARED 'audit_2pc'")
        seal_all(admin)
        unsealed = su.execute("""SELECT array_agg(event_type) FROM vetassist_auth.audit_log a WHERE NOT EXISTS
                                 (SELECT 1 FROM vetassist_auth.audit_seals s WHERE s.audit_id = a.id)""").fetchone()[0]
        assert unsealed is None
        assert verify(su) == (True, su.execute("SELECT count(*) FROM vetassist_auth.audit_log").fetchone()[0], None, None)


def test_writers_never_wait_for_the_sealer(cluster):
    """A sealer holding its lock does not block audit writes."""
    with cluster.connect("vetassist", "admin_user", autocommit=False) as sealing, \
            cluster.connect("vetassist", "app_user") as writer:
        sealing.execute("SELECT vetassist_auth.seal_audit_log(10)")  # transaction left open
        writer.execute("SET statement_timeout = '2s'")
        writer.execute("SELECT vetassist_auth.audit_event('app', 'written_while_sealing', 'info', '{}')")
        # A second sealer does not queue behind the first either: it returns at once.
        with cluster.connect("vetassist", "admin_user") as other:
            other.execute("SET statement_timeout = '2s'")
            assert other.execute("SELECT vetassist_auth.seal_audit_log(10)").fetchone()[0] == 0
        sealing.commit()


def test_an_aborted_purge_leaves_the_log_append_only():
    """The purge permission ends with the purge's transaction, even when the purge fails midway."""
    with installed_cluster("purgeabort") as c:
        with c.connect("vetassist") as su:
            for n in range(3):
                su.execute("SELECT vetassist_auth.audit_event('app', %s, 'info', '{}')", (f"e{n}",))
            su.execute("SELECT vetassist_auth.seal_audit_log()")
            # Make the purge fail halfway through its deletes.
            su.execute("""CREATE FUNCTION public.fail_purge() RETURNS trigger LANGUAGE plpgsql AS
                          $$ BEGIN IF OLD.event_type = 'e1' THEN RAISE EXCEPTION 'disk on fire'; END IF; RETURN OLD; END $$""")
            su.execute("""CREATE TRIGGER zz_fail_purge BEFORE DELETE ON vetassist_auth.audit_log
                          FOR EACH ROW EXECUTE FUNCTION public.fail_purge()""")
            with pytest.raises(psycopg.errors.RaiseException):
                su.execute("SELECT vetassist_auth.purge_audit_log('0')")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                su.execute("DELETE FROM vetassist_auth.audit_log WHERE event_type = 'e0'")
            su.execute("DROP TRIGGER zz_fail_purge ON vetassist_auth.audit_log")
            assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE event_type LIKE 'e_'").fetchone()[0] == 3
            assert su.execute("SELECT ok FROM vetassist_auth.verify_audit_chain()").fetchone()[0]
