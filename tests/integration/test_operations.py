"""Day-2 operations under attack and load: rotation with transactions in flight, retired keys
brought back, a master key change with traffic, clock-based time-outs, two tabs refreshing,
data-only restores, failover from a logical replica, and sealing a backlog."""
import random
import subprocess
import threading
import time

import psycopg
import pytest

from vetassist_testing import BIN, Cluster, authenticator_code, expect_sqlstate, install, installed_cluster

PHI_PURPOSES = ("token", "phi", "hash")


def drain_reencrypt(admin, until_retired=True):
    """reencrypt until nothing is left to move and (until_retired) no key waits for old
    snapshots to end (an autovacuum worker's, say); every call must succeed."""
    for _ in range(200):
        if admin.execute("SELECT vetassist_auth.reencrypt(1000)").fetchone()[0] == 0 and not (until_retired and admin.execute(
                "SELECT count(*) FROM vetassist_auth.keys WHERE retire_after IS NOT NULL").fetchone()[0]):
            return
        time.sleep(0.05)
    raise AssertionError("reencrypt never finished")


def rotate_all_and_reencrypt(admin):
    for purpose in PHI_PURPOSES:
        admin.execute("SELECT vetassist_auth.rotate_key(%s)", (purpose,))
    drain_reencrypt(admin, until_retired=False)


def key_status(su, key_id):
    return su.execute("SELECT status FROM vetassist_auth.keys WHERE key_id = %s", (key_id,)).fetchone()[0]


def old_keys(su):
    """The keys that are not active: every one a rotation has moved off."""
    return dict(su.execute("SELECT key_id, status FROM vetassist_auth.keys WHERE status <> 'active'").fetchall())


def sign_in(conn, icn, name="Pat"):
    return conn.execute("SELECT vetassist_auth.upsert_va_user(%s, 'veteran', %s, %s, 'Doe')",
                        (icn, f"{name.lower()}@example.org", name)).fetchone()[0]


def profile(conn, uid):
    return conn.execute("SELECT va_icn, email, first_name FROM vetassist_auth.user_profile(%s)", (uid,)).fetchone()


@pytest.fixture(scope="module")
def ops():
    with installed_cluster("ops", "max_prepared_transactions = 4", "max_connections = 40") as c:
        yield c


def test_a_transaction_open_across_three_rotations_and_reencrypt_loses_nothing(ops):
    """The issue's exact sequence: B writes under the old keys and commits after A rotated every
    purpose and ran reencrypt to the end. Nothing B wrote may become unreadable or unfindable."""
    with ops.connect("vetassist", "app_user") as app, ops.connect("vetassist", "admin_user") as admin, \
            ops.connect("vetassist") as su, ops.connect("vetassist", "app_user", autocommit=False) as b:
        u0 = sign_in(app, "9900000010V1")
        app.execute("SELECT vetassist_auth.store_va_tokens(%s, 'access-0', 'refresh-0', now() + interval '1 hour', NULL)", (u0,))
        b.execute("SELECT vetassist_auth.store_va_tokens(%s, 'access-b', 'refresh-b', now() + interval '1 hour', NULL)", (u0,))
        u1 = sign_in(b, "9900000011V1", "New")
        rotate_all_and_reencrypt(admin)
        # B still holds its keys: none of them may be retired while it is open.
        assert "retired" not in old_keys(su).values()
        b.commit()
        assert profile(app, u1) == ("9900000011V1", "new@example.org", "New")
        assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (u0,)).fetchone()[0] == "access-b"
        assert app.execute("SELECT vetassist_auth.va_refresh_token(%s)", (u0,)).fetchone()[0] == "refresh-b"
        assert app.execute("SELECT vetassist_auth.find_user_by_icn('9900000011V1')").fetchone()[0] == u1
        assert sign_in(app, "9900000011V1", "New") == u1  # the next sign-in finds the account
        drain_reencrypt(admin)  # the rotation finishes, and now retires what nothing needs
        assert set(old_keys(su).values()) == {"retired"}
        assert profile(app, u1) == ("9900000011V1", "new@example.org", "New")
        assert app.execute("SELECT vetassist_auth.find_user_by_icn('9900000011V1')").fetchone()[0] == u1


def test_a_repeatable_read_snapshot_keeps_the_key_its_rows_need(ops):
    with ops.connect("vetassist", "app_user") as app, ops.connect("vetassist", "admin_user") as admin, \
            ops.connect("vetassist", "app_user", autocommit=False) as reader:
        uid = sign_in(app, "9900000012V1", "Rita")
        reader.execute("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ")
        assert profile(reader, uid)[2] == "Rita"  # the snapshot is taken here
        rotate_all_and_reencrypt(admin)
        # The snapshot still sees the row as it was, under the old key: it must still open.
        assert profile(reader, uid)[2] == "Rita"
        reader.commit()
        drain_reencrypt(admin)
        assert profile(app, uid)[2] == "Rita"


def test_a_prepared_transaction_keeps_the_key_it_wrote_under(ops):
    with ops.connect("vetassist", "app_user") as app, ops.connect("vetassist", "admin_user") as admin, \
            ops.connect("vetassist") as su:
        active = dict(su.execute("SELECT purpose, key_id FROM vetassist_auth.keys WHERE status = 'active'").fetchall())
        with ops.connect("vetassist", "app_user", autocommit=False) as writer:
            uid = sign_in(writer, "9900000013V1", "Prep")
            writer.execute("PREPARE TRANSACTION 'ops-prepared'")
        rotate_all_and_reencrypt(admin)
        assert key_status(su, active["phi"]) == "decrypt_only" and key_status(su, active["hash"]) == "decrypt_only"
        su.execute("COMMIT PREPARED 'ops-prepared'")
        assert profile(app, uid)[2] == "Prep"
        assert app.execute("SELECT vetassist_auth.find_user_by_icn('9900000013V1')").fetchone()[0] == uid
        drain_reencrypt(admin)
        assert profile(app, uid)[2] == "Prep"


