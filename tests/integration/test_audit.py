"""The audit chain under concurrent writers, with transactions still running, and after purge."""
import concurrent.futures
import subprocess
import threading
import time

import psycopg
import pytest

from vetassist_testing import BIN, install, installed_cluster, seal_all


def verify(conn):
    return conn.execute("SELECT ok, checked, first_bad_seq, problem FROM vetassist_auth.verify_audit_chain()").fetchone()


@pytest.mark.load
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
        # A writer that waited would wait until the commit below, for ever: 30 s tells that from
        # a slow machine (2 s did not always).
        writer.execute("SET statement_timeout = '30s'")
        writer.execute("SELECT vetassist_auth.audit_event('app', 'written_while_sealing', 'info', '{}')")
        # A second sealer does not queue behind the first either: it returns at once.
        with cluster.connect("vetassist", "admin_user") as other:
            other.execute("SET statement_timeout = '30s'")
            assert other.execute("SELECT vetassist_auth.seal_audit_log(10)").fetchone()[0] == 0
        sealing.commit()


def test_an_aborted_purge_leaves_the_log_append_only(chain):
    """The purge permission ends with the purge's transaction, even when the purge fails midway."""
    c = chain
    install(c, "purgeabort")
    with c.connect("purgeabort") as su:
        for n in range(3):
            su.execute("SELECT vetassist_auth.audit_event('app', %s, 'info', '{}')", (f"e{n}",))
        su.execute("SELECT vetassist_auth.seal_audit_log()")
        # Make the purge fail halfway through its deletes.
        su.execute("""CREATE FUNCTION public.fail_purge() RETURNS trigger LANGUAGE plpgsql AS
                      $$ BEGIN IF OLD.event_type = 'e1' THEN RAISE EXCEPTION 'disk on fire'; END IF; RETURN OLD; END $$""")
        su.execute("""CREATE TRIGGER zz_fail_purge BEFORE DELETE ON vetassist_auth.audit_log
                      FOR EACH ROW EXECUTE FUNCTION public.fail_purge()""")
        su.execute("SET vetassist_auth.audit_min_retention = 0")
        with pytest.raises(psycopg.errors.RaiseException):
            su.execute("SELECT vetassist_auth.purge_audit_log('0')")
        with pytest.raises(psycopg.errors.InsufficientPrivilege):
            su.execute("DELETE FROM vetassist_auth.audit_log WHERE event_type = 'e0'")
        su.execute("DROP TRIGGER zz_fail_purge ON vetassist_auth.audit_log")
        assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE event_type LIKE 'e_'").fetchone()[0] == 3
        assert su.execute("SELECT ok FROM vetassist_auth.verify_audit_chain()").fetchone()[0]


@pytest.fixture(scope="module")
def chain():
    """A cluster of this module's own, so sealing here is not disturbed by other tests' rows; a test
    that forges or purges its chain takes a database of its own in it (each has its own chain)."""
    with installed_cluster("chain") as c:
        yield c


def write_events(cluster, n, ip="203.0.113.9", dbname="vetassist"):
    """n application audit events with a hashed client address (a bytea column in the row)."""
    with cluster.connect(dbname, "app_user") as app, app.transaction():
        app.execute("SELECT vetassist_auth.set_actor(NULL, %s)", (ip,))
        for i in range(n):
            app.execute("SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', %s)", (f'{{"n": {i}}}',))


def test_no_role_can_stall_the_sealer_or_key_management_with_advisory_locks(chain):
    """The locks the 0.1.1 sealer and key creation used were advisory: any role could hold them."""
    write_events(chain, 3)
    with chain.connect("vetassist", "outsider") as squatter:
        squatter.execute("SELECT pg_advisory_lock(1986095922, 2)")
        squatter.execute("SELECT pg_advisory_lock(1986095921, hashtext('phi'))")
        with chain.connect("vetassist", "admin_user") as admin:
            admin.execute("SET lock_timeout = '30s'")  # a regression fails here instead of hanging (the squatter never lets go)
            assert admin.execute("SELECT vetassist_auth.seal_audit_log()").fetchone()[0] >= 3
            assert admin.execute("SELECT vetassist_auth.rotate_key('phi')").fetchone()[0] > 0
            admin.execute("SELECT vetassist_auth.purge_audit_log('100 years')")


