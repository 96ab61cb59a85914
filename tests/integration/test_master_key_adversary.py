"""A hostile review of the master key from a command (docs/operations.md, "The master key: file,
command or KMS"; docs/ARCHITECTURE.md, "The master key from a command", "Key custody"): an
application role that tries to read the command or the key, to make a backend run it, or to
suppress or flood the custody rows; a superuser whose command hangs, dies, keeps its output open
or fails for the previous key; the postmaster's reaping of the command and what it inherits.

Each finding of the review is a test here, green since its fix (the docstrings say what was
found); the other tests are attacks that held, kept as regression tests. The command
is the script of test_master_key_command.py with a few more modes; every wait polls a deadline."""
import os
import re
import subprocess
import threading
import time

import psycopg
import pytest

from vetassist_testing import expect_sqlstate, free_port, master_key_source_changed, reload_and_wait, reload_master_key, wait_for

import test_master_key_command as base
from test_master_key_command import KEY_A, KEY_B, custody_rows, encrypt_decrypt, postmaster_pid

# More modes for the stand-in KMS script (before its `esac`).
EXTRA_MODES = """  hold) echo $$ > "$dir/hold.pid"; exec sleep 1000 ;;
  killed) if [ "$(cat /proc/$PPID/comm)" = sh ]; then kill -9 $PPID; fi; kill -9 $$ ;;
  daemon) (setsid sh -c 'echo $$ > "$0/daemon.pid"; exec sleep 1000' "$dir" </dev/null >/dev/null 2>&1 &); echo {a}; exit 3 ;;
  huge) head -c 3000000 /dev/zero | tr '\\0' 'f'; exit 0 ;;
""".format(a=KEY_A)
SCRIPT = base.SCRIPT.replace("esac\n", EXTRA_MODES + "esac\n")
assert SCRIPT != base.SCRIPT

# A marker in the command text: not the key, but the command is a secret setting ("hidden, value
# shown to superusers only"), and a real one may carry a token (the scripts read VAULT_TOKEN).
TOKEN = "hvs.adversary-review-token"


