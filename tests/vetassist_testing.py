"""What every test of vetassist_auth shares (the integration and Citus suites, the Python client's
tests, the bench and the demo): throw-away clusters started through scripts/cluster.sh, a
veteran and an enrolled authenticator, one way to expect a SQLSTATE, and waits on events
(wait_for, reload_and_wait) instead of sleeps. tests/conftest.py makes the fixtures of it."""
import base64
import hashlib
import hmac
import os
import socket
import struct
import subprocess
import urllib.parse
from contextlib import contextmanager
import time
from pathlib import Path

import psycopg
import pytest

ROOT = Path(__file__).resolve().parents[1]
# The PostgreSQL under test: the Makefile exports PG_CONFIG (Debian's 15 when run by hand).
PG_CONFIG = os.environ.get("PG_CONFIG", "/usr/lib/postgresql/15/bin/pg_config")


def pg_config(option):
    return subprocess.run([PG_CONFIG, option], capture_output=True, text=True, check=True).stdout.strip()


BIN = Path(pg_config("--bindir"))
PG_MAJOR = int(pg_config("--version").split()[1].split(".")[0])
# Where `cargo pgrx install` puts the control file and the install and upgrade scripts.
EXTENSION_DIR = Path(pg_config("--sharedir")) / "extension"


def has_module(name):
    """Whether this PostgreSQL ships a contrib module (the 16 wheel has none)."""
    return (Path(pg_config("--pkglibdir")) / f"{name}.so").exists()


