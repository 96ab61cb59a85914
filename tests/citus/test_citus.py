"""Scale-out on Citus: a coordinator and two workers (scripts/citus-cluster.sh), the extension's
tables distributed with vetassist_auth.distribute(), every call made as the application through
the coordinator. make test runs this on the default PostgreSQL version."""
import os
import re
import subprocess
from pathlib import Path

import psycopg
import pytest

from vetassist_testing import PG_CONFIG, ROOT, authenticator_code, citus_cluster, expect_sqlstate, reload_and_wait, seal_all, wait_for

NAME = "citus-test"
DB = "vetassist"


class Node:
    def __init__(self, role, port, socket_dir):
        self.role, self.port, self.dir = role, int(port), socket_dir

    @property
    def address(self):
        return f"127.0.0.1:{self.port}"

    def connect(self, user="postgres"):
        return psycopg.connect(f"host={self.dir} port={self.port} dbname={DB} user={user}", autocommit=True)


@pytest.fixture(scope="module")
def nodes():
    started = [Node(*n) for n in citus_cluster("start", NAME, 2, DB)]
    try:
        with started[0].connect() as su:
            su.execute("CREATE EXTENSION vetassist_auth")
            # Eight shards: enough to spread veterans over two workers, and quick to move.
            su.execute("SELECT vetassist_auth.distribute(8)")
            su.execute("CREATE ROLE citus_app LOGIN IN ROLE vetassist_app")
            su.execute("CREATE ROLE citus_admin LOGIN IN ROLE vetassist_admin")
            su.execute("CREATE ROLE citus_auditor LOGIN IN ROLE vetassist_auditor")
        yield started
    finally:
        citus_cluster("stop", NAME)


@pytest.fixture
def coordinator(nodes):
    return nodes[0]


@pytest.fixture
def app(coordinator):
    with coordinator.connect("citus_app") as conn:
        yield conn


def workers(nodes):
    return [n for n in nodes if n.role == "worker"]


def sign_in(app, n):
    """A veteran signs in: account, VA tokens, a session. Returns (user id, jwt id)."""
    icn = f"10126679{n:02d}V1234{n:02d}"
    uid = app.execute("SELECT vetassist_auth.upsert_va_user(%s, 'veteran', %s, 'Maria', 'Lopez')",
                      (icn, f"vet{n}@example.com")).fetchone()[0]
    app.execute("SELECT vetassist_auth.store_va_tokens(%s, %s, %s, now() + interval '1 hour', 'openid')",
                (uid, f"access-{n}", f"refresh-{n}"))
    jti = f"jti-{n}-{uid}"
    app.execute("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 day', '203.0.113.7')", (uid, jti))
    return uid, jti


def test_distribute_colocates_per_veteran_tables_and_replicates_keys(coordinator):
    with coordinator.connect() as su:
        placement = dict(su.execute(
            "SELECT logicalrelid::text, CASE partmethod WHEN 'n' THEN 'reference' ELSE colocationid::text END "
            "FROM pg_dist_partition").fetchall())
        assert placement["vetassist_auth.keys"] == "reference"
        users_group = placement["vetassist_auth.users"]
        for table in ("va_tokens", "sessions", "session_activity", "session_events", "mfa_settings",
                      "mfa_backup_codes", "trusted_devices"):
            assert placement[f"vetassist_auth.{table}"] == users_group, table
        # The JWT routes are distributed by jwt_id, apart from the veterans' group.
        assert placement["vetassist_auth.session_routes"] not in ("reference", users_group)
        # Local on every node: each seals its own rows.
        assert "vetassist_auth.audit_log" not in placement
        # A second call changes nothing.
        assert su.execute("SELECT count(*) FROM vetassist_auth.distribute()").fetchone()[0] == 0
        failed = su.execute("SELECT check_name, detail FROM vetassist_auth.verify_installation() WHERE NOT ok").fetchall()
        assert failed == []
        assert su.execute("SELECT ok FROM vetassist_auth.verify_installation() WHERE check_name = 'citus workers'"
                          ).fetchone() == (True,)


