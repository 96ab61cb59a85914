"""The master key from a command the postmaster runs (docs/operations.md, "The master key from a
KMS"): at start and at every reload, never by a backend, with a time-out; what it prints never
reaches a log line; a failed run keeps or withdraws the key by its exit status; only one source;
a previous key from a command for rewrap_keys; every load on record in the audit log.

The command here is a small script whose behaviour a file switches (no KMS: test_kms.py runs the
real ones). Every wait after a reload waits for what the postmaster publishes, never a fixed time."""
import re
import subprocess

import pytest

from vetassist_testing import Cluster, expect_sqlstate, install, master_key_source, reload_master_key, wait_for

KEY_A = "a1" * 32
KEY_B = "b2" * 32

SCRIPT = """#!/bin/sh
# Test stand-in for a KMS unwrap: which key (or failure) the file `mode` says.
dir=$(dirname "$0")
# Who ran it: the shell of `sh -c` and its parent (the postmaster, unless the shell exec'd this).
echo "$PPID:$(cut -d' ' -f4 /proc/$PPID/stat)" >> "$dir/runs"
case "$(cat "$dir/mode")" in
  a) echo {a}; echo "kms_key_id=test/kms"; echo "kms_key_version=1" ;;
  b) echo {b}; echo "kms_key_id=test/kms"; echo "kms_key_version=2" ;;
  noisy) echo "stderr says {a}" >&2; echo {a} ;;
  unreachable) echo "no route to kms" >&2; exit 75 ;;
  refused) echo "permission denied" >&2; exit 77 ;;
  garbage) echo "{a}-but-not-only"; exit 0 ;;
  slow) sleep 120 ;;
esac
""".format(a=KEY_A, b=KEY_B)


class CommandCluster:
    """A cluster whose master key comes from `<dir>/kms/unwrap` (mode file `<dir>/kms/mode`)."""

    script = SCRIPT

    def __init__(self, name, mode="a", *extra):
        self.name, self.extra = name, extra
        self.mode_at_start = mode

    def __enter__(self):
        # The cluster directory is made by cluster.sh; the script lives beside the data directory.
        self.c = Cluster(self.name, "shared_preload_libraries = 'vetassist_auth'", "vetassist_auth.master_key_file = ''",
                         *self.extra)
        self.kms = self.c.dir / "kms"
        self.c.as_postgres("mkdir", "-p", str(self.kms))
        self.write("unwrap", self.script)
        self.c.as_postgres("chmod", "700", str(self.kms / "unwrap"))
        self.set_mode(self.mode_at_start)
        self.c.append_conf(f"vetassist_auth.master_key_command = '{self.kms}/unwrap'")
        self.restart()
        install(self.c)
        return self

    def __exit__(self, *exc):
        self.c.stop()

    def write(self, name, text):
        subprocess.run(["sudo", "-u", "postgres", "tee", str(self.kms / name)], input=text, text=True, check=True,
                       capture_output=True)

    def set_mode(self, mode):
        self.write("mode", mode + "\n")

    def runs(self):
        path = self.kms / "runs"
        return path.read_text().split() if path.exists() else []

    def restart(self):
        self.c.as_postgres(str(self.c.bin / "pg_ctl"), "-D", str(self.c.dir / "data"), "-l", str(self.c.dir / "server.log"),
                           "-w", "-t", "60", "-m", "fast", "restart")

    def source(self):
        return master_key_source(self.c)

    def reload(self, mode):
        """Switches the mode, reloads, and returns the outcome once the postmaster has published it."""
        self.set_mode(mode)
        return reload_master_key(self.c)


def encrypt_decrypt(conn, text="ok"):
    return conn.execute("SELECT vetassist_auth.decrypt_text(vetassist_auth.encrypt_text(%s, 'c'), 'c')",
                        (text,)).fetchone()[0]


@pytest.fixture(scope="module")
def kms():
    with CommandCluster("keycommand", "a", "vetassist_auth.master_key_command_timeout = '3s'") as k:
        yield k


def custody_rows(c):
    with c.connect("vetassist") as su:
        return su.execute("SELECT target_id, details FROM vetassist_auth.audit_log "
                          "WHERE event_type = 'master_key_loaded' ORDER BY id").fetchall()


def postmaster_pid(c):
    return (c.dir / "data" / "postmaster.pid").read_text().split()[0]