@pytest.mark.load
def test_rotating_and_reencrypting_in_a_loop_under_writers_and_readers(ops):
    """8 application clients sign in (the same ICNs from several clients), store tokens and read
    them back in multi-statement transactions while an admin rotates every purpose and
    re-encrypts without pause. No call may fail; afterwards every value opens and every ICN has
    exactly one account."""
    icns = [f"99000001{i:02d}V1" for i in range(30)]
    errors, accounts, stop = [], {}, threading.Event()
    lock = threading.Lock()

    def client(n):
        rng = random.Random(n)
        with ops.connect("vetassist", "app_user", autocommit=False) as conn:
            while not stop.is_set():
                icn = rng.choice(icns)
                try:
                    uid = sign_in(conn, icn, f"Vet{icn[6:10]}")
                    time.sleep(rng.random() / 50)  # stay open across the admin's calls
                    conn.execute("SELECT vetassist_auth.store_va_tokens(%s, %s, %s, now() + interval '1 hour', NULL)",
                                 (uid, f"access-{icn}-{n}", f"refresh-{icn}"))
                    assert profile(conn, uid)[0] == icn
                    assert conn.execute("SELECT vetassist_auth.find_user_by_icn(%s)", (icn,)).fetchone()[0] == uid
                    conn.commit()
                    with lock:
                        accounts.setdefault(icn, set()).add(uid)
                except Exception as e:  # noqa: BLE001 - every failure is a finding
                    conn.rollback()
                    errors.append(f"client {n}: {type(e).__name__}: {e}")

    def administrator():
        with ops.connect("vetassist", "admin_user") as admin:
            while not stop.is_set():
                try:
                    rotate_all_and_reencrypt(admin)
                except Exception as e:  # noqa: BLE001
                    errors.append(f"admin: {type(e).__name__}: {e}")

    threads = [threading.Thread(target=client, args=(n,)) for n in range(8)] + [threading.Thread(target=administrator)]
    for t in threads:
        t.start()
    time.sleep(10)
    # ... and until every ICN has signed in at least once (the random choice may leave one out on a
    # slow machine), or a client failed.
    deadline = time.monotonic() + 120
    while len(accounts) < len(icns) and not errors and time.monotonic() < deadline:
        time.sleep(0.1)
    stop.set()
    for t in threads:
        t.join()
    assert not errors, "\n".join(sorted(set(errors))[:8])
    with ops.connect("vetassist", "admin_user") as admin, ops.connect("vetassist", "app_user") as app, \
            ops.connect("vetassist") as su:
        drain_reencrypt(admin)
        assert len(accounts) == len(icns) and all(len(uids) == 1 for uids in accounts.values())
        for icn, (uid,) in accounts.items():
            assert profile(app, uid)[0] == icn
            assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0].startswith(f"access-{icn}-")
            assert app.execute("SELECT vetassist_auth.find_user_by_icn(%s)", (icn,)).fetchone()[0] == uid
        rotations = su.execute("SELECT count(*) FROM vetassist_auth.keys").fetchone()[0]
        assert rotations > 3 * len(PHI_PURPOSES)  # the admin really rotated during the load


def test_a_value_that_does_not_open_never_fails_or_stalls_reencrypt(ops):
    """A damaged or foreign ciphertext under a usable key id (a partial restore from another
    database, say): reencrypt moves every other row, warns about it, and its key stays."""
    with ops.connect("vetassist", "app_user") as app, ops.connect("vetassist", "admin_user") as admin, \
            ops.connect("vetassist") as su:
        uids = [sign_in(app, f"99000002{i:02d}V1", "Good") for i in range(3)]
        bad = sign_in(app, "9900000299V1", "Bad")
        # A ciphertext that names the active phi key but was sealed for another row.
        su.execute("""UPDATE vetassist_auth.users SET email_encrypted = vetassist_auth.seal_phi_text('x@y.z', 'users.email:elsewhere')
                      WHERE id = %s""", (bad,))
        bad_key = su.execute("SELECT vetassist_auth.envelope_key_id(email_encrypted) FROM vetassist_auth.users WHERE id = %s",
                             (bad,)).fetchone()[0]
        warnings = []
        admin.add_notice_handler(lambda diag: warnings.append(diag.message_primary))
        admin.execute("SELECT vetassist_auth.rotate_key('phi')")
        drain_reencrypt(admin, until_retired=False)
        assert any("remain under old keys" in w for w in warnings), warnings
        new_phi = su.execute("SELECT key_id FROM vetassist_auth.keys WHERE purpose = 'phi' AND status = 'active'").fetchone()[0]
        for uid in uids:  # every other row moved
            assert su.execute("SELECT vetassist_auth.envelope_key_id(email_encrypted) FROM vetassist_auth.users WHERE id = %s",
                              (uid,)).fetchone()[0] == new_phi
            assert profile(app, uid)[2] == "Good"
        assert key_status(su, bad_key) == "decrypt_only"  # still named by a stored value
        su.execute("DELETE FROM vetassist_auth.users WHERE id = %s", (bad,))
        drain_reencrypt(admin)
        assert key_status(su, bad_key) == "retired"