def test_the_sign_in_journey_runs_each_veteran_on_one_shard(nodes, coordinator, app):
    """Every per-veteran call after sign-in reaches a single shard: with
    citus.multi_task_query_log_level = error, any statement that fanned out would fail the call."""
    placed = {}
    for n in range(1, 7):
        uid, jti = sign_in(app, n)
        app.execute("SET citus.multi_task_query_log_level = error")
        try:
            assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0] == f"access-{n}"
            assert app.execute("SELECT vetassist_auth.touch_session(%s)", (jti,)).fetchone()[0] == "ACTIVE"
            # A touch past session_touch_interval writes: activity recorded, live_until moved.
            with coordinator.connect() as su:
                su.execute("UPDATE vetassist_auth.sessions SET last_activity_at = now() - interval '1 hour' "
                           "WHERE user_id = %s", (uid,))
            assert app.execute("SELECT vetassist_auth.touch_session(%s)", (jti,)).fetchone()[0] == "ACTIVE"
            with coordinator.connect() as su:
                assert su.execute("SELECT count(*) FROM vetassist_auth.session_activity WHERE user_id = %s",
                                  (uid,)).fetchone()[0] == 1
                assert su.execute("SELECT last_activity_at > now() - interval '1 minute' FROM vetassist_auth.sessions "
                                  "WHERE user_id = %s", (uid,)).fetchone()[0]
            assert app.execute("SELECT vetassist_auth.session_status(%s::text)", (jti,)).fetchone()[0] == "ACTIVE"
            uri = app.execute("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uid,)).fetchone()[0]
            assert app.execute("SELECT vetassist_auth.mfa_confirm_totp(%s, %s)",
                               (uid, authenticator_code(uri))).fetchone()[0]
            assert app.execute("SELECT vetassist_auth.mfa_required(%s)", (jti,)).fetchone()[0]
            assert app.execute("SELECT vetassist_auth.mfa_verify(%s, %s)",
                               (jti, authenticator_code(uri, 1))).fetchone()[0]
            codes = app.execute("SELECT vetassist_auth.mfa_generate_backup_codes(%s, 3)", (uid,)).fetchone()[0]
            assert len(codes) == 3
            status, _, user_id, _, mfa_required, _, _ = app.execute(
                "SELECT * FROM vetassist_auth.authenticate(%s, '203.0.113.7')", (jti,)).fetchone()
            assert (status, user_id, mfa_required) == ("ACTIVE", uid, False)
            app.execute("SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', '{}', %s)", (uid,))
            app.execute("SELECT vetassist_auth.record_disclosure(%s, 'County registry', 'Labs', 'public_health')", (uid,))
            assert [r[0] for r in app.execute("SELECT recipient FROM vetassist_auth.my_disclosures(%s)", (jti,))
                    if r[0]] == ["County registry"]
            assert app.execute("SELECT first_name FROM vetassist_auth.user_profile(%s)", (uid,)).fetchone()[0] == "Maria"
            gen, token = app.execute("SELECT * FROM vetassist_auth.refresh_session_token(%s, NULL, 'r1')",
                                     (jti,)).fetchone()
            assert (gen, token) == (1, "r1")
            assert app.execute("SELECT generation FROM vetassist_auth.refresh_session_token(%s, 'r1', 'r2')",
                               (jti,)).fetchone()[0] == 2
            app.execute("SELECT vetassist_auth.log_session_event(%s, 'crisis_line_requested', 'crisis')", (jti,))
            assert app.execute("SELECT vetassist_auth.end_session(%s, 'logout')", (jti,)).fetchone()[0]
            assert app.execute("SELECT vetassist_auth.touch_session(%s)", (jti,)).fetchone()[0] == "TERMINATED"
            app.execute("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 day')", (uid, jti + "-b"))
            assert app.execute("SELECT vetassist_auth.end_user_sessions(%s, 'signed out everywhere')",
                               (uid,)).fetchone()[0] == 1
            app.execute("SELECT vetassist_auth.set_actor(NULL)")
        finally:
            app.execute("RESET citus.multi_task_query_log_level")
        with coordinator.connect() as su:
            placed[uid] = su.execute("SELECT node FROM vetassist_auth.veteran_placement(%s)", (uid,)).fetchone()[0]
    # Each veteran's rows are on its worker's shard; more veterans sign in until both workers
    # hold some (hashing puts six on one worker about one time in 32).
    extra = 100
    while set(placed.values()) != {w.address for w in workers(nodes)} and extra < 130:
        uid, _ = sign_in(app, extra)
        with coordinator.connect() as su:
            placed[uid] = su.execute("SELECT node FROM vetassist_auth.veteran_placement(%s)", (uid,)).fetchone()[0]
        extra += 1
    assert set(placed.values()) == {w.address for w in workers(nodes)}
    for uid, address in placed.items():
        worker = next(w for w in workers(nodes) if w.address == address)
        with coordinator.connect() as su:
            shard = su.execute("SELECT shard_name('vetassist_auth.va_tokens', "
                               "get_shard_id_for_distribution_column('vetassist_auth.va_tokens', %s))",
                               (uid,)).fetchone()[0]
        with worker.connect() as w:
            assert w.execute(f"SELECT count(*) FROM {shard} WHERE user_id = %s", (uid,)).fetchone()[0] == 1


def test_the_single_shard_check_catches_a_fan_out(app):
    """The control for the test above: an ICN look-up asks every shard, and the setting refuses it."""
    sign_in(app, 20)
    app.execute("SET citus.multi_task_query_log_level = error")
    try:
        with pytest.raises(psycopg.Error, match="multi-task"):
            app.execute("SELECT vetassist_auth.find_user_by_icn('1012667920V123420')")
    finally:
        app.execute("RESET citus.multi_task_query_log_level")
    assert app.execute("SELECT vetassist_auth.find_user_by_icn('1012667920V123420')").fetchone()[0] is not None


def test_rotation_on_the_coordinator_reaches_every_node(nodes, coordinator, app):
    uid, jti = sign_in(app, 30)
    with coordinator.connect("citus_admin") as admin:
        old_token_key = admin.execute("SELECT key_id FROM vetassist_auth.keys WHERE purpose = 'token' "
                                      "AND status = 'active'").fetchone()[0]
        new_token_key = admin.execute("SELECT vetassist_auth.rotate_key('token')").fetchone()[0]
        admin.execute("SELECT vetassist_auth.rotate_key('phi')")
        admin.execute("SELECT vetassist_auth.rotate_key('hash')")
        while admin.execute("SELECT vetassist_auth.reencrypt(1000)").fetchone()[0] > 0:
            pass
    # Nothing of the veterans' is left under the old keys, on any worker.
    with coordinator.connect() as su:
        left = su.execute(
            "SELECT count(*) FROM vetassist_auth.key_usage k JOIN vetassist_auth.keys USING (key_id) "
            "WHERE keys.status <> 'active' AND k.used_by LIKE ANY (ARRAY['users.%encrypted', 'va_tokens.%', "
            "'users.%hash'])").fetchone()[0]
        assert left == 0
    for worker in workers(nodes):
        with worker.connect() as w:
            assert w.execute("SELECT status FROM vetassist_auth.keys WHERE key_id = %s",
                             (new_token_key,)).fetchone() == ("active",)
    # A call that moves nothing (from a fresh session, writing nothing) retires the old keys.
    with coordinator.connect("citus_admin") as admin:
        for _ in range(2):
            assert admin.execute("SELECT vetassist_auth.reencrypt(1000)").fetchone()[0] == 0
        assert admin.execute("SELECT status FROM vetassist_auth.keys WHERE key_id = %s",
                             (old_token_key,)).fetchone() == ("retired",)
    # Every value still opens, and a look-up by ICN finds the account under the new hash key.
    assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0] == "access-30"
    assert app.execute("SELECT vetassist_auth.find_user_by_icn('1012667930V123430')").fetchone()[0] == uid
    assert app.execute("SELECT email FROM vetassist_auth.user_profile(%s)", (uid,)).fetchone()[0] == "vet30@example.com"
    assert app.execute("SELECT vetassist_auth.touch_session(%s)", (jti,)).fetchone()[0] == "ACTIVE"