class Kms(base.CommandCluster):
    """CommandCluster with the extended script."""

    script = SCRIPT

    def reload_only(self, mode):
        self.set_mode(mode)
        with self.c.connect() as su:
            su.execute("SELECT pg_reload_conf()")

    def pg_ctl(self, *args, timeout=None):
        cmd = ["sudo", "-u", "postgres", str(self.c.bin / "pg_ctl"), "-D", str(self.c.dir / "data"), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def kms():
    with Kms("adv-kms", "a", "vetassist_auth.master_key_command_timeout = '3s'") as k:
        yield k


def current_load_recorded(c):
    """Whether the custody row of the command's load in force exists (its loaded_at is the time
    verify_installation's master key source row names)."""
    with c.connect("vetassist") as su:
        return su.execute(
            "SELECT EXISTS (SELECT 1 FROM vetassist_auth.audit_log a, vetassist_auth.verify_installation() v "
            "WHERE v.check_name = 'keys: master key source' AND a.event_type = 'master_key_loaded' "
            "AND (a.details->>'loaded_at')::timestamptz = substring(v.detail from 'loaded ([^,]+),')::timestamptz)"
        ).fetchone()[0]


def log_since(c, offset):
    return c.log()[offset:]


# --- findings -------------------------------------------------------------------------------


def test_a_reload_logs_no_value_of_the_command(kms):
    """Attack: read the command's text (a SIGHUP setting shown to superusers only, which may hold
    a KMS token) from the server log, where anyone with log access reads it. On a reload that
    changes it, Postgres logs `parameter "vetassist_auth.master_key_command" changed to "<the
    command>"`; the redaction masks that line only for `vetassist_auth.master_key`
    (log_redaction::redact_setting_change matches the exact name), not for master_key_command or
    previous_master_key_command. Fix: mask that line for every hidden key setting (the three of
    them, or any name in the extension's prefix with GUC_SUPERUSER_ONLY)."""
    offset = len(kms.c.log())
    command = f"VAULT_TOKEN={TOKEN} {kms.kms}/unwrap"
    kms.c.append_conf(f"vetassist_auth.master_key_command = '{command}'")
    # A new superuser session sees the new value once the postmaster finished the reload (and
    # wrote its log lines): the postmaster accepts no connection while it reloads.
    reload_and_wait(kms.c.connect, "vetassist_auth.master_key_command", command)
    try:
        log = log_since(kms.c, offset)
        assert "vetassist_auth.master_key_command loaded the master key" in log
        assert TOKEN not in log, [line for line in log.splitlines() if TOKEN in line]
    finally:
        kms.c.append_conf(f"vetassist_auth.master_key_command = '{kms.kms}/unwrap'")
        reload_and_wait(kms.c.connect, "vetassist_auth.master_key_command", f"{kms.kms}/unwrap")


def test_alter_system_of_a_key_setting_is_logged_masked(kms):
    """Attack: read a key setting from the log a compliance configuration writes
    (log_statement = 'ddl', which AU-2/AU-12 set-ups turn on): `ALTER SYSTEM SET` of
    master_key_command or previous_master_key_command (docs: "Set the command in postgresql.conf
    (or with ALTER SYSTEM)") is logged as a `statement:` line with the value, and so is the inline
    `vetassist_auth.master_key`, the master key itself; the redaction masks neither (it masks only
    the reload's line for master_key). Fix: mask the value of ALTER SYSTEM SET for the hidden key
    settings in the statement, STATEMENT and csv/json query fields, as for statements of ours."""
    offset = len(kms.c.log())
    with kms.c.connect("vetassist") as su:
        su.execute("SET log_statement = 'ddl'")
        try:
            su.execute(f"ALTER SYSTEM SET vetassist_auth.master_key_command = 'VAULT_TOKEN={TOKEN} {kms.kms}/unwrap'")
            su.execute(f"ALTER SYSTEM SET vetassist_auth.previous_master_key_command = 'VAULT_TOKEN={TOKEN} /bin/false'")
            su.execute(f"ALTER SYSTEM SET vetassist_auth.master_key = '{KEY_B}'")
        finally:
            for name in ("master_key_command", "previous_master_key_command", "master_key"):
                su.execute(f"ALTER SYSTEM RESET vetassist_auth.{name}")
        # A statement after them: its line follows theirs in the log.
        su.execute("CREATE TABLE adversary_log_fence ()")
        su.execute("DROP TABLE adversary_log_fence")
    log = wait_for("the fence's statement line", lambda: (lambda text: text if "adversary_log_fence" in text else None)(
        log_since(kms.c, offset)))
    leaked = [line for line in log.splitlines() if TOKEN in line or KEY_B in line]
    assert not leaked, leaked


def test_a_failed_previous_command_is_55000_naming_it():
    """Attack (fault): during a master key change the previous key's command fails (a refusal,
    exit 77) while the current one works. A value under a data key wrapped by the old key then
    fails with XX001 'data key cannot be unwrapped' (data corruption, the hint saying to set
    previous_master_key_command, which is set), and verify_installation's master key source row
    says ok. The cause is known (keys/cache.rs drops load_previous_key's 55000 with `.ok()`):
    the call should be 55000 naming vetassist_auth.previous_master_key_command and why (as
    rewrap_keys() already is), and the verify_installation row should not be ok. Fix: keep the
    previous source's failure in the cache (e.g. `previous_failure`) and raise it in unwrap_row
    instead of XX001 when the previous key is configured but missing; describe_sources should
    report a previous command with no key."""
    with Kms("adv-kms-prev", "a") as k:
        with k.c.connect("vetassist", "app_user") as app:
            ct = app.execute("SELECT vetassist_auth.encrypt_text('old', 'c')").fetchone()[0]
        k.write("previous", "#!/bin/sh\necho 'token revoked' >&2\nexit 77\n")
        k.c.as_postgres("chmod", "700", str(k.kms / "previous"))
        k.c.append_conf(f"vetassist_auth.previous_master_key_command = '{k.kms}/previous'")
        ok, detail = k.reload("b")
        with k.c.connect("vetassist", "app_user") as app:
            with pytest.raises(psycopg.Error) as raised:
                app.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,))
        err = raised.value
        assert (err.sqlstate, "vetassist_auth.previous_master_key_command" in err.diag.message_primary,
                "exited with status 77" in err.diag.message_primary) == ("55000", True, True), \
            f"{err.sqlstate}: {err.diag.message_primary} / {err.diag.message_hint}"
        assert not ok, detail