def test_an_admin_can_bring_a_retired_key_back_until_it_is_destroyed(ops):
    """A value kept outside the extension's tables (here: the application's own table) is not
    tracked, so its key retires; unretire_key brings it back, destroy_key shreds it, audited."""
    with ops.connect("vetassist", "app_user") as app, ops.connect("vetassist", "admin_user") as admin, \
            ops.connect("vetassist") as su:
        kept = app.execute("SELECT vetassist_auth.encrypt_text('kept outside', 'app.note')").fetchone()[0]
        key_id = int.from_bytes(kept[1:5], "big")
        admin.execute("SELECT vetassist_auth.rotate_key('phi')")
        drain_reencrypt(admin)
        assert key_status(su, key_id) == "retired"
        expect_sqlstate("XX001", app, "SELECT vetassist_auth.decrypt_text(%s, 'app.note')", (kept,))
        expect_sqlstate("42501", app, "SELECT vetassist_auth.unretire_key(%s)", (key_id,))
        assert admin.execute("SELECT vetassist_auth.unretire_key(%s)", (key_id,)).fetchone()[0] is True
        assert key_status(su, key_id) == "decrypt_only"
        assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'app.note')", (kept,)).fetchone()[0] == "kept outside"
        # Nothing the extension tracks uses it, so the next reencrypt retires it again.
        drain_reencrypt(admin)
        assert key_status(su, key_id) == "retired"
        assert admin.execute("SELECT vetassist_auth.destroy_key(%s)", (key_id,)).fetchone()[0] is True
        for call in ("unretire_key", "destroy_key"):
            expect_sqlstate("P0002", admin, f"SELECT vetassist_auth.{call}(%s)", (key_id,))
        active = su.execute("SELECT key_id FROM vetassist_auth.keys WHERE purpose = 'phi' AND status = 'active'").fetchone()[0]
        expect_sqlstate("P0002", admin, "SELECT vetassist_auth.destroy_key(%s)", (active,))
        expect_sqlstate("XX001", app, "SELECT vetassist_auth.decrypt_text(%s, 'app.note')", (kept,))
        assert su.execute("SELECT wrapped_key IS NULL AND destroyed_at IS NOT NULL FROM vetassist_auth.keys WHERE key_id = %s",
                          (key_id,)).fetchone()[0]
        events = [r[0] for r in su.execute("""SELECT event_type FROM vetassist_auth.audit_log
                                               WHERE target_table = 'keys' AND target_id = %s ORDER BY id""",
                                           (str(key_id),)).fetchall()]
        assert events[-3:] == ["key_unretired", "key_retired", "key_destroyed"]


def test_the_extension_works_without_preloading():
    """Preloading is recommended (log redaction from the first statement, the worker), not
    required: CREATE EXTENSION and the API work in a server that never loaded the library."""
    with installed_cluster("nopreload", preload="") as c:
        with c.connect("vetassist", "app_user") as app:
            uid = sign_in(app, "9900000021V1", "Nopre")
            assert profile(app, uid)[2] == "Nopre"
        with c.connect("vetassist") as su:
            assert su.execute("SELECT count(*) FROM pg_settings WHERE name = 'vetassist_auth.sweep_database'").fetchone()[0] == 0


@pytest.mark.load
def test_changing_the_master_key_under_traffic_sees_no_error():
    """The runbook: new key file, both settings and one reload, rewrap_keys(), drop the old
    setting. Eight clients read old values, hash and write the whole time."""
    with installed_cluster("masterchange", "max_connections = 40") as c:
        with c.connect("vetassist") as su:
            su.execute("GRANT pg_read_server_files TO admin_user")
            old_values = [su.execute("SELECT vetassist_auth.encrypt_text(%s, 'c')", (f"v{i}",)).fetchone()[0] for i in range(20)]
            email_hash = su.execute("SELECT vetassist_auth.field_hash('a@b.c', 'email')").fetchone()[0]
        errors, calls, stop = [], [0] * 8, threading.Event()  # calls: per client

        def client(n):
            with c.connect("vetassist", "app_user") as conn:
                while not stop.is_set():
                    try:
                        i = n % len(old_values)
                        assert conn.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (old_values[i],)).fetchone()[0] == f"v{i}"
                        assert conn.execute("SELECT vetassist_auth.field_hash('A@B.C', 'email')").fetchone()[0] == email_hash
                        assert conn.execute("SELECT vetassist_auth.decrypt_text(vetassist_auth.encrypt_text('new', 'c'), 'c')").fetchone()[0] == "new"
                        calls[n] += 1
                    except Exception as e:  # noqa: BLE001
                        errors.append(f"{type(e).__name__}: {e}")

        def traffic_goes_on():
            """Waits until every client has made two calls since (polled, not a fixed sleep): its
            backend has then begun a statement after the step, and so has taken a reload sent
            before it (Postgres reloads between statements)."""
            targets = [done + 2 for done in calls]
            for _ in range(1200):
                if all(done >= target for done, target in zip(calls, targets)) or errors:
                    return
                time.sleep(0.05)
            raise AssertionError(f"the clients made no progress: {calls} of {targets}")

        threads = [threading.Thread(target=client, args=(n,)) for n in range(8)]
        for t in threads:
            t.start()
        traffic_goes_on()
        # Returns once new sessions see the new master key (polled after the reload).
        new_master_key_in_force(c, "master-2.key")
        traffic_goes_on()
        with c.connect("vetassist", "admin_user") as admin:
            assert admin.execute("SELECT vetassist_auth.rewrap_keys()").fetchone()[0] == 2  # phi and hash
        traffic_goes_on()
        c.set_conf("vetassist_auth.previous_master_key_file", "")
        traffic_goes_on()
        stop.set()
        for t in threads:
            t.join()
        assert not errors, errors[:5]
        assert sum(calls) > 50
        with c.connect("vetassist", "app_user") as conn:  # the old file is no longer consulted
            assert conn.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (old_values[0],)).fetchone()[0] == "v0"