def test_a_sealer_that_cannot_proceed_says_so(chain):
    write_events(chain, 2)
    with chain.connect("vetassist", "admin_user", autocommit=False) as first, \
            chain.connect("vetassist", "admin_user") as second, chain.connect("vetassist", "auditor_user") as auditor:
        first.execute("SELECT vetassist_auth.seal_audit_log(1)")  # holds the chain lock until commit
        first_pid = first.execute("SELECT pg_backend_pid()").fetchone()[0]
        warnings = []
        second.add_notice_handler(lambda diag: warnings.append((diag.severity_nonlocalized, diag.message_primary)))
        assert second.execute("SELECT vetassist_auth.seal_audit_log()").fetchone()[0] == 0
        assert any(sev == "WARNING" and f"backend {first_pid}" in msg for sev, msg in warnings), warnings
        head_seq, _, _, waiting, sealer = auditor.execute("SELECT * FROM vetassist_auth.audit_seal_status()").fetchone()
        assert sealer == first_pid and waiting >= 1
        first.commit()
        seal_all(second)
        head_after, _, _, waiting, sealer = auditor.execute("SELECT * FROM vetassist_auth.audit_seal_status()").fetchone()
        assert sealer is None and waiting == 0 and head_after > head_seq


@pytest.mark.parametrize("setting,value", [
    ("bytea_output", "escape"), ("DateStyle", "SQL, DMY"), ("IntervalStyle", "sql_standard"),
    ("extra_float_digits", "-15"), ("TimeZone", "Asia/Kolkata"),
    ("default_transaction_isolation", "repeatable read"),
])
def test_sealing_and_verifying_do_not_depend_on_session_settings(chain, setting, value):
    write_events(chain, 3)
    with chain.connect("vetassist", "admin_user") as odd, chain.connect("vetassist", "admin_user") as plain:
        odd.execute("SELECT set_config(%s, %s, false)", (setting, value))
        seal_all(odd)
        for conn in (plain, odd):
            ok, checked, first_bad, problem = verify(conn)
            assert ok, (setting, first_bad, problem)
        write_events(chain, 2)
        seal_all(plain)
        ok, _, first_bad, problem = verify(odd)
        assert ok, (setting, first_bad, problem)


def test_a_repeatable_read_sealer_passes_no_row_by(chain):
    """Rows committed after the sealer's snapshot are invisible to it; they must be sealed later,
    never skipped (0.1.1 moved its scan start past them)."""
    with chain.connect("vetassist", "admin_user") as admin:
        seal_all(admin)
    with chain.connect("vetassist", "admin_user", autocommit=False) as sealer:
        sealer.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        sealer.execute("SELECT 1")  # the snapshot
        write_events(chain, 3)
        time.sleep(1.2)
        sealer.execute("SELECT vetassist_auth.seal_audit_log()")
        sealer.commit()
    with chain.connect("vetassist", "admin_user") as admin, chain.connect("vetassist") as su:
        seal_all(admin)
        unsealed = su.execute("""SELECT count(*) FROM vetassist_auth.audit_log a
                                 WHERE NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_seals s WHERE s.audit_id = a.id)""").fetchone()[0]
        assert unsealed == 0
        assert verify(admin)[0]


def test_the_application_cannot_forge_the_extensions_own_events(chain):
    with chain.connect("vetassist", "app_user") as app, chain.connect("vetassist", "auditor_user") as auditor:
        uid = app.execute("SELECT vetassist_auth.upsert_va_user('9900000030V1', 'veteran', 'f@example.org', 'Fay', 'Doe')").fetchone()[0]
        app.execute("SELECT vetassist_auth.set_actor(%s)", (uid,))
        for category, event_type in (("phi_access", "user_profile_read"), ("mfa", "mfa_verified"),
                                     ("audit", "audit_log_purged"), (" MFA ", "mfa_verified"), ("key", "key_retired"),
                                     ("audit\t", "audit_log_purged"), ("audit\u00a0", "audit_log_purged"),
                                     ("phi_\u0430ccess", "user_profile_read"), ("audit;", "audit_log_purged")):
            with pytest.raises(psycopg.Error) as err:
                app.execute("SELECT vetassist_auth.audit_event(%s, %s, 'success', '{}')", (category, event_type))
            assert err.value.sqlstate == "22023", category
        with app.transaction():
            app.execute("SELECT vetassist_auth.set_actor(%s)", (uid,))
            app.execute("SELECT vetassist_auth.audit_event('phi', 'chart_viewed', 'success', '{}')")
            app.execute("SELECT * FROM vetassist_auth.user_profile(%s)", (uid,))
        rows = auditor.execute("""SELECT recorded_by, event_type FROM vetassist_auth.phi_disclosures(
                                      %s, now() - interval '1 hour', now() + interval '1 hour')""", (uid,)).fetchall()
        assert rows == [("application", "chart_viewed"), ("extension", "user_profile_read")]