def test_a_fast_shutdown_ends_a_hanging_command_at_once():
    """Attack (fault): the KMS hangs (a black-holed network) during a reload, and the DBA stops the
    server. The postmaster runs the command synchronously in the reload and handles SIGINT only
    after it, so `pg_ctl stop -m fast` waits out master_key_command_timeout (up to 10 min:
    longer than pg_ctl's default 60 s wait or systemd's stop timeout, which then SIGKILLs the
    postmaster). New connections also wait that long (docs: "a KMS outage during a reload costs
    nothing"). Fix: while waiting, watch for the postmaster's shutdown signals (a temporary
    SIGINT/SIGTERM/SIGQUIT handler that notes the signal and chains to Postgres's, or on 15
    sigpending(): its SIGHUP handler blocks them), kill the command's group and return at once;
    document that connections wait for the command, and keep the default time-out short."""
    with Kms("adv-kms-hang", "a", "vetassist_auth.master_key_command_timeout = '45s'") as k:
        runs = len(k.runs())
        k.reload_only("slow")
        wait_for("the command to be running", lambda: len(k.runs()) > runs)
        started = time.monotonic()
        stop = k.pg_ctl("-m", "fast", "-w", "-t", "20", "stop", timeout=200)
        took = time.monotonic() - started
        # Whatever happened, the server is stopped before the cluster's clean-up.
        k.pg_ctl("-m", "immediate", "-w", "-t", "200", "stop", timeout=300)
        assert stop.returncode == 0 and took < 20, (took, stop.stdout, stop.stderr)


def test_a_time_out_above_the_command_applies_in_the_same_reload_and_below_from_the_next():
    """The review's finding: Postgres assigns a reload's settings in file order, and the command
    runs in its own setting's assign hook, so a time-out written below the command line is not
    yet in force for that run. No hook runs after a reload, so this is documented
    (docs/operations.md: the time-out goes above the commands); here both orders, as documented."""
    with Kms("adv-kms-order", "a", "vetassist_auth.master_key_command_timeout = '6s'") as k:
        k.set_mode("slow")
        for lines, expected in (
            ([f"vetassist_auth.master_key_command = '{k.kms}/unwrap '",
              "vetassist_auth.master_key_command_timeout = '1s'"], "did not finish within 6 s"),
            (["vetassist_auth.master_key_command_timeout = '2s'",
              f"vetassist_auth.master_key_command = '{k.kms}/unwrap  '"], "did not finish within 2 s"),
        ):
            ok, detail = reload_master_key(k.c, *lines)
            assert expected in detail, detail


def test_a_statement_running_across_a_key_change_reads_old_values():
    """Attack (fault): the documented master key change with commands (one reload sets the new
    key's command and previous_master_key_command to the old key's) while a statement is running.
    The postmaster publishes both keys before it signals the backends, but a backend takes the
    reload only between statements: a statement that began before the reload and first needs a
    key after it reads the *new* published key while its own settings still say there is no
    previous key (cache.rs: master_source() takes the published record, previous_source() the
    backend's stale setting). A value under the old key then fails with XX001 ("cannot be
    unwrapped": data corruption), before any rewrap_keys, where a key file change is consistent
    (the backend keeps reading the old file until it takes the reload). Fix: make the backend's
    view consistent: e.g. publish with each record whether the setting is configured, and decide
    the sources from what the postmaster published (or fall back to the published previous key
    whenever it has one) rather than from the backend's not-yet-reloaded settings."""
    with Kms("adv-kms-race", "a") as k:
        with k.c.connect("vetassist", "app_user") as app:
            ct = app.execute("SELECT vetassist_auth.encrypt_text('before the change', 'c')").fetchone()[0]
        k.write("previous", "#!/bin/sh\necho " + KEY_A + "\n")
        k.c.as_postgres("chmod", "700", str(k.kms / "previous"))
        with k.c.connect("vetassist") as su, k.c.connect("vetassist", "app_user") as running:
            su.execute("SELECT pg_advisory_lock(4242)")
            pid = running.execute("SELECT pg_backend_pid()").fetchone()[0]
            result = {}

            def statement():
                try:
                    result["value"] = running.execute(
                        "WITH l AS MATERIALIZED (SELECT %s::bytea AS ct, pg_advisory_lock_shared(4242) AS x) "
                        "SELECT vetassist_auth.decrypt_text(ct, 'c') FROM l", (ct,)).fetchone()[0]
                except psycopg.Error as e:
                    result["error"] = f"{e.sqlstate}: {e.diag.message_primary}"

            thread = threading.Thread(target=statement)
            thread.start()
            wait_for("the statement to wait for the lock", lambda: su.execute(
                "SELECT 1 FROM pg_locks WHERE pid = %s AND NOT granted", (pid,)).fetchone())
            k.c.append_conf(f"vetassist_auth.previous_master_key_command = '{k.kms}/previous'")
            ok, detail = k.reload("b")
            assert ok and "previous: vetassist_auth.previous_master_key_command" in detail, detail
            su.execute("SELECT pg_advisory_unlock(4242)")
            thread.join(60)
        assert result == {"value": "before the change"}, result
        # The next statement of the same session has taken the reload in and opens it.
        with k.c.connect("vetassist", "app_user") as app:
            assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "before the change"