def test_time_outs_are_decided_by_the_clock_not_the_transaction_start(ops):
    ops.psql("""DO $$ BEGIN
                  IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'short_idle_app') THEN
                    CREATE ROLE short_idle_app LOGIN IN ROLE vetassist_app;
                  END IF;
                END $$;
                ALTER ROLE short_idle_app SET vetassist_auth.session_idle_timeout = 2""", "vetassist")
    with ops.connect("vetassist", "short_idle_app") as app:
        uid = sign_in(app, "9900000014V1")
        app.execute("SELECT vetassist_auth.create_session(%s, 'jwt-clock', now() + interval '1 hour')", (uid,))
    with ops.connect("vetassist", "short_idle_app", autocommit=False) as tx:
        tx.execute("SELECT 1")  # the transaction (and now()) starts here
        time.sleep(2.5)
        assert tx.execute("SELECT vetassist_auth.session_status('jwt-clock'::text)").fetchone()[0] == "EXPIRED"
        assert tx.execute("SELECT vetassist_auth.touch_session('jwt-clock')").fetchone()[0] == "EXPIRED"


def test_two_tabs_refreshing_at_once_keep_the_session(ops):
    with ops.connect("vetassist", "app_user") as app:
        uid = sign_in(app, "9900000015V1")
        app.execute("SELECT vetassist_auth.create_session(%s, 'jwt-tabs', now() + interval '1 hour')", (uid,))
        assert app.execute("SELECT vetassist_auth.rotate_session_refresh_token('jwt-tabs', NULL, 'r1')").fetchone()[0] == 1
    results, pids = {}, {}
    refreshed, second_waits = threading.Event(), threading.Event()

    def tab(name):
        with ops.connect("vetassist", "app_user", autocommit=False) as conn:
            pids[name] = conn.info.backend_pid
            results[name] = conn.execute("SELECT * FROM vetassist_auth.refresh_session_token('jwt-tabs', 'r1', %s)",
                                         (f"r2-{name}",)).fetchone()
            if name == "a":  # holds its row lock until the second tab waits on it
                refreshed.set()
                assert second_waits.wait(60), "the second tab never waited on the first"
            conn.commit()

    # Ordered by events and the lock wait itself, not by sleeps (a slow thread start swapped them).
    first = threading.Thread(target=tab, args=("a",))
    first.start()
    assert refreshed.wait(60)
    second = threading.Thread(target=tab, args=("b",))
    second.start()  # blocks on the first tab's row lock, then sees its rotation
    with ops.connect("vetassist") as su:
        for _ in range(1200):
            if "b" in pids and su.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                                          (pids["b"],)).fetchone()[0]:
                break
            time.sleep(0.05)
    second_waits.set()
    first.join()
    second.join()
    assert results == {"a": (2, "r2-a"), "b": (2, "r2-a")}
    with ops.connect("vetassist", "app_user") as app:
        assert app.execute("SELECT vetassist_auth.session_status('jwt-tabs'::text)").fetchone()[0] == "ACTIVE"
        assert app.execute("SELECT vetassist_auth.rotate_session_refresh_token('jwt-tabs', 'r2-a', 'r3')").fetchone()[0] == 3


def pg_tool(cluster, *args):
    return subprocess.run(["sudo", "-u", "postgres", str(BIN / args[0]), *args[1:], "-h", str(cluster.dir), "-p", str(cluster.port), "-U", "postgres"],
                          capture_output=True, text=True)


def test_a_data_only_restore_is_refused_in_a_used_database_and_works_in_a_fresh_one(ops):
    with ops.connect("vetassist", "app_user") as app:
        uid = sign_in(app, "9900000016V1", "Rest")
        app.execute("SELECT vetassist_auth.store_va_tokens(%s, 'access-r', 'refresh-r', now() + interval '1 hour', NULL)", (uid,))
    dump = ops.dir / "data-only.dump"
    out = pg_tool(ops, "pg_dump", "-Fc", "--data-only", "--schema", "vetassist_auth", "-f", str(dump), "vetassist")
    assert out.returncode == 0, out.stderr
    install(ops, "used")
    with ops.connect("used", "app_user") as used:
        mine = sign_in(used, "9900000099V1", "Mine")
    before = ops.connect("used").execute("SELECT count(*) FROM vetassist_auth.users").fetchone()[0]
    out = pg_tool(ops, "pg_restore", "--data-only", "--single-transaction", "--exit-on-error", "-d", "used", str(dump))
    # Refused at the first table whose rows cannot belong here: audit ids already taken, or the
    # key guard (when the audit rows of both happen not to overlap).
    assert out.returncode != 0
    assert "audit_log_pkey" in out.stderr or "this database already has data keys" in out.stderr
    with ops.connect("used", "app_user") as used:  # nothing was loaded, and what was there still works
        assert ops.connect("used").execute("SELECT count(*) FROM vetassist_auth.users").fetchone()[0] == before
        assert profile(used, mine)[2] == "Mine"
    install(ops, "fresh")
    out = pg_tool(ops, "pg_restore", "--data-only", "--single-transaction", "--exit-on-error", "-d", "fresh", str(dump))
    assert out.returncode == 0, out.stderr
    with ops.connect("fresh", "app_user") as fresh:
        assert profile(fresh, uid)[2] == "Rest"
        assert fresh.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0] == "access-r"
        assert sign_in(fresh, "9900000017V1", "After") is not None  # the sequences came along