def head(conn):
    return conn.execute("SELECT seq, hash FROM vetassist_auth.audit_chain_head()").fetchone()


def verify_against(conn, anchor):
    return conn.execute("SELECT ok, checked, first_bad_seq, problem FROM vetassist_auth.verify_audit_chain(%s, %s)",
                        anchor).fetchone()


def test_anchors_expose_truncation_rewrites_and_forged_checkpoints(chain):
    c = chain
    install(c, "anchors")
    with c.connect("anchors", "admin_user") as admin, c.connect("anchors", "auditor_user") as auditor, \
            c.connect("anchors") as su:
        write_events(c, dbname="anchors", n=6)
        seal_all(admin)
        anchor = head(auditor)
        assert verify_against(auditor, anchor)[0]
        su.execute("SET session_replication_role = replica")  # a superuser past the append-only triggers

        # Cut the newest two rows and their seals: the chain alone still looks whole.
        su.execute("""WITH cut AS (DELETE FROM vetassist_auth.audit_seals WHERE seq > %s - 2 RETURNING audit_id)
                      DELETE FROM vetassist_auth.audit_log WHERE id IN (SELECT audit_id FROM cut)""", (anchor[0],))
        su.execute("UPDATE vetassist_auth.audit_seal_state SET sealed_through_id = (SELECT max(audit_id) FROM vetassist_auth.audit_seals)")
        assert verify(auditor)[0]
        ok, _, bad, problem = verify_against(auditor, anchor)
        assert not ok and bad == anchor[0] and "ends before" in problem

        # Rewrite a row and seal again from there: same seq, another hash.
        write_events(c, dbname="anchors", n=2)
        seal_all(admin)
        anchor = head(auditor)
        su.execute("""WITH cut AS (DELETE FROM vetassist_auth.audit_seals WHERE seq >= %s - 1 RETURNING audit_id)
                      UPDATE vetassist_auth.audit_log SET details = '{"n": 999}' WHERE id IN (SELECT audit_id FROM cut)""",
                   (anchor[0],))
        su.execute("""UPDATE vetassist_auth.audit_seal_state
                      SET sealed_through_id = (SELECT max(audit_id) FROM vetassist_auth.audit_seals), scan_from = '-infinity'""")
        seal_all(admin)
        assert verify(auditor)[0] and head(auditor)[0] == anchor[0]
        ok, _, _, problem = verify_against(auditor, anchor)
        assert not ok and "another hash" in problem

        # Forge a checkpoint over a deleted prefix: no purge recorded it.
        first = su.execute("SELECT seq, hash, audit_id FROM vetassist_auth.audit_seals ORDER BY seq LIMIT 2").fetchall()[-1]
        su.execute("DELETE FROM vetassist_auth.audit_log WHERE id IN (SELECT audit_id FROM vetassist_auth.audit_seals WHERE seq <= %s)",
                   (first[0],))
        su.execute("DELETE FROM vetassist_auth.audit_seals WHERE seq <= %s", (first[0],))
        su.execute("UPDATE vetassist_auth.audit_seal_state SET checkpoint_seq = %s, checkpoint_hash = %s", (first[0], first[1]))
        ok, _, _, problem = verify(auditor)
        assert not ok and "not recorded" in problem