def test_the_postmaster_alone_runs_the_command_and_backends_use_its_key(kms):
    with kms.c.connect("vetassist", "app_user") as app:
        assert encrypt_decrypt(app) == "ok"
    for _ in range(3):
        with kms.c.connect("vetassist", "app_user") as app:
            app.execute("SELECT vetassist_auth.field_hash('x', 'email')")
    runs = kms.runs()
    assert runs and all(postmaster_pid(kms.c) in run.split(":") for run in runs), runs
    ok, detail = kms.source()
    assert ok and "vetassist_auth.master_key_command" in detail and "KMS key test/kms version 1" in detail
    log = kms.c.log()
    assert "vetassist_auth.master_key_command loaded the master key" in log
    assert KEY_A not in log


def test_each_load_is_on_record_once_per_database_with_its_kms_key(kms):
    with kms.c.connect("vetassist", "app_user") as app:
        encrypt_decrypt(app)
    rows = wait_for("the custody row of the load in force", lambda: custody_rows(kms.c))
    for _ in range(5):
        with kms.c.connect("vetassist", "app_user") as app:
            encrypt_decrypt(app)
    # Sessions of later loads would add rows; these add none (the recorder looks the load up).
    assert custody_rows(kms.c) == rows and len(rows) == 1
    load, details = rows[0]
    assert re.fullmatch(r"[0-9a-f]{16}", load)
    assert details["source"] == "command" and details["setting"] == "vetassist_auth.master_key_command"
    assert (details["kms_key_id"], details["kms_key_version"]) == ("test/kms", "1")
    assert re.fullmatch(r"[0-9a-f]{16}", details["key_check"]) and details["first_used_by"] == "app_user"
    assert KEY_A not in str(details)


def test_a_reload_reaches_a_running_session_at_its_next_transaction(kms):
    with kms.c.connect("vetassist", "app_user") as running:
        encrypt_decrypt(running)
        wait_for("the custody row of the load in force", lambda: custody_rows(kms.c))
        before = len(custody_rows(kms.c))
        kms.reload("a")  # the same key, loaded again: a new load
        encrypt_decrypt(running)
        # Only the running session used the new load: its row shows that it took it in.
        wait_for("the running session to record the new load", lambda: len(custody_rows(kms.c)) == before + 1)


def test_an_unreachable_kms_at_a_reload_keeps_the_loaded_key(kms):
    with kms.c.connect("vetassist", "app_user") as running:
        ct = running.execute("SELECT vetassist_auth.encrypt_text('kept', 'c')").fetchone()[0]
        ok, detail = kms.reload("unreachable")
        assert ok and "exited with status 75" in detail and "stays in force" in detail
        assert running.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "kept"
    with kms.c.connect("vetassist", "app_user") as new:
        assert encrypt_decrypt(new) == "ok"
    ok, detail = kms.reload("slow")
    assert ok and "did not finish within 3 s" in detail
    assert "no route to kms" not in kms.c.log()
    kms.reload("a")