@pytest.mark.load
def test_failover_to_a_logical_replica_after_resync_sequences():
    with installed_cluster("primary", "wal_level = logical") as primary:
        replica = Cluster("replica", "shared_preload_libraries = 'vetassist_auth'")
        try:
            install(replica)
            # The replica opens the same data keys: same master key file.
            replica.as_postgres("cp", str(primary.key_file), str(replica.key_file))
            with replica.connect() as conn:
                conn.execute("SELECT pg_reload_conf()")
            with primary.connect("vetassist", "app_user") as app:
                uid = sign_in(app, "9900000018V1", "Repl")
                app.execute("SELECT vetassist_auth.create_session(%s, 'jwt-repl', now() + interval '1 hour')", (uid,))
                app.execute("SELECT vetassist_auth.audit_event('phi', 'viewed', 'success', '{}')")
            primary.psql("CREATE PUBLICATION vetassist_pub FOR TABLES IN SCHEMA vetassist_auth", "vetassist")
            replica.psql(f"CREATE SUBSCRIPTION vetassist_sub CONNECTION 'host={primary.dir} port={primary.port} "
                         "dbname=vetassist user=postgres' PUBLICATION vetassist_pub", "vetassist")
            with primary.connect("vetassist", "app_user") as app:
                app.execute("SELECT vetassist_auth.touch_session('jwt-repl')")
                later = sign_in(app, "9900000019V1", "Late")
            with replica.connect("vetassist") as rsu:
                for _ in range(200):
                    # Every table copied (the initial sync of each ends on its own) and the later
                    # change applied.
                    if rsu.execute("SELECT count(*) FROM vetassist_auth.users WHERE id = %s", (later,)).fetchone()[0] \
                            and not rsu.execute("SELECT count(*) FROM pg_subscription_rel WHERE srsubstate <> 'r'").fetchone()[0]:
                        break
                    time.sleep(0.1)
                else:
                    raise AssertionError("the replica never caught up")
                # Failover: the primary is gone; the replica becomes the database.
                rsu.execute("ALTER SUBSCRIPTION vetassist_sub DISABLE")
                rsu.execute("ALTER SUBSCRIPTION vetassist_sub SET (slot_name = NONE)")
                rsu.execute("DROP SUBSCRIPTION vetassist_sub")
            with replica.connect("vetassist", "app_user") as app:
                with pytest.raises(psycopg.Error) as err:  # sequences were not replicated
                    sign_in(app, "9900000020V1")
                assert err.value.sqlstate == "23505"
            with replica.connect("vetassist", "admin_user") as admin:
                moved = dict(admin.execute("SELECT * FROM vetassist_auth.resync_sequences()").fetchall())
                assert "audit_log_id_seq" in moved
                # The encryptions counted since the last mirror went with the primary: new keys.
                active = dict(admin.execute("SELECT purpose, key_id FROM vetassist_auth.keys WHERE status = 'active'").fetchall())
                assert moved["phi key rotated"] == active["phi"] and moved["token key rotated"] == active["token"]
            with replica.connect("vetassist", "app_user") as app:
                assert profile(app, uid)[2] == "Repl"
                assert sign_in(app, "9900000020V1") is not None
                assert app.execute("SELECT vetassist_auth.touch_session('jwt-repl')").fetchone()[0] == "ACTIVE"
            with replica.connect("vetassist") as rsu:
                ok = rsu.execute("SELECT ok, problem FROM vetassist_auth.verify_audit_chain()").fetchone()
                assert ok[0], ok[1]
        finally:
            replica.stop()
            with primary.connect() as conn:
                conn.execute("SELECT pg_drop_replication_slot(slot_name) FROM pg_replication_slots")


@pytest.mark.load
def test_sealing_a_backlog_reads_a_bounded_number_of_rows_per_batch():
    """20,000 unsealed rows sealed 1,000 at a time: each call reads about its batch, not the log.
    (Autovacuum is off so that no worker's transaction start holds the time range open.)"""
    with installed_cluster("backlog", "autovacuum = off") as cluster:
        seal_backlog(cluster)


def seal_backlog(cluster):
    with cluster.connect("vetassist", "app_user") as app:
        app.execute("SELECT count(vetassist_auth.audit_event('phi', 'viewed', 'success', '{}')) FROM generate_series(1, 20000)")
    # A call also rereads the rows of the last second (its margin against clock steps between
    # backends): start once the backlog is older than that.
    time.sleep(1.2)
    reads = []
    with cluster.connect("vetassist", "admin_user", autocommit=False) as admin:
        tuples_read = """SELECT coalesce(sum(coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0)), 0)
                         FROM pg_stat_xact_user_tables WHERE schemaname = 'vetassist_auth'
                         AND relname IN ('audit_log', 'audit_seals')"""
        while True:
            # This transaction's counters also hold earlier ones not yet flushed: take the difference.
            before = admin.execute(tuples_read).fetchone()[0]
            sealed = admin.execute("SELECT vetassist_auth.seal_audit_log(1000)").fetchone()[0]
            read = admin.execute(tuples_read).fetchone()[0] - before
            admin.commit()
            if sealed == 0:
                break
            reads.append(read)
    assert len(reads) >= 20
    with cluster.connect("vetassist") as su:
        # A call reads its batch plus the tail of the time index: one BRIN block range (128 pages).
        per_page = su.execute("""SELECT count(*) / (pg_relation_size('vetassist_auth.audit_log') / current_setting('block_size')::int)
                                 FROM vetassist_auth.audit_log""").fetchone()[0]
    assert max(reads) <= 2 * 1000 + 128 * per_page, (reads, per_page)
    assert max(reads[-5:]) <= max(reads[:5]) + 100, reads  # no growth as the sealed log grows
    with cluster.connect("vetassist") as su:
        ok, checked, _, problem = su.execute("SELECT * FROM vetassist_auth.verify_audit_chain()").fetchone()
        assert ok and checked >= 20000, problem