def test_workers_decrypt_but_only_the_coordinator_encrypts(nodes, app):
    """Every node holds every key, so a worker opens any value; encrypting there would count
    against a counter of the worker's own, so it is refused (the limit is the coordinator's)."""
    sealed = app.execute("SELECT vetassist_auth.encrypt_text('a note', 'app.note:1')").fetchone()[0]
    for worker in workers(nodes):  # Citus created the login role on every worker
        with worker.connect("citus_app") as on_worker:
            assert on_worker.execute("SELECT vetassist_auth.decrypt_text(%s, 'app.note:1')",
                                     (sealed,)).fetchone()[0] == "a note"
            refused = expect_sqlstate("55000", on_worker, "SELECT vetassist_auth.encrypt_text('x', 'app.note:2')")
            assert "coordinator" in str(refused)


def test_the_mfa_lock_out_holds_and_locks_the_session(app):
    """The lock-out counts the failures the coordinator's log holds; the count must not be taken
    on the shard's worker, whose log has none of them."""
    uid, jti = sign_in(app, 45)
    uri = app.execute("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uid,)).fetchone()[0]
    assert app.execute("SELECT vetassist_auth.mfa_confirm_totp(%s, %s)", (uid, authenticator_code(uri))).fetchone()[0]
    wrong = "000000" if authenticator_code(uri) != "000000" else "111111"
    for _ in range(5):  # mfa_max_failures
        assert app.execute("SELECT vetassist_auth.mfa_verify(%s, %s)", (jti, wrong)).fetchone()[0] is False
    assert app.execute("SELECT vetassist_auth.session_status(%s::text)", (jti,)).fetchone()[0] == "LOCKED"
    other = jti + "-after"
    app.execute("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 day')", (uid, other))
    expect_sqlstate("28000", app, "SELECT vetassist_auth.mfa_verify(%s, %s)", (other, authenticator_code(uri, 1)))


def test_the_application_cannot_call_the_api_on_a_worker(nodes, app):
    """On a worker a call would see only that worker's log: its disclosures would miss the
    coordinator's accounting and its MFA failures the lock-out. Refused (55000) before anything
    is disclosed."""
    uid, jti = sign_in(app, 46)
    uri = app.execute("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uid,)).fetchone()[0]
    app.execute("SELECT vetassist_auth.mfa_confirm_totp(%s, %s)", (uid, authenticator_code(uri)))
    for worker in workers(nodes):
        with worker.connect("citus_app") as on_worker:
            for call, args in (("SELECT * FROM vetassist_auth.user_profile(%s)", (uid,)),
                               ("SELECT vetassist_auth.va_access_token(%s)", (uid,)),
                               ("SELECT vetassist_auth.mfa_verify(%s, %s)", (jti, authenticator_code(uri, 1))),
                               ("SELECT vetassist_auth.touch_session(%s)", (jti,)),
                               ("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 day')",
                                (uid, jti + "-w")),
                               ("SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', '{}')", ())):
                with pytest.raises(psycopg.Error) as refused:
                    on_worker.execute(call, args)
                assert refused.value.sqlstate == "55000", call
                assert "coordinator" in str(refused.value)
    # Nothing was disclosed or changed: the coordinator still serves the veteran as before.
    assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0] == "access-46"
    expect_sqlstate("P0002", app, "SELECT vetassist_auth.touch_session(%s)", (jti + "-w",))


def test_worker_logs_keep_no_value_of_our_calls(nodes, coordinator, app):
    """What the coordinator sends a worker for our calls carries their values as literals
    (ciphertexts, hashes, JWT ids, clinical details): the worker's log masks them too."""
    for worker in workers(nodes):
        with worker.connect() as w:
            w.execute("ALTER SYSTEM SET log_statement = 'all'")
        reload_and_wait(worker.connect, "log_statement", "all")
    try:
        uid, jti = sign_in(app, 47)
        app.execute("SELECT vetassist_auth.create_session(%s, 'jti-LOGCANARY-47', now() + interval '1 day', "
                    "'203.0.113.9', 'UA-LOGCANARY-47')", (uid,))
        app.execute("SELECT vetassist_auth.log_session_event('jti-LOGCANARY-47', 'note', 'info', "
                    "'{\"note\": \"CLINICAL-LOGCANARY-47\"}')")
        with pytest.raises(psycopg.Error):  # a unique violation on the worker logs its statement
            app.execute("SELECT vetassist_auth.create_session(%s, 'jti-LOGCANARY-47', now() + interval '1 day')",
                        (uid,))
    finally:
        for worker in workers(nodes):
            with worker.connect() as w:
                w.execute("ALTER SYSTEM RESET log_statement")
                w.execute("SELECT pg_reload_conf()")
    logs = "".join((Path(w.dir) / "server.log").read_text(errors="replace") for w in workers(nodes))
    assert "session_events_" in logs and "<redacted>" in logs  # the shard statements were logged
    assert "LOGCANARY" not in logs


def test_one_sweeper_for_the_cluster(nodes, coordinator, app):
    uid, jti = sign_in(app, 40)
    with coordinator.connect() as su:
        su.execute("UPDATE vetassist_auth.sessions SET live_until = now() - interval '1 second' "
                   "WHERE user_id = %s", (uid,))
    # A worker's sweep does nothing, even where sweep_database is set: the coordinator sweeps.
    for worker in workers(nodes):
        with worker.connect() as w:
            assert w.execute("SELECT vetassist_auth.expire_sessions()").fetchone()[0] == 0
    with coordinator.connect("citus_admin") as admin:
        assert admin.execute("SELECT vetassist_auth.expire_sessions()").fetchone()[0] >= 1
        assert admin.execute("SELECT vetassist_auth.expire_sessions()").fetchone()[0] == 0
    assert app.execute("SELECT vetassist_auth.touch_session(%s)", (jti,)).fetchone()[0] == "EXPIRED"


def seal_cluster(coordinator):
    with coordinator.connect("citus_admin") as admin:
        seal_all(admin)
        admin.execute("SELECT vetassist_auth.seal_worker_audit_logs(100000)")


def test_a_tampered_row_on_one_worker_is_found_and_named(nodes, coordinator, app):
    sign_in(app, 50)
    seal_cluster(coordinator)
    with coordinator.connect("citus_auditor") as auditor:
        ok, checked, bad, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain()").fetchone()
        assert (ok, bad, problem) == (True, None, None)
        heads = auditor.execute("SELECT node, seq FROM vetassist_auth.audit_chain_heads()").fetchall()
        assert {node for node, _ in heads} == {"coordinator"} | {w.address for w in workers(nodes)}
    victim = workers(nodes)[1]
    with victim.connect() as w:
        seq, audit_id, event = w.execute(
            "SELECT s.seq, a.id, a.event_type FROM vetassist_auth.audit_seals s "
            "JOIN vetassist_auth.audit_log a ON a.id = s.audit_id ORDER BY s.seq DESC LIMIT 1 OFFSET 2").fetchone()
        w.execute("SET session_replication_role = replica")  # a superuser's edit, past the append-only trigger
        w.execute("UPDATE vetassist_auth.audit_log SET event_type = 'nothing_to_see' WHERE id = %s", (audit_id,))
    try:
        with coordinator.connect("citus_auditor") as auditor:
            ok, checked, bad, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain()").fetchone()
        assert not ok
        assert bad == seq
        assert problem.startswith(f"node {victim.address}: ")
        assert checked > 0
    finally:
        with victim.connect() as w:
            w.execute("SET session_replication_role = replica")
            w.execute("UPDATE vetassist_auth.audit_log SET event_type = %s WHERE id = %s", (event, audit_id))
    with coordinator.connect("citus_auditor") as auditor:
        assert auditor.execute("SELECT ok FROM vetassist_auth.verify_audit_chain()").fetchone()[0]


def test_a_new_worker_and_a_rebalance_keep_tokens_sessions_and_chains(nodes, coordinator, app):
    # Forty veterans: the shards that move (about three of eight) hold some of them, but for a
    # chance of about 1 in 10^8.
    veterans = [sign_in(app, n) for n in range(130, 170)]
    new = Node(*citus_cluster("add-worker", NAME, 3, DB)[0])
    nodes.append(new)
    with coordinator.connect() as su:
        su.execute("SELECT citus_add_node('127.0.0.1', %s)", (new.port,))
        su.execute("SELECT citus_rebalance_start(shard_transfer_mode => 'block_writes')")
        su.execute("SELECT citus_rebalance_wait()")
        moved_here = su.execute("SELECT count(*) FROM pg_dist_shard_placement WHERE nodeport = %s",
                                (new.port,)).fetchone()[0]
        assert moved_here > 0
        on_new = [uid for uid, _ in veterans
                  if su.execute("SELECT node FROM vetassist_auth.veteran_placement(%s)", (uid,)).fetchone()[0]
                  == new.address]
    for n, (uid, jti) in zip(range(130, 170), veterans):
        assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0] == f"access-{n}"
        assert app.execute("SELECT vetassist_auth.touch_session(%s)", (jti,)).fetchone()[0] == "ACTIVE"
    # Among them veterans whose shard moved.
    assert on_new, "no veteran's shard moved to the new worker"
    seal_cluster(coordinator)
    with coordinator.connect("citus_auditor") as auditor:
        ok, _, _, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain()").fetchone()
        assert ok, problem
    with coordinator.connect() as su:
        verified = {row[0] for row in su.execute("SELECT node FROM vetassist_auth.worker_audit_chains()")}
        assert verified == {w.address for w in workers(nodes)}
        assert su.execute("SELECT ok FROM vetassist_auth.verify_installation() WHERE check_name = 'citus workers'"
                          ).fetchone() == (True,)