def test_a_refusal_or_garbage_withdraws_the_key_until_a_reload_loads_one(kms):
    with kms.c.connect("vetassist", "app_user") as running:
        ct = running.execute("SELECT vetassist_auth.encrypt_text('back', 'c')").fetchone()[0]
        for mode, why in (("refused", "exited with status 77"), ("garbage", "printed no valid key")):
            ok, detail = kms.reload(mode)
            assert not ok and why in detail
            for conn in (running, ):
                err = expect_sqlstate("55000", conn, "SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,))
                assert "vetassist_auth.master_key_command" in err.diag.message_primary and why in err.diag.message_primary
                assert "pg_reload_conf" in err.diag.message_hint
            with kms.c.connect("vetassist", "app_user") as new:
                expect_sqlstate("55000", new, "SELECT vetassist_auth.encrypt_text('x', 'c')")
        kms.reload("a")
        assert running.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "back"
    log = kms.c.log()
    assert KEY_A not in log and "permission denied" not in log


def test_nothing_the_command_prints_reaches_the_log(kms):
    kms.reload("noisy")
    with kms.c.connect("vetassist", "app_user") as app:
        assert encrypt_decrypt(app) == "ok"
    assert KEY_A not in kms.c.log()
    kms.reload("a")


def test_the_command_is_shown_to_superusers_only(kms):
    with kms.c.connect("vetassist", "app_user") as app:
        expect_sqlstate("42501", app, "SHOW vetassist_auth.master_key_command")
        assert app.execute("SELECT count(*) FROM pg_settings WHERE setting LIKE '%unwrap%'").fetchone()[0] == 0
    with kms.c.connect("vetassist") as su:
        assert su.execute("SHOW vetassist_auth.master_key_command").fetchone()[0].endswith("/kms/unwrap")


def test_more_than_one_source_is_55000_naming_them(kms):
    kms.c.set_conf("vetassist_auth.master_key_file", str(kms.c.key_file))
    with kms.c.connect("vetassist", "app_user") as app:
        err = expect_sqlstate("55000", app, "SELECT vetassist_auth.encrypt_text('x', 'c')")
    assert "vetassist_auth.master_key_file and vetassist_auth.master_key_command" in err.diag.message_hint
    assert not kms.source()[0]
    kms.c.set_conf("vetassist_auth.master_key_file", "")
    with kms.c.connect("vetassist", "app_user") as app:
        assert encrypt_decrypt(app) == "ok"


def test_a_server_starts_while_the_command_fails_and_a_reload_brings_the_key():
    with CommandCluster("keycommand-down", "refused") as k:
        with k.c.connect("vetassist", "app_user") as app:
            err = expect_sqlstate("55000", app, "SELECT vetassist_auth.encrypt_text('x', 'c')")
            assert "exited with status 77" in err.diag.message_primary
            # Nothing else breaks: sessions, the catalog, functions that need no key.
            assert app.execute("SELECT vetassist_auth.node_role()").fetchone()[0] == "primary"
            ok, _ = k.reload("a")
            assert ok and encrypt_decrypt(app) == "ok"


def test_previous_key_from_a_command_for_rewrap_keys():
    with CommandCluster("keycommand-change", "a") as k:
        with k.c.connect("vetassist", "app_user") as app:
            ct = app.execute("SELECT vetassist_auth.encrypt_text('survives', 'c')").fetchone()[0]
        # The change: the new key from the command, the old one from a second command.
        k.write("previous", "#!/bin/sh\necho " + KEY_A + "\necho kms_key_version=1\n")
        k.c.as_postgres("chmod", "700", str(k.kms / "previous"))
        k.c.append_conf(f"vetassist_auth.previous_master_key_command = '{k.kms}/previous'")
        ok, detail = k.reload("b")
        assert ok and "previous: vetassist_auth.previous_master_key_command" in detail
        with k.c.connect("vetassist", "app_user") as app:
            assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "survives"
        # vetassist_admin needs no file privilege: the old key comes from the postmaster.
        with k.c.connect("vetassist", "admin_user") as admin:
            assert admin.execute("SELECT vetassist_auth.rewrap_keys()").fetchone()[0] >= 1
        with k.c.connect("vetassist") as su:
            details = su.execute("SELECT details FROM vetassist_auth.audit_log WHERE event_type = 'keys_rewrapped'").fetchone()[0]
        assert details["from"] == "vetassist_auth.previous_master_key_command"
        assert details["to"] == "vetassist_auth.master_key_command" and details["from_key_check"] != details["to_key_check"]
        k.c.append_conf("vetassist_auth.previous_master_key_command = ''")
        ok, detail = k.reload("b")
        assert ok and "previous" not in detail
        with k.c.connect("vetassist", "app_user") as app:
            assert app.execute("SELECT vetassist_auth.decrypt_text(%s, 'c')", (ct,)).fetchone()[0] == "survives"
        # Both previous sources at once: refused, naming them.
        k.c.append_conf(f"vetassist_auth.previous_master_key_command = '{k.kms}/previous'")
        k.c.set_conf("vetassist_auth.previous_master_key_file", str(k.c.key_file))
        with k.c.connect("vetassist", "app_user") as app:
            err = expect_sqlstate("55000", app, "SELECT vetassist_auth.encrypt_text('x', 'c')")
        assert "vetassist_auth.previous_master_key_file and vetassist_auth.previous_master_key_command" in err.diag.message_hint
        assert KEY_A not in k.c.log() and KEY_B not in k.c.log()
        # The commands' texts may hold a KMS credential: a reload logs no value of them.
        assert "vetassist_auth.previous_master_key_command\" changed to" in k.c.log()
        assert str(k.kms / "previous") not in k.c.log()