def old_key_ids(admin):
    return {r[0] for r in admin.execute("SELECT key_id FROM vetassist_auth.keys WHERE status <> 'active'").fetchall()}


def test_old_keys_retire_when_reencrypt_runs_once_per_session():
    """pg_cron or `psql -c` in a loop: one reencrypt() per new connection. The old keys must
    retire within a few such sessions. (Autovacuum is off: none of its snapshots holds a key.)"""
    with installed_cluster("oncepersession", "autovacuum = off") as c:
        with c.connect("vetassist", "app_user") as app:
            uid = sign_in(app, "9900000030V1", "Once")
            app.execute("SELECT vetassist_auth.store_va_tokens(%s, 'access-1', 'refresh-1', now() + interval '1 hour', NULL)", (uid,))
        with c.connect("vetassist", "admin_user") as admin:
            for purpose in PHI_PURPOSES:
                admin.execute("SELECT vetassist_auth.rotate_key(%s)", (purpose,))
            rotated = old_key_ids(admin)
        assert len(rotated) == len(PHI_PURPOSES)
        for _ in range(6):
            with c.connect("vetassist", "admin_user") as admin:
                admin.execute("SELECT vetassist_auth.reencrypt(1000)")
        with c.connect("vetassist", "admin_user") as admin:
            statuses = dict(admin.execute("SELECT key_id, status FROM vetassist_auth.keys WHERE key_id = ANY(%s)",
                                          (list(rotated),)).fetchall())
        assert set(statuses.values()) == {"retired"}, statuses
        with c.connect("vetassist", "app_user") as app:
            assert profile(app, uid)[2] == "Once"
            assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0] == "access-1"


def test_the_reencrypt_warning_hint_names_what_an_admin_can_run(ops):
    """The WARNING about values left under old keys points vetassist_admin to something it may
    read, and that names the key and the column."""
    install(ops, "hint")
    with ops.connect("hint", "app_user") as app, ops.connect("hint", "admin_user") as admin, \
            ops.connect("hint") as su:
        sign_in(app, "9900000031V1", "Good")
        bad = sign_in(app, "9900000032V1", "Bad")
        # A ciphertext that names the active phi key but was sealed for another row: it never opens.
        su.execute("""UPDATE vetassist_auth.users SET email_encrypted = vetassist_auth.seal_phi_text('x@y.z', 'users.email:elsewhere')
                      WHERE id = %s""", (bad,))
        bad_key = su.execute("SELECT vetassist_auth.envelope_key_id(email_encrypted) FROM vetassist_auth.users WHERE id = %s",
                             (bad,)).fetchone()[0]
        hints = []
        admin.add_notice_handler(lambda diag: hints.append(diag.message_hint) if "remain under old keys" in (diag.message_primary or "") else None)
        admin.execute("SELECT vetassist_auth.rotate_key('phi')")
        drain_reencrypt(admin, until_retired=False)
        assert hints, "no WARNING"
        hint = hints[-1]
        assert "key_usage_summary()" in hint, hint
        assert "FROM vetassist_auth.key_usage " not in hint, hint
        rows = admin.execute("SELECT key_id, purpose, status, used_by, stored_values FROM vetassist_auth.key_usage_summary()").fetchall()
        assert (bad_key, "phi", "decrypt_only", "users.email_encrypted", 1) in rows, rows
        with pytest.raises(psycopg.Error) as err:  # still not the view itself
            admin.execute("SELECT count(*) FROM vetassist_auth.key_usage")
        assert err.value.sqlstate == "42501"
        with ops.connect("hint", "app_user") as app2, pytest.raises(psycopg.Error) as err:
            app2.execute("SELECT * FROM vetassist_auth.key_usage_summary()")
        assert err.value.sqlstate == "42501"


def test_field_hash_caches_stay_bounded_with_many_field_names(ops):
    """Distinct field names (400k grew a backend by 100 MiB): the per-backend caches keep a
    bounded number of entries. Called as app_user in the superuser's backend (SET ROLE), which
    then reads the sizes of that same backend's caches."""
    with ops.connect("vetassist") as su:
        su.execute("SET ROLE app_user")
        su.execute("SELECT count(vetassist_auth.field_hash('v', 'field_' || i)) FROM generate_series(1, 20000) i")
        su.execute("SELECT count(vetassist_auth.field_hashes('v', 'other_' || i)) FROM generate_series(1, 5000) i")
        su.execute("SELECT count(vetassist_auth.field_hash('v', repeat('x', 100000) || i)) FROM generate_series(1, 50) i")
        su.execute("RESET ROLE")
        sizes = dict(su.execute("SELECT cache, entries FROM vetassist_auth.key_cache_sizes()").fetchall())
    assert sizes["field keys"] <= 1024, sizes
    assert all(n <= 1024 for n in sizes.values()), sizes