def test_each_nodes_anchor_is_checked_on_its_node(nodes, coordinator, app):
    """A superuser who cuts the newest rows and seals off a worker's chain leaves a chain that
    still links up; that worker's anchor, kept from audit_chain_heads(), finds the cut."""
    sign_in(app, 70)
    seal_cluster(coordinator)
    with coordinator.connect("citus_auditor") as auditor:
        anchors = auditor.execute("SELECT node, seq, hash FROM vetassist_auth.audit_chain_heads()").fetchall()
        assert {node for node, _, _ in anchors} >= {"coordinator"} | {w.address for w in workers(nodes)}
        for node, seq, digest in anchors:
            ok, _, _, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain_at(%s, %s, %s)",
                                                (node, seq, digest)).fetchone()
            assert ok, (node, problem)
        expect_sqlstate("22023", auditor, "SELECT * FROM vetassist_auth.verify_audit_chain_at('127.0.0.1:1', 1, '\\x00')")
    victim = workers(nodes)[0]
    seq, digest = next((s, d) for node, s, d in anchors if node == victim.address)
    with victim.connect() as w:
        w.execute("SET session_replication_role = replica")
        w.execute("DELETE FROM vetassist_auth.audit_log WHERE id IN "
                  "(SELECT audit_id FROM vetassist_auth.audit_seals WHERE seq >= %s)", (seq,))
        w.execute("DELETE FROM vetassist_auth.audit_seals WHERE seq >= %s", (seq,))
    with coordinator.connect("citus_auditor") as auditor:
        # The cut chain still links up ...
        assert auditor.execute("SELECT ok FROM vetassist_auth.verify_audit_chain()").fetchone()[0]
        # ... but not to the anchor.
        ok, _, bad, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain_at(%s, %s, %s)",
                                              (victim.address, seq, digest)).fetchone()
        assert not ok and bad == seq
        assert "removed from its end" in problem