# --- attacks that held ----------------------------------------------------------------------


def test_an_application_role_cannot_read_the_command_or_change_it(kms):
    """SHOW, current_setting, pg_settings, pg_file_settings, pg_show_all_file_settings(),
    verify_installation, SET and ALTER ROLE SET, as app_user, outsider and a pg_monitor member."""
    with kms.c.connect("vetassist") as su:
        su.execute("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'monitor_user') THEN "
                   "CREATE ROLE monitor_user LOGIN IN ROLE pg_monitor; END IF; END $$")
    for user in ("app_user", "outsider", "monitor_user"):
        with kms.c.connect("vetassist", user) as conn:
            for sql in ("SHOW vetassist_auth.master_key_command",
                        "SELECT current_setting('vetassist_auth.master_key_command')",
                        "SELECT current_setting('vetassist_auth.previous_master_key_command', true)",
                        "SELECT string_agg(concat_ws(' ', setting, reset_val, boot_val), ',') FROM pg_settings "
                        "WHERE name LIKE 'vetassist_auth.%'",
                        "SELECT string_agg(setting, ',') FROM pg_file_settings",
                        "SELECT string_agg(setting, ',') FROM pg_show_all_file_settings()",
                        "SELECT string_agg(detail, ',') FROM vetassist_auth.verify_installation()"):
                try:
                    shown = str(conn.execute(sql).fetchall())
                except psycopg.Error as e:
                    shown = f"{e.diag.message_primary} {e.diag.message_detail} {e.diag.message_hint}"
                assert "unwrap" not in shown and KEY_A not in shown, (user, sql, shown)
            for sql in ("SET vetassist_auth.master_key_command = '/bin/true'",
                        f"ALTER ROLE {user} SET vetassist_auth.master_key_command = '/bin/true'",
                        "ALTER DATABASE vetassist SET vetassist_auth.master_key_command = '/bin/true'",
                        "ALTER SYSTEM SET vetassist_auth.master_key_command = '/bin/true'",
                        "SELECT pg_reload_conf()",
                        "LOAD 'vetassist_auth'"):
                with pytest.raises(psycopg.Error):
                    conn.execute(sql)


def test_a_connection_storm_never_runs_the_command_and_records_each_load_once(kms):
    """Many application and outsider sessions (each loading the library) run nothing: only the
    postmaster's runs are in the script's log, and one custody row stands for the load."""
    with kms.c.connect("vetassist", "app_user") as app:
        encrypt_decrypt(app)
    wait_for("the custody row of the load in force", lambda: current_load_recorded(kms.c))
    rows = custody_rows(kms.c)
    runs = kms.runs()
    for i in range(30):
        with kms.c.connect("vetassist", "outsider" if i % 3 == 0 else "app_user") as conn:
            if i % 3:
                encrypt_decrypt(conn)
            else:
                conn.execute("SELECT 1")
    assert kms.runs() == runs
    assert all(postmaster_pid(kms.c) in run.split(":") for run in runs), runs
    with kms.c.connect("vetassist", "app_user") as app:
        encrypt_decrypt(app)
    assert custody_rows(kms.c) == rows