def new_master_key_in_force(c, name):
    """Runbook steps 1-2: a new key file, master_key_file pointing at it and
    previous_master_key_file at the old one, one reload; returns once new sessions see it."""
    old_file, new_file = c.key_file, c.dir / name
    c.as_postgres("bash", "-c", f"umask 077; head -c 32 /dev/urandom | od -An -tx1 | tr -d ' \\n' > '{new_file}'")
    c.as_postgres("bash", "-c", f"""cat >> '{c.dir}/data/postgresql.conf' <<EOF
vetassist_auth.previous_master_key_file = '{old_file}'
vetassist_auth.master_key_file = '{new_file}'
EOF""")
    with c.connect() as conn:
        conn.execute("SELECT pg_reload_conf()")
    for _ in range(200):
        with c.connect() as conn:
            if conn.execute("SELECT current_setting('vetassist_auth.master_key_file')").fetchone()[0] == str(new_file):
                return
        time.sleep(0.05)
    raise AssertionError("the new master key was not reloaded")


def wait_until_waiting_on_a_lock(su, pid):
    for _ in range(400):
        if su.execute("SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s", (pid,)).fetchone()[0]:
            return
        time.sleep(0.05)
    raise AssertionError("the session never waited on a lock")


def key_wrapping_check(conn):
    return conn.execute("SELECT ok, detail FROM vetassist_auth.verify_installation() "
                        "WHERE check_name = 'keys: wrapped under the current master key'").fetchone()


def test_a_master_key_change_keeps_keys_created_by_a_transaction_open_across_the_reload():
    """Admin: BEGIN; rotate_key('hash'); reload to a new master key; rotate_key('phi');
    rewrap_keys() in another session waits for the admin, then wraps both new keys; the old
    key file can go. verify_installation() says before that whether any key still needs it."""
    with installed_cluster("masteropen") as c:
        with c.connect("vetassist") as su:
            su.execute("GRANT pg_read_server_files TO admin_user")
        with c.connect("vetassist", "app_user") as app:
            uid = sign_in(app, "9900000040V1", "Wrap")
        with c.connect("vetassist", "admin_user", autocommit=False) as tx, c.connect("vetassist") as su:
            tx.execute("SELECT vetassist_auth.rotate_key('hash')")
            new_master_key_in_force(c, "master-2.key")
            # The reload reaches an idle session before its next statement but one.
            tx.execute("SELECT 1")
            tx.execute("SELECT vetassist_auth.rotate_key('phi')")
            result = {}

            def rewrap():
                with c.connect("vetassist", "admin_user") as admin:
                    result["pid"] = admin.info.backend_pid
                    result["rewrapped"] = admin.execute("SELECT vetassist_auth.rewrap_keys()").fetchone()[0]

            t = threading.Thread(target=rewrap)
            t.start()
            for _ in range(200):
                if "pid" in result:
                    break
                time.sleep(0.05)
            wait_until_waiting_on_a_lock(su, result["pid"])
            tx.commit()
            t.join()
            assert result["rewrapped"] >= 2, result
        with c.connect("vetassist", "admin_user") as admin:
            assert key_wrapping_check(admin) == (True, "every data key opens under the current master key")
        with c.connect("vetassist", "app_user") as app:
            note = app.execute("SELECT vetassist_auth.encrypt_text('after the change', 'app.note')").fetchone()[0]
            uid2 = sign_in(app, "9900000041V1", "Late")
        c.set_conf("vetassist_auth.previous_master_key_file", "")
        with c.connect("vetassist", "app_user") as app:
            assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'app.note')", (note,)).fetchone()[0] == "after the change"
            assert profile(app, uid)[2] == "Wrap"
            assert profile(app, uid2)[2] == "Late"
            assert app.execute("SELECT vetassist_auth.find_user_by_icn('9900000041V1')").fetchone()[0] == uid2


def test_verify_installation_names_the_keys_that_still_need_the_previous_master_key():
    with installed_cluster("masterverify") as c:
        with c.connect("vetassist", "app_user") as app:
            sign_in(app, "9900000042V1", "Check")
        with c.connect("vetassist", "admin_user") as admin:
            assert key_wrapping_check(admin)[0]
            before = admin.execute("SELECT count(*) FROM vetassist_auth.keys").fetchone()[0]
        new_master_key_in_force(c, "master-2.key")
        with c.connect("vetassist", "admin_user") as admin:
            ok, detail = key_wrapping_check(admin)
            assert not ok
            assert detail.startswith(f"{before} data key(s) open only under the previous master key"), detail
        with c.connect("vetassist") as su:
            su.execute("GRANT pg_read_server_files TO admin_user")
        with c.connect("vetassist", "admin_user") as admin:
            assert admin.execute("SELECT vetassist_auth.rewrap_keys()").fetchone()[0] == before
            assert key_wrapping_check(admin)[0]