def test_the_coordinator_counts_the_workers_audit_keys(nodes, coordinator):
    """key_usage on the coordinator (which decides what may retire) includes the audit keys
    of every worker's seals."""
    seal_cluster(coordinator)
    with coordinator.connect() as su:
        counted = {r[0] for r in su.execute(
            "SELECT key_id FROM vetassist_auth.key_usage WHERE used_by = 'audit_seals.key_id'")}
    for worker in workers(nodes):
        with worker.connect() as w:
            used = {r[0] for r in w.execute("SELECT DISTINCT key_id FROM vetassist_auth.audit_seals")}
        assert used and used <= counted, worker.address


def test_a_purge_on_the_coordinator_purges_every_node(nodes, coordinator, app):
    sign_in(app, 80)
    seal_cluster(coordinator)
    for node in nodes:
        with node.connect() as su:
            su.execute("ALTER SYSTEM SET vetassist_auth.audit_min_retention = 0")
        reload_and_wait(node.connect, "vetassist_auth.audit_min_retention", "0")
    try:
        with coordinator.connect("citus_admin") as admin:
            assert admin.execute("SELECT vetassist_auth.purge_audit_log('0 seconds')").fetchone()[0] > 0
        for worker in workers(nodes):
            with worker.connect() as w:
                checkpoint = w.execute("SELECT checkpoint_seq FROM vetassist_auth.audit_seal_state").fetchone()[0]
                assert checkpoint > 0, worker.address
                assert w.execute("SELECT count(*) FROM vetassist_auth.audit_seals WHERE seq <= %s",
                                 (checkpoint,)).fetchone()[0] == 0
        seal_cluster(coordinator)
        with coordinator.connect("citus_auditor") as auditor:
            ok, _, _, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain()").fetchone()
            assert ok, problem
    finally:
        for node in nodes:
            with node.connect() as su:
                su.execute("ALTER SYSTEM RESET vetassist_auth.audit_min_retention")
                su.execute("SELECT pg_reload_conf()")