def test_purging_respects_the_minimum_retention_and_stays_verifiable(chain):
    c = chain
    install(c, "retention")
    with c.connect("retention", "admin_user") as admin, c.connect("retention", "auditor_user") as auditor, \
            c.connect("retention") as su:
        write_events(c, dbname="retention", n=4)
        seal_all(admin)
        anchor = head(auditor)
        # '-6000 months 182190 days' compares as longer than 6 years, yet cuts off in the future.
        for older_than in ("0", "1 day", "5 years", "-6000 months 182190 days"):
            with pytest.raises(psycopg.Error) as err:
                admin.execute("SELECT vetassist_auth.purge_audit_log(%s)", (older_than,))
            assert err.value.sqlstate == "22023", older_than
        with pytest.raises(psycopg.Error) as err:  # the admin cannot lower it
            admin.execute("SET vetassist_auth.audit_min_retention = 0")
        assert err.value.sqlstate == "42501"
        su.execute("ALTER ROLE admin_user IN DATABASE retention SET vetassist_auth.audit_min_retention = 0")
        write_events(c, dbname="retention", n=2)  # the purge will go past the anchor
        seal_all(admin)
    with c.connect("retention", "admin_user") as admin, c.connect("retention", "auditor_user") as auditor:
        assert admin.execute("SELECT vetassist_auth.purge_audit_log('0')").fetchone()[0] > 0
        seal_all(admin)
        assert verify(auditor)[0]
        # Purged past it: the purge is on record, but a record can be forged; the anchor's
        # hash cannot be checked any more, and the report says so.
        ok, _, _, problem = verify_against(auditor, anchor)
        assert not ok and "purged" in problem
        for bad in ((0, b"\x00" * 32), (-5, b""), (anchor[0], None)):
            with pytest.raises(psycopg.Error) as err:
                verify_against(auditor, bad)
            assert err.value.sqlstate == "22023"