def test_an_application_calling_itself_pg_restore_does_not_suppress_custody(kms):
    """The restore check counts pg_restore sessions of a superuser or the database owner only:
    app_user naming itself pg_restore, connected throughout, does not keep the next load off the
    record. (The reload is awaited through the setting, not verify_installation, whose own use of
    the key would record the load first.)"""
    def loads_since(t):
        with kms.c.connect("vetassist") as su:
            return su.execute("SELECT details->>'first_used_by' FROM vetassist_auth.audit_log "
                              "WHERE event_type = 'master_key_loaded' AND (details->>'loaded_at')::timestamptz > %s",
                              (t,)).fetchall()

    with psycopg.connect(kms.c.conninfo("vetassist", "app_user") + " application_name=pg_restore",
                         autocommit=True) as fake:
        fake.execute("SELECT 1")
        with kms.c.connect() as su:
            since = su.execute("SELECT now()").fetchone()[0]
        command = f"{kms.kms}/unwrap  "
        kms.c.append_conf(f"vetassist_auth.master_key_command = '{command}'")
        try:
            reload_and_wait(kms.c.connect, "vetassist_auth.master_key_command", command)
            assert loads_since(since) == []
            with kms.c.connect("vetassist", "app_user") as app:
                encrypt_decrypt(app)
            assert wait_for("the custody row of the new load", lambda: loads_since(since)) == [("app_user",)]
        finally:
            kms.c.append_conf(f"vetassist_auth.master_key_command = '{kms.kms}/unwrap'")
            reload_and_wait(kms.c.connect, "vetassist_auth.master_key_command", f"{kms.kms}/unwrap")


def test_the_command_inherits_only_stdio_and_no_blocked_or_ignored_signal(kms):
    """/proc of a long-running command (it prints nothing and execs sleep, so the postmaster waits
    for it until the time-out): descriptors 0, 1, 2 only (no listen socket, no postmaster-alive
    pipe), no blocked signal; then the key stays in force (a time-out) and the command is gone."""
    pid_file = kms.kms / "hold.pid"
    if pid_file.exists():
        kms.c.as_postgres("rm", "-f", str(pid_file))
    before = kms.source()
    kms.reload_only("hold")
    pid = int(wait_for("the command's pid", lambda: pid_file.exists() and pid_file.read_text().strip()))
    fds = wait_for("the command to exec sleep", lambda: (lambda cmd: sorted(os.listdir(f"/proc/{pid}/fd"))
                                                         if cmd.startswith(b"sleep") else None)(
        open(f"/proc/{pid}/cmdline", "rb").read()))
    status = open(f"/proc/{pid}/status").read()
    assert fds == ["0", "1", "2"], fds
    assert "SigBlk:\t0000000000000000" in status
    # Nor an ignored standard signal (the postmaster ignores SIGALRM and others; a child
    # inherits that). Signals 32 and 33 belong to the C library's threads, out of our reach.
    ignored = int(re.search(r"SigIgn:\t([0-9a-f]+)", status).group(1), 16)
    assert ignored & 0x7FFFFFFF == 0, status
    ok, detail = master_key_source_changed(kms.c, before, "the time-out")
    assert ok and "did not finish within 3 s" in detail
    wait_for("the command's process to be gone", lambda: not os.path.exists(f"/proc/{pid}") or
             "State:\tZ" in open(f"/proc/{pid}/status").read())
    kms.reload("a")