def needs_modules(*names):
    """Skips a test on a PostgreSQL without these contrib modules (the 16 wheel ships none)."""
    missing = [n for n in names if not has_module(n)]
    return pytest.mark.skipif(bool(missing), reason=f"this PostgreSQL has no {', '.join(missing)}")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Cluster:
    """A cluster of the PostgreSQL under test, under target/clusters/NAME, run as the postgres OS user."""

    def __init__(self, name, *conf_lines, pg_config=None):
        """`pg_config`: another PostgreSQL than the one under test (its bin directory is `self.bin`)."""
        self.name = name
        self.port = free_port()
        self.env = {**os.environ, "PG_CONFIG": pg_config or PG_CONFIG}
        self.bin = Path(subprocess.run([self.env["PG_CONFIG"], "--bindir"], capture_output=True, text=True,
                                       check=True).stdout.strip())
        out = subprocess.run(
            [ROOT / "scripts/cluster.sh", "start", name, str(self.port), *conf_lines],
            check=True, capture_output=True, text=True, env=self.env)
        self.dir = Path(out.stdout.strip().splitlines()[-1])
        self.key_file = self.dir / "master.key"

    def conninfo(self, dbname="postgres", user="postgres"):
        return f"host={self.dir} port={self.port} dbname={dbname} user={user}"

    def connect(self, dbname="postgres", user="postgres", autocommit=True):
        return psycopg.connect(self.conninfo(dbname, user), autocommit=autocommit)

    def psql(self, sql, dbname="postgres"):
        subprocess.run([str(self.bin / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", self.conninfo(dbname), "-c", sql],
                       check=True, capture_output=True)

    def log(self):
        return (self.dir / "server.log").read_text(errors="replace")

    def as_postgres(self, *cmd):
        prefix = ["sudo", "-u", "postgres"] if os.geteuid() == 0 else []
        return subprocess.run(prefix + list(cmd), check=True, capture_output=True, text=True)

    def append_conf(self, *lines):
        """Appends `lines` to postgresql.conf, as the postgres OS user; no reload."""
        prefix = ["sudo", "-u", "postgres"] if os.geteuid() == 0 else []
        subprocess.run(prefix + ["tee", "-a", str(self.dir / "data" / "postgresql.conf")],
                       input="".join(line + "\n" for line in lines), text=True, check=True, capture_output=True)

    def set_conf(self, name, value):
        """Appends `name = 'value'` to postgresql.conf, reloads, and waits until new sessions see it."""
        self.append_conf(f"{name} = '{value}'")
        reload_and_wait(self.connect, name, value)

    def stop(self):
        subprocess.run([ROOT / "scripts/cluster.sh", "stop", self.name], check=False, env=self.env)


def authenticator_code(uri, step_offset=0):
    """What the veteran's authenticator app shows: RFC 6238 from the otpauth:// URI."""
    query = urllib.parse.parse_qs(urllib.parse.urlparse(uri).query)
    secret = base64.b32decode(query["secret"][0] + "=" * (-len(query["secret"][0]) % 8))
    counter = int(time.time()) // 30 + step_offset
    digest = hmac.new(secret, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    return f"{(struct.unpack('>I', digest[offset:offset + 4])[0] & 0x7FFFFFFF) % 1_000_000:06d}"


def wrong_code(uri, code="000000"):
    """`code`, unless by chance it is the code of a step within 3 (90 s) of now: then another one
    (the extension accepts one step either side), so a wrong code is never right by chance."""
    near = {authenticator_code(uri, offset) for offset in range(-3, 4)}
    return next(c for c in (code, *(d * 6 for d in "0123456789")) if c not in near)


def wait_for(what, check, timeout=60.0):
    """Polls `check` until it returns something true, and returns that; fails naming `what`
    after `timeout` seconds (with what the check last said)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        found = check()
        if found:
            return found
        time.sleep(0.02)
    raise AssertionError(f"timed out waiting for {what}: {check()!r}")


def sweeper_passes_since(cluster, since):
    """A check for wait_for: true once pg_stat_activity has shown two distinct starts, after
    `since`, of the sweeper's readiness check (the first statement of its pass): one whole pass
    ran in between."""
    seen = set()

    def check():
        with cluster.connect() as su:
            row = su.execute("SELECT query_start FROM pg_stat_activity WHERE backend_type = 'vetassist_auth sweeper' "
                             "AND query = 'vetassist_auth sweeper: readiness check' AND query_start > %s",
                             (since,)).fetchone()
        if row:
            seen.add(row[0])
        return len(seen) >= 2
    return check


def seal_all(conn, batch=1000):
    """Seals every audit row of finished transactions, a batch per call."""
    while conn.execute("SELECT vetassist_auth.seal_audit_log(%s)", (batch,)).fetchone()[0] > 0:
        pass


def install(cluster, dbname="vetassist", version=None):
    """Creates a database with the extension (this build's version unless `version` names a
    released one) and one login role per extension role."""
    cluster.psql(f"CREATE DATABASE {dbname}")
    cluster.psql("CREATE EXTENSION vetassist_auth" + (f" VERSION '{version}'" if version else ""), dbname)
    cluster.psql("""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'app_user') THEN
            CREATE ROLE app_user LOGIN IN ROLE vetassist_app;
            CREATE ROLE admin_user LOGIN IN ROLE vetassist_admin;
            CREATE ROLE auditor_user LOGIN IN ROLE vetassist_auditor;
            CREATE ROLE outsider LOGIN;
          END IF;
        END $$""", dbname)


def citus_cluster(*args, check=True):
    """scripts/citus-cluster.sh ARGS (start NAME WORKERS DB, add-worker NAME INDEX DB, stop NAME) for
    the PostgreSQL under test: the nodes it started, as (role, port, socket directory)."""
    out = subprocess.run([ROOT / "scripts/citus-cluster.sh", *map(str, args)], check=check, capture_output=True,
                         text=True, env={**os.environ, "PG_CONFIG": PG_CONFIG}).stdout
    return [tuple(line.split()) for line in out.splitlines() if line.strip()]


@contextmanager
def installed_cluster(name, *conf_lines, preload="vetassist_auth"):
    """A fresh cluster with `preload` in shared_preload_libraries and the extension installed
    (see install); stopped on exit."""
    c = Cluster(name, f"shared_preload_libraries = '{preload}'", *conf_lines)
    try:
        install(c)
        yield c
    finally:
        c.stop()


def reload_and_wait(connect, name, value, timeout=10.0):
    """pg_reload_conf(), then waits until a new session (from `connect()`) sees `name` = `value`:
    the postmaster reloads asynchronously, and a session started before it runs on the old value."""
    with connect() as conn:
        conn.execute("SELECT pg_reload_conf()")

    def seen():
        with connect() as conn:
            return conn.execute("SELECT current_setting(%s, true)", (name,)).fetchone()[0] == value
    wait_for(f"{name} = {value!r} after a reload", seen, timeout)


def master_key_source(cluster):
    """verify_installation's row on where the master key comes from: (ok, detail). It names the
    time of each load and of each failed run of a master key command, so it changes with every run."""
    with cluster.connect("vetassist") as su:
        return su.execute("SELECT ok, detail FROM vetassist_auth.verify_installation() "
                          "WHERE check_name = 'keys: master key source'").fetchone()


def master_key_source_changed(cluster, before, what="the master key command's next run"):
    """Waits until master_key_source differs from `before` (the postmaster has run the command
    and published its outcome) and returns it."""
    return wait_for(what, lambda: (lambda now: now if now != before else None)(master_key_source(cluster)))


def reload_master_key(cluster, *lines):
    """Appends `lines` to postgresql.conf, reloads, and returns master_key_source once the
    postmaster has run the master key command again."""
    before = master_key_source(cluster)
    cluster.append_conf(*lines)
    with cluster.connect() as su:
        su.execute("SELECT pg_reload_conf()")
    return master_key_source_changed(cluster, before)


def expect_sqlstate(sqlstate, conn, sql, params=None):
    """Runs `sql` and asserts that it fails with `sqlstate`; returns the error (its diag has the
    message, detail and hint)."""
    with pytest.raises(psycopg.Error) as raised:
        conn.execute(sql, params)
    assert raised.value.sqlstate == sqlstate, f"{raised.value.sqlstate}: {raised.value}"
    return raised.value


def veteran(app, icn, email=None, first="Maria", last="Hernandez", tokens=("VA-ACCESS", "VA-REFRESH")):
    """A veteran signed in through VA.gov as the application: the account and (unless `tokens`
    is None) VA tokens valid for an hour. Returns the user id."""
    uid = app.execute("SELECT vetassist_auth.upsert_va_user(%s, 'veteran', %s, %s, %s)",
                      (icn, email, first, last)).fetchone()[0]
    if tokens:
        app.execute("SELECT vetassist_auth.store_va_tokens(%s, %s, %s, now() + interval '1 hour')", (uid, *tokens))
    return uid


def enrolled_mfa(app, uid):
    """TOTP enrolled and confirmed for `uid`; returns the otpauth:// URI the authenticator holds."""
    uri = app.execute("SELECT vetassist_auth.mfa_enroll_totp(%s)", (uid,)).fetchone()[0]
    assert app.execute("SELECT vetassist_auth.mfa_confirm_totp(%s, %s)", (uid, authenticator_code(uri))).fetchone()[0]
    return uri