@pytest.mark.load
def test_keys_the_recorder_creates_under_constant_load_follow_a_master_key_change():
    """The recorder reloads its configuration between batches, not only when idle: a key it
    creates after the reload (here the first mfa key) is wrapped under the new master key."""
    with installed_cluster("masterload", "max_connections = 40") as c:
        with c.connect("vetassist") as su:
            su.execute("GRANT pg_read_server_files TO admin_user")
        with c.connect("vetassist", "app_user") as app:
            uids = [sign_in(app, f"99000000{50 + i}V1", "Load") for i in range(4)]
        errors, stop = [], threading.Event()

        def reader(uid):  # each profile read is a disclosure the recorder writes
            with c.connect("vetassist", "app_user") as conn:
                while not stop.is_set():
                    try:
                        conn.execute("SELECT * FROM vetassist_auth.user_profile(%s)", (uid,)).fetchone()
                    except Exception as e:  # noqa: BLE001
                        errors.append(f"{type(e).__name__}: {e}")

        threads = [threading.Thread(target=reader, args=(uids[n % len(uids)],)) for n in range(8)]
        for t in threads:
            t.start()
        try:
            new_master_key_in_force(c, "master-2.key")
            with c.connect("vetassist", "app_user") as app:
                uri = app.execute("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uids[0],)).fetchone()[0]
            with c.connect("vetassist", "admin_user") as admin:
                admin.execute("SELECT vetassist_auth.rewrap_keys()")
                ok, detail = key_wrapping_check(admin)
                assert ok, detail
        finally:
            stop.set()
            for t in threads:
                t.join()
        assert not errors, errors[:5]
        c.set_conf("vetassist_auth.previous_master_key_file", "")
        with c.connect("vetassist", "app_user") as app:
            assert app.execute("SELECT vetassist_auth.mfa_confirm_totp(%s, %s)", (uids[0], authenticator_code(uri))).fetchone()[0]


def test_a_hash_rotation_finishes_while_the_audit_log_keeps_ip_hashes_for_years(ops):
    """0.1.5: the audit log's IP hashes were under the hash key, and the log keeps rows for six
    years and never rewrites one: an old hash key could never retire. The audit log's IP hashes
    have keys of their own (purpose audit_ip) that retire as the purge removes the rows under
    them; both stay searchable by IP until then."""
    install(ops, "auditip")
    ip = "198.51.100.23"
    with ops.connect("auditip", "app_user") as app, ops.connect("auditip", "admin_user") as admin, \
            ops.connect("auditip") as su:
        uid = sign_in(app, "9900000033V1", "Ipa")
        with app.transaction():
            app.execute("SELECT vetassist_auth.set_actor(%s, %s)", (uid, ip))
            app.execute("SELECT vetassist_auth.audit_event('phi', 'viewed', 'success', '{}')")

        def from_ip():
            return su.execute("SELECT count(*) FROM vetassist_auth.audit_log "
                              "WHERE ip_hash = ANY(vetassist_auth.field_hashes(%s, 'ip'))", (ip,)).fetchone()[0]

        assert from_ip() == 1
        old_hash = su.execute("SELECT vetassist_auth.active_key_id('hash')").fetchone()[0]
        admin.execute("SELECT vetassist_auth.rotate_key('hash')")
        drain_reencrypt(admin)
        assert key_status(su, old_hash) == "retired"
        assert from_ip() == 1

        old_ip_key = su.execute("SELECT vetassist_auth.active_key_id('audit_ip')").fetchone()[0]
        admin.execute("SELECT vetassist_auth.rotate_key('audit_ip')")
        drain_reencrypt(admin)
        assert key_status(su, old_ip_key) == "decrypt_only"  # the row under it is still kept
        assert from_ip() == 1
        while su.execute("SELECT vetassist_auth.seal_audit_log(10000)").fetchone()[0] > 0:
            pass
        su.execute("SET vetassist_auth.audit_min_retention = 0")
        assert su.execute("SELECT vetassist_auth.purge_audit_log('0 seconds')").fetchone()[0] > 0
        drain_reencrypt(admin)
        assert key_status(su, old_ip_key) == "retired"


def test_an_actor_set_in_a_rolled_back_savepoint_does_not_outlive_it(ops):
    """Adversary review: set_actor inside a savepoint pinned the audit_ip key for the
    subtransaction only, but its IP hash stayed in force after ROLLBACK TO SAVEPOINT: a later
    audit row of the transaction carried a hash under a key nothing held, which retired (and
    could be destroyed) while that row was being written."""
    install(ops, "savepointactor")
    ip = "10.9.9.9"
    with ops.connect("savepointactor", "app_user") as app, ops.connect("savepointactor", "admin_user") as admin, \
            ops.connect("savepointactor") as su:
        with app.transaction():
            app.execute("SELECT vetassist_auth.set_actor(NULL, %s)", (ip,))
        key = su.execute("SELECT vetassist_auth.active_key_id('audit_ip')").fetchone()[0]
        with ops.connect("savepointactor", "app_user", autocommit=False) as open_tx:
            open_tx.execute("SAVEPOINT s")
            open_tx.execute("SELECT vetassist_auth.set_actor(NULL, %s)", (ip,))
            open_tx.execute("ROLLBACK TO SAVEPOINT s")
            open_tx.execute("SELECT vetassist_auth.audit_event('app', 'viewed_page', 'success', '{}')")
            admin.execute("SELECT vetassist_auth.rotate_key('audit_ip')")
            for _ in range(3):
                admin.execute("SELECT vetassist_auth.reencrypt(1000)")
            open_tx.commit()
        # The savepoint's actor is gone with it: the row names no IP.
        assert su.execute("SELECT ip_hash IS NULL FROM vetassist_auth.audit_log WHERE event_type = 'viewed_page'").fetchone()[0]
        under_key = su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE vetassist_auth.hash_key_id(ip_hash) = %s",
                               (key,)).fetchone()[0]
        if under_key:
            assert key_status(su, key) != "retired"
        assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE ip_hash = ANY(vetassist_auth.field_hashes(%s, 'ip'))",
                          (ip,)).fetchone()[0] == under_key