def test_failing_commands_are_reaped_without_a_crash_restart(kms):
    """A command killed by a signal, exiting non-zero after starting a daemon that outlives it,
    or printing megabytes: the postmaster reaps its own child (no 'server process ... exited' or
    crash restart: a session from before goes on), the key is withdrawn naming why, and nothing
    printed reaches the log."""
    offset = len(kms.c.log())
    with kms.c.connect("vetassist", "app_user") as running:
        pid = running.execute("SELECT pg_backend_pid()").fetchone()[0]
        for mode, why in (("killed", "was killed by signal 9"), ("daemon", "exited with status 3"),
                          ("huge", "printed no valid key")):
            ok, detail = kms.reload(mode)
            assert not ok and why in detail, (mode, detail)
            err = expect_sqlstate("55000", running, "SELECT vetassist_auth.encrypt_text('x', 'c')")
            assert why in err.diag.message_primary
        kms.reload("a")
        assert running.execute("SELECT pg_backend_pid()").fetchone()[0] == pid
        assert encrypt_decrypt(running) == "ok"
    log = log_since(kms.c, offset)
    for bad in ("exited with exit code", "terminated by signal", "terminating any other active",
                "all server processes terminated", KEY_A, "ffffffffffffffff"):
        assert bad not in log, bad
    daemon = kms.kms / "daemon.pid"
    if daemon.exists():
        subprocess.run(["kill", "-KILL", daemon.read_text().strip()], check=False, capture_output=True)


def test_a_crash_restart_republishes_the_key_without_running_the_command(kms):
    """kill -9 of a backend: the postmaster re-creates shared memory; the key is there again (the
    same load: no new custody row) and the command did not run."""
    with kms.c.connect("vetassist", "app_user") as app:
        encrypt_decrypt(app)
    wait_for("the custody row of the load in force", lambda: current_load_recorded(kms.c))
    rows = custody_rows(kms.c)
    runs = kms.runs()
    victim = kms.c.connect("vetassist", "app_user")
    pid = victim.execute("SELECT pg_backend_pid()").fetchone()[0]
    offset = len(kms.c.log())
    os.kill(pid, 9)
    wait_for("the crash restart", lambda: "database system is ready to accept connections" in log_since(kms.c, offset))
    victim.close()
    with kms.c.connect("vetassist", "app_user") as app:
        assert encrypt_decrypt(app) == "ok"
    assert kms.runs() == runs
    with kms.c.connect("vetassist", "app_user") as app:
        encrypt_decrypt(app)
    assert custody_rows(kms.c) == rows


def test_postgres_dash_c_does_not_run_the_command(kms):
    """`postgres -C` (what pg_ctl and packaging scripts run) loads the library, also for a
    runtime-computed setting (the shared memory requests, on a stopped server), and must not call
    the KMS; the next start runs it once."""
    runs = kms.runs()
    kms.pg_ctl("-m", "fast", "-w", "stop", timeout=120).check_returncode()
    try:
        for setting in ("vetassist_auth.master_key_command", "vetassist_auth.master_key_command_timeout",
                        "shared_memory_size"):
            kms.c.as_postgres(str(kms.c.bin / "postgres"), "-D", str(kms.c.dir / "data"), "-C", setting)
        assert kms.runs() == runs
    finally:
        kms.pg_ctl("-l", str(kms.c.dir / "server.log"), "-w", "-t", "60", "start", timeout=120).check_returncode()
    assert len(kms.runs()) == len(runs) + 1


def test_a_reload_storm_under_load_fails_no_call(kms):
    """Sessions encrypt and decrypt without pause while the postmaster reloads again and again,
    each run a new load of the same key or an unreachable KMS (which keeps it): no call fails
    (no XX001, no 55000), each session sees every load from its next transaction."""
    stop, errors, calls = threading.Event(), [], [0]
    with kms.c.connect("vetassist", "app_user") as app:
        old = app.execute("SELECT vetassist_auth.encrypt_text('old', 'c')").fetchone()[0]

    def work():
        with kms.c.connect("vetassist", "app_user") as conn:
            while not stop.is_set():
                try:
                    assert encrypt_decrypt(conn, "storm") == "storm"
                    assert conn.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (old,)).fetchone()[0] == "old"
                    calls[0] += 1
                except (psycopg.Error, AssertionError) as e:
                    errors.append(f"{getattr(e, 'sqlstate', '')}: {e}")
                    return

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        for i in range(16):
            ok, detail = kms.reload("unreachable" if i % 4 == 3 else "a")
            assert ok, detail
            if errors:
                break
    finally:
        stop.set()
        for t in threads:
            t.join(60)
    kms.reload("a")
    assert not errors, errors[:3]
    assert calls[0] > 16
    assert "cannot be unwrapped" not in kms.c.log()