def test_the_coordinators_sweeper_logs_every_nodes_chain_head(nodes, coordinator):
    """Anchors out of a worker superuser's reach: the coordinator's server log."""
    log = Path(coordinator.dir) / "server.log"
    with coordinator.connect() as su:
        su.execute("ALTER SYSTEM SET vetassist_auth.sweep_interval = 1")
    reload_and_wait(coordinator.connect, "vetassist_auth.sweep_interval", "1s")
    try:
        pattern = re.compile(r"audit chain head seq=\d+ hash=[0-9a-f]{64} timeline=\d+ lsn=[0-9A-F]+/[0-9A-F]+((; node 127\.0\.0\.1:\d+ seq=\d+ hash=[0-9a-f]{64})+)")
        found = wait_for("the chain heads in the coordinator's log",
                         lambda: pattern.findall(log.read_text(errors="replace")), timeout=30)
        logged = set(re.findall(r"node (127\.0\.0\.1:\d+)", found[-1][0]))
        assert logged == {w.address for w in workers(nodes)}
    finally:
        with coordinator.connect() as su:
            su.execute("ALTER SYSTEM RESET vetassist_auth.sweep_interval")
            su.execute("SELECT pg_reload_conf()")


def test_retirement_stops_while_a_worker_cannot_be_asked(nodes, coordinator):
    """The coordinator cannot know which audit keys an unreachable worker's seals use, so the
    key usage that decides retirement fails (55000) instead of guessing."""
    down = workers(nodes)[-1]
    subprocess.run([ROOT / "scripts/cluster.sh", "stop", Path(down.dir).name], check=True,
                   env={**os.environ, "PG_CONFIG": PG_CONFIG})
    with coordinator.connect() as su:
        refused = expect_sqlstate("55000", su, "SELECT count(*) FROM vetassist_auth.key_usage")
        assert down.address in str(refused)
    with coordinator.connect("citus_auditor") as auditor:
        ok, _, _, problem = auditor.execute("SELECT * FROM vetassist_auth.verify_audit_chain()").fetchone()
        assert not ok and problem.startswith(f"node {down.address}: ")
        # The down worker is named, not left out, where anchors are taken.
        heads = dict(auditor.execute("SELECT node, seq FROM vetassist_auth.audit_chain_heads()").fetchall())
        assert down.address in heads and heads[down.address] is None