def test_row_audit_is_not_dodged_by_copy_nor_silently_disabled(chain):
    with chain.connect("vetassist") as su:
        su.execute("CREATE TABLE IF NOT EXISTS public.notes (id int PRIMARY KEY, body text)")
        su.execute("GRANT ALL ON public.notes TO app_user")
    with chain.connect("vetassist", "admin_user") as admin:
        admin.execute("SELECT vetassist_auth.enable_row_audit('public.notes')")
    with chain.connect("vetassist", "app_user") as app:
        uid = app.execute("SELECT vetassist_auth.upsert_va_user('9900000031V1', 'veteran', NULL, NULL, NULL)").fetchone()[0]
        # A statement that starts with COPY is not a restore: its row changes are audited.
        with app.cursor().copy("COPY (SELECT vetassist_auth.create_session(%s, 'jwt-copy', now() + interval '1 hour')) TO STDOUT",
                               (uid,)) as copy:
            list(copy)
    out = subprocess.run([str(BIN / "psql"), "-X", "-q", chain.conninfo("vetassist", "app_user"), "-c",
                          "copy (select 1) to stdout; select vetassist_auth.end_session('jwt-copy', 'logout')"],
                         capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    # A failing COPY ... FROM of the same table appended to the query is no restore either.
    out = subprocess.run([str(BIN / "psql"), "-X", "-q", chain.conninfo("vetassist", "app_user"), "-c",
                          f"begin; select vetassist_auth.create_session('{uid}', 'jwt-copy2', now() + interval '1 hour'); commit; "
                          "copy vetassist_auth.sessions from stdin"], capture_output=True, text=True)
    assert "permission denied" in out.stderr
    with chain.connect("vetassist") as su:
        events = {r[0] for r in su.execute("""SELECT a.event_type FROM vetassist_auth.audit_log a
                                              JOIN vetassist_auth.sessions s ON a.target_id = s.id::text
                                              WHERE s.jwt_id = 'jwt-copy' AND a.target_table = 'vetassist_auth.sessions'""").fetchall()}
        assert {"insert", "update"} <= events, events
        assert su.execute("""SELECT count(*) FROM vetassist_auth.audit_log a JOIN vetassist_auth.sessions s
                             ON a.target_id = s.id::text WHERE s.jwt_id = 'jwt-copy2' AND a.event_type = 'insert'""").fetchone()[0] == 1
        # The table owner switches row audit off: the change is audited, and the check says so.
        su.execute("ALTER TABLE public.notes DISABLE TRIGGER vetassist_row_audit")
        row = su.execute("""SELECT outcome, details ->> 'row_audit' FROM vetassist_auth.audit_log
                            WHERE event_type = 'audited_table_altered' ORDER BY id DESC LIMIT 1""").fetchone()
        assert row == ("denied", "disabled")
        ok, detail = su.execute("""SELECT ok, detail FROM vetassist_auth.verify_installation()
                                   WHERE check_name LIKE 'audit: row audit enabled%'""").fetchone()
        assert not ok and "public.notes" in detail
        su.execute("ALTER TABLE public.notes ENABLE TRIGGER vetassist_row_audit")
        check = """SELECT ok FROM vetassist_auth.verify_installation() WHERE check_name LIKE 'audit: row audit enabled%'"""
        assert su.execute(check).fetchone()[0]
        # Every other way to make it stop firing is audited as denied and flagged too.
        su.execute("CREATE OR REPLACE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN RETURN NULL; END $$")
        def reenable():
            with chain.connect("vetassist", "admin_user") as admin:
                admin.execute("SELECT vetassist_auth.enable_row_audit('public.notes')")

        for switch_off, switch_on in (
                ("ALTER TABLE public.notes ENABLE REPLICA TRIGGER vetassist_row_audit",
                 lambda: su.execute("ALTER TABLE public.notes ENABLE TRIGGER vetassist_row_audit")),
                ("ALTER TRIGGER vetassist_row_audit ON public.notes RENAME TO zz",
                 lambda: su.execute("ALTER TRIGGER zz ON public.notes RENAME TO vetassist_row_audit")),
                ("DROP TRIGGER vetassist_row_audit ON public.notes", reenable),
                ("CREATE OR REPLACE TRIGGER vetassist_row_audit AFTER INSERT ON public.notes FOR EACH ROW EXECUTE FUNCTION public.noop()",
                 lambda: (su.execute("DROP TRIGGER vetassist_row_audit ON public.notes"), reenable()))):
            before = su.execute("SELECT max(id) FROM vetassist_auth.audit_log").fetchone()[0]
            su.execute(switch_off)
            outcome = su.execute("""SELECT outcome FROM vetassist_auth.audit_log WHERE id > %s
                                    AND event_type = 'audited_table_altered' ORDER BY id DESC LIMIT 1""", (before,)).fetchone()
            assert outcome == ("denied",), switch_off
            assert not su.execute(check).fetchone()[0], switch_off
            switch_on()
            assert su.execute(check).fetchone()[0], switch_off
        assert su.execute(check).fetchone()[0]


# Found by an adversary: the alarm followed the table's name, and the audit writer evaluated the
# audit log's index expressions as whoever changed the audited table.

def owned_audited_table(chain, db, name):
    """public.<name>, owned by the ordinary role tabowner, writable by app_user, under row audit."""
    with chain.connect(db) as su:
        su.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'tabowner') THEN "
                   "CREATE ROLE tabowner LOGIN; END IF; END $$")
        su.execute("GRANT USAGE, CREATE ON SCHEMA public TO tabowner")
        su.execute("CREATE SCHEMA IF NOT EXISTS elsewhere AUTHORIZATION tabowner")
        su.execute(f"CREATE TABLE public.{name} (id int PRIMARY KEY, body text)")
        su.execute(f"ALTER TABLE public.{name} OWNER TO tabowner")
        su.execute(f"GRANT ALL ON public.{name} TO app_user")
    with chain.connect(db, "admin_user") as admin:
        admin.execute("SELECT vetassist_auth.enable_row_audit(%s)", (f"public.{name}",))


def audit_rows_since(su, since_id):
    return su.execute("""SELECT event_type, outcome, target_table, details ->> 'row_audit' FROM vetassist_auth.audit_log
                         WHERE id > %s ORDER BY id""", (since_id,)).fetchall()


def last_id(su):
    return su.execute("SELECT coalesce(max(id), 0) FROM vetassist_auth.audit_log").fetchone()[0]


@pytest.fixture(scope="module")
def owners(chain):
    install(chain, "owners")
    return chain