def test_a_physical_standby_loads_the_key_and_serves_look_ups():
    """A streaming standby configured like its primary, the master key from the same command:
    its postmaster runs the command once at its start, loads the same key (the same key check) and
    records no custody row. A look-up (field_hashes) finds the primary's hash there; what makes a
    value to store (field_hash pins the key for writing) is 55000 naming the hot standby, not the
    XX000 "cannot assign TransactionIds during recovery" the review found."""
    with Kms("adv-kms-primary", "a") as k:
        with k.c.connect("vetassist", "app_user") as app:
            hashed = app.execute("SELECT vetassist_auth.field_hash('x@example.org', 'email')").fetchone()[0]
        rows = wait_for("the primary's custody row", lambda: custody_rows(k.c))
        standby = k.c.dir / "standby"
        k.c.as_postgres("rm", "-rf", str(standby))
        k.c.as_postgres("mkdir", "-p", str(standby))
        port = free_port()
        k.c.as_postgres(str(k.c.bin / "pg_basebackup"), "-h", str(k.c.dir), "-p", str(k.c.port), "-U", "postgres",
                        "-D", str(standby / "data"), "-R", "-X", "stream", "-c", "fast")
        k.c.as_postgres("bash", "-c", f"echo \"port = {port}\nunix_socket_directories = '{standby}'\" >> "
                                      f"'{standby}/data/postgresql.conf'")
        runs = len(k.runs())
        k.c.as_postgres(str(k.c.bin / "pg_ctl"), "-D", str(standby / "data"), "-l", str(standby / "server.log"),
                        "-w", "-t", "60", "start")
        try:
            assert len(k.runs()) == runs + 1
            check = next(line.split("key check ")[1][:16] for line in k.c.log().splitlines()
                         if "master_key_command loaded the master key" in line)
            log = (standby / "server.log").read_text(errors="replace")
            assert f"master_key_command loaded the master key (key check {check}" in log and KEY_A not in log
            conninfo = f"host={standby} port={port} dbname=vetassist"
            with psycopg.connect(conninfo + " user=app_user", autocommit=True) as app:
                assert app.execute("SELECT pg_is_in_recovery()").fetchone()[0]
                looked_up = app.execute("SELECT vetassist_auth.field_hashes('x@example.org', 'email')").fetchone()[0]
                err = expect_sqlstate("55000", app, "SELECT vetassist_auth.field_hash('x@example.org', 'email')")
                assert "hot standby" in err.diag.message_primary
            with psycopg.connect(conninfo + " user=postgres", autocommit=True) as su:
                recorded = su.execute("SELECT target_id FROM vetassist_auth.audit_log "
                                      "WHERE event_type = 'master_key_loaded' ORDER BY id").fetchall()
            assert [r[0] for r in recorded] == [r[0] for r in rows]
            assert hashed in looked_up
        finally:
            k.c.as_postgres(str(k.c.bin / "pg_ctl"), "-D", str(standby / "data"), "-m", "fast", "-w", "stop")


def test_unsetting_the_command_withdraws_its_key_at_once(kms):
    """A reload that unsets the command (the kill switch without the KMS): a running session and a
    new one get 55000 at their next transaction, nothing runs, and setting it again brings the key
    back."""
    with kms.c.connect("vetassist", "app_user") as running:
        ct = running.execute("SELECT vetassist_auth.encrypt_text('kept', 'c')").fetchone()[0]
        runs = kms.runs()
        kms.c.append_conf("vetassist_auth.master_key_command = ''")
        try:
            reload_and_wait(kms.c.connect, "vetassist_auth.master_key_command", "")
            assert kms.runs() == runs
            for conn in (running,):
                err = expect_sqlstate("55000", conn, "SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,))
                assert "no master key is configured" in err.diag.message_primary
            with kms.c.connect("vetassist", "app_user") as new:
                expect_sqlstate("55000", new, "SELECT vetassist_auth.encrypt_text('x', 'c')")
        finally:
            kms.c.append_conf(f"vetassist_auth.master_key_command = '{kms.kms}/unwrap'")
            reload_and_wait(kms.c.connect, "vetassist_auth.master_key_command", f"{kms.kms}/unwrap")
        assert running.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "kept"
    assert "master_key_command is unset; the master key it loaded is no longer in force" in kms.c.log()