def test_a_table_of_an_ordinary_owner_stays_writable_under_row_audit(owners):
    owned_audited_table(owners, "owners", "notes_w")
    with owners.connect("owners", "tabowner") as owner:
        owner.execute("INSERT INTO public.notes_w VALUES (0, 'by its owner')")
    with owners.connect("owners", "app_user") as app, app.transaction():
        app.execute("SELECT vetassist_auth.set_actor(NULL, '203.0.113.5')")  # a hashed address in the row
        app.execute("INSERT INTO public.notes_w VALUES (1, 'by the application')")
    with owners.connect("owners") as su:
        assert su.execute("""SELECT count(*) FROM vetassist_auth.audit_log
                             WHERE target_table = 'public.notes_w' AND event_type = 'insert'""").fetchone()[0] == 2


def test_row_audit_switched_off_after_a_rename_or_a_move_is_an_alarm(owners):
    owned_audited_table(owners, "owners", "notes_r")
    owned_audited_table(owners, "owners", "notes_s")
    with owners.connect("owners") as su, owners.connect("owners", "tabowner") as owner:
        before = last_id(su)
        owner.execute("ALTER TABLE public.notes_r RENAME TO notes_r_tmp")
        owner.execute("ALTER TABLE public.notes_r_tmp DISABLE TRIGGER vetassist_row_audit")
        owner.execute("ALTER TABLE public.notes_r_tmp ENABLE TRIGGER vetassist_row_audit")
        owner.execute("ALTER TABLE public.notes_r_tmp RENAME TO notes_r")
        owner.execute("ALTER TABLE public.notes_s SET SCHEMA elsewhere")
        owner.execute("DROP TRIGGER vetassist_row_audit ON elsewhere.notes_s")
        assert audit_rows_since(su, before) == [
            ("audited_table_altered", "info", "public.notes_r_tmp", "enabled"),
            ("audited_table_altered", "denied", "public.notes_r_tmp", "disabled"),
            ("audited_table_altered", "info", "public.notes_r_tmp", "enabled"),
            ("audited_table_altered", "info", "public.notes_r", "enabled"),
            ("audited_table_altered", "info", "elsewhere.notes_s", "enabled"),
            ("audited_table_altered", "denied", "elsewhere.notes_s", "dropped")]
        detail = su.execute("""SELECT detail FROM vetassist_auth.verify_installation()
                               WHERE check_name = 'audit: row audit enabled everywhere it was enabled'""").fetchone()[0]
        assert "elsewhere.notes_s" in detail and "notes_r" not in detail
        # Dropped whole: an alarm, and nothing left to check.
        before = last_id(su)
        owner.execute("DROP TABLE elsewhere.notes_s")
        assert audit_rows_since(su, before) == [("audited_table_altered", "denied", "elsewhere.notes_s", "table_dropped")]
        assert su.execute("""SELECT ok FROM vetassist_auth.verify_installation()
                             WHERE check_name = 'audit: row audit enabled everywhere it was enabled'""").fetchone()[0]


def test_another_table_under_an_audited_tables_old_name_raises_no_alarm(owners):
    owned_audited_table(owners, "owners", "notes_f")
    with owners.connect("owners") as su:
        su.execute("GRANT CREATE ON SCHEMA public TO outsider")
        with owners.connect("owners", "tabowner") as owner:
            owner.execute("ALTER TABLE public.notes_f RENAME TO notes_f_moved")
        before = last_id(su)
        with owners.connect("owners", "outsider") as outsider:
            outsider.execute("CREATE TABLE public.notes_f (id int)")
            outsider.execute("CREATE FUNCTION public.noop() RETURNS trigger LANGUAGE plpgsql AS 'BEGIN RETURN NULL; END'")
            outsider.execute("CREATE TRIGGER vetassist_row_audit AFTER INSERT ON public.notes_f FOR EACH ROW EXECUTE FUNCTION public.noop()")
            outsider.execute("ALTER TABLE public.notes_f DISABLE TRIGGER vetassist_row_audit")
            outsider.execute("DROP TABLE public.notes_f")
        assert audit_rows_since(su, before) == []
        su.execute("REVOKE CREATE ON SCHEMA public FROM outsider")
