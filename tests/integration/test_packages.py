"""The package as an operator installs it (README, "Install in your own cluster"): the .deb of
scripts/package.sh, installed with apt-get into a clean Debian root that has PostgreSQL from
Debian's own packages (Debian 12 with 15, Debian 13 with 17: scripts/ensure-debian-root.sh), a
cluster made with Debian's tools and the README's postgresql.conf lines, CREATE EXTENSION and
the psql walkthrough; then the package of the last release installed first and this one over
it, a restart, ALTER EXTENSION UPDATE, and everything written before intact.

The packages are debug ones, made from the build `make test` has just installed for the
PostgreSQL under test (no rebuild); `make package` makes the release ones. Each test works in an
overlay on the cached root, with /proc and /dev/shm mounted in it, all thrown away afterwards.
And META.json, PGXN's metadata: valid for the pgxn_meta validator, and naming this version."""
import json
import os
import re
import shutil
import subprocess
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from vetassist_testing import PG_CONFIG, PG_MAJOR, ROOT, free_port, wait_for
from test_release import released, version

# The clean Debian root each PostgreSQL major is tested in (make test runs this file once per
# major: 15 and 17 have a root; 16 and 18, from PyPI wheels here, have no Debian package).
SUITES = {15: "bookworm", 17: "trixie"}
ARCH = subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True, check=True).stdout.strip()
PACKAGE = f"postgresql-{PG_MAJOR}-vetassist-auth"
CURRENT = version()
# The release a package upgrade starts from: the newest shipped before this version.
LAST_RELEASE = [v for v, _script, _digest in released() if v != CURRENT][-1]
PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

in_a_debian_root = pytest.mark.skipif(
    PG_MAJOR not in SUITES,
    reason=f"the packages are tested on PostgreSQL 15 (Debian 12) and 17 (Debian 13); {PG_MAJOR} has no Debian root here")
as_root = pytest.mark.skipif(os.geteuid() != 0, reason="a Debian root needs root (mount, chroot)")


def readme_conf():
    """The postgresql.conf lines of the README's install section, as written there."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("\n## Install in your own cluster\n", 1)[1].split("\n## ", 1)[0]
    return re.search(r"```ini\n(.*?)```", section, re.S).group(1).strip().splitlines()


class DebianRoot:
    """An overlay on the cached clean root of `suite`, with /proc and /dev/shm mounted: commands
    run in it through chroot, as root or as its postgres user. close() stops whatever still
    runs in it, unmounts and throws the overlay away, so the cache never changes."""

    PREFIX = "vetassist-root-"

    def __init__(self, suite):
        self.sweep_stale()
        out = subprocess.run([ROOT / "scripts/ensure-debian-root.sh", suite], capture_output=True, text=True)
        assert out.returncode == 0, f"ensure-debian-root.sh {suite} failed:\n{out.stderr[-3000:]}"
        self.base = Path(out.stdout.strip().splitlines()[-1])
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.PREFIX}{suite}-"))
        self.path = self.dir / "root"
        self.mounts = []
        (self.dir / "owner").write_text(str(os.getpid()))
        passwd = {line.split(":")[0]: line.split(":") for line in (self.base / "etc/passwd").read_text().splitlines()}
        self.postgres = (int(passwd["postgres"][2]), int(passwd["postgres"][3]))
        try:
            for d in ("upper", "work", "root"):
                (self.dir / d).mkdir()
            self._mount("-t", "overlay", "-o", f"lowerdir={self.base},upperdir={self.dir}/upper,workdir={self.dir}/work",
                        "overlay", self.path)
            self._mount("-t", "proc", "proc", self.path / "proc")
            # POSIX shared memory (dynamic_shared_memory_type = posix) for the server.
            self._mount("-t", "tmpfs", "-o", "mode=1777", "tmpfs", self.path / "dev/shm")
        except BaseException:
            self.close()
            raise

    def _mount(self, *args):
        subprocess.run(["mount", *map(str, args)], check=True, capture_output=True)
        self.mounts.append(Path(args[-1]))

    def run(self, *cmd, user=None, check=True, timeout=300):
        """Runs `cmd` in the root (as its postgres user when user='postgres'), with a clean
        environment; fails showing its output unless `check` is false."""
        chroot = ["chroot"]
        home = "/root"
        if user == "postgres":
            uid, gid = self.postgres
            chroot += [f"--userspec={uid}:{gid}", f"--groups={gid}"]
            home = "/var/lib/postgresql"
        env = ["/usr/bin/env", "-i", f"PATH={PATH}", "LANG=C.UTF-8", f"HOME={home}", "DEBIAN_FRONTEND=noninteractive"]
        result = subprocess.run([*chroot, str(self.path), *env, *map(str, cmd)], capture_output=True, text=True,
                                timeout=timeout)
        if check:
            assert result.returncode == 0, (f"{' '.join(map(str, cmd))} exited {result.returncode} in the root:\n"
                                            f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
        return result

    def copy_in(self, path):
        """`path` copied into the root's /tmp; its path inside the root."""
        shutil.copy(path, self.path / "tmp" / path.name)
        return Path("/tmp") / path.name

    def processes(self):
        """The pids of the processes running in this root."""
        pids = []
        for proc in Path("/proc").iterdir():
            if proc.name.isdigit():
                try:
                    if os.readlink(proc / "root") == str(self.path):
                        pids.append(int(proc.name))
                except OSError:
                    pass  # gone meanwhile
        return pids

    @classmethod
    def sweep_stale(cls):
        """Throws away the overlays of test runs that died before their close() (a killed
        pytest): those whose owner process is gone. Other runs' live overlays are left alone."""
        for d in Path(tempfile.gettempdir()).glob(cls.PREFIX + "*"):
            try:
                os.kill(int((d / "owner").read_text()), 0)
                continue  # its run is alive
            except ProcessLookupError:
                pass  # its run died
            except (OSError, ValueError):
                if time.time() - d.stat().st_mtime < 600:
                    continue  # being set up by another run
            stale = cls.__new__(cls)
            stale.dir, stale.path = d, d / "root"
            mounts = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()]
            stale.mounts = [Path(m) for m in mounts if m.startswith(str(d) + "/")]
            stale.mounts.sort(key=lambda m: len(str(m)))
            stale.close()

    def close(self):
        for pid in self.processes():
            try:
                os.kill(pid, 9)
            except ProcessLookupError:
                pass
        wait_for("the processes of the Debian root to end", lambda: not self.processes(), timeout=30)
        for mount in reversed(self.mounts):
            if subprocess.run(["umount", str(mount)], capture_output=True).returncode != 0:
                subprocess.run(["umount", "-l", str(mount)], check=True)
        self.mounts = []
        # Only once nothing is mounted under it (never delete through a mount).
        mounted = [line.split()[1] for line in Path("/proc/self/mounts").read_text().splitlines()
                   if line.split()[1].startswith(str(self.dir) + "/")]
        assert mounted == [], f"still mounted: {mounted}"
        shutil.rmtree(self.dir)


@contextmanager
def debian_root():
    root = DebianRoot(SUITES[PG_MAJOR])
    try:
        yield root
    finally:
        root.close()


class Server:
    """A cluster in the root as an operator makes one: pg_createcluster, the README's
    postgresql.conf lines, a master key file only postgres reads, pg_ctlcluster."""

    def __init__(self, root):
        self.root = root
        # Only the name of the Unix socket in the root's /var/run/postgresql: the cluster listens
        # on no TCP address, so it can clash with nothing on this host.
        self.port = free_port()
        root.run("pg_createcluster", PG_MAJOR, "main", "-p", self.port)
        conf = readme_conf()
        key_file = next(re.search(r"'(.*)'", line).group(1) for line in conf
                        if line.startswith("vetassist_auth.master_key_file"))
        root.run("install", "-d", "-o", "postgres", "-g", "postgres", "-m", "700", Path(key_file).parent)
        root.run("sh", "-c", f"umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \\n' > {key_file}", user="postgres")
        mode = os.stat(root.path / key_file.lstrip("/"))
        assert (oct(mode.st_mode & 0o777), mode.st_uid) == ("0o600", root.postgres[0])
        with open(root.path / f"etc/postgresql/{PG_MAJOR}/main/postgresql.conf", "a") as f:
            f.write("\n".join([*conf, "listen_addresses = ''", ""]))
        self.ctl("start")

    def ctl(self, action):
        self.root.run("pg_ctlcluster", PG_MAJOR, "main", action)

    def sql(self, *statements, db="app", role=None):
        """Runs the statements in one psql session (as `role`, through SET ROLE, when given);
        their rows, one line each, fields separated by |."""
        cmd = ["psql", "-X", "-q", "-At", "-v", "ON_ERROR_STOP=1", "-p", self.port, "-d", db]
        for statement in ([f"SET ROLE {role}"] if role else []) + list(statements):
            cmd += ["-c", statement]
        return self.root.run(*cmd, user="postgres").stdout.splitlines()

    def value(self, statement, **kw):
        rows = self.sql(statement, **kw)
        assert len(rows) == 1, rows
        return rows[0]


def apt_install(root, deb):
    """apt-get install ./the.deb in the root, as an operator installs a downloaded package."""
    return root.run("apt-get", "install", "-y", root.copy_in(deb))


def installed_version(root):
    return root.run("dpkg-query", "-W", "-f", "${Status} ${Version}", PACKAGE).stdout


def extension_version(server):
    return server.value("SELECT extversion FROM pg_extension WHERE extname = 'vetassist_auth'")


@pytest.fixture(scope="module")
def packages(tmp_path_factory):
    """Debug packages of this version and of the last release, from the build `make test`
    installed for the PostgreSQL under test."""
    out = tmp_path_factory.mktemp("packages")
    made = subprocess.run([ROOT / "scripts/package.sh", "--debug", "--pg-config", PG_CONFIG,
                           "--versions", f"{CURRENT},{LAST_RELEASE}", "--out-dir", out, str(PG_MAJOR)],
                          capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-5000:]
    debs = {v: out / f"{PACKAGE}_{v}_{ARCH}.deb" for v in (CURRENT, LAST_RELEASE)}
    assert sorted(made.stdout.split()) == sorted(map(str, debs.values()))
    return debs


def deb_field(deb, field):
    return subprocess.run(["dpkg-deb", "-f", deb, field], capture_output=True, text=True, check=True).stdout.strip()


def deb_files(deb):
    """{path: mode string} of the files (not directories) in the package."""
    listing = subprocess.run(["dpkg-deb", "-c", deb], capture_output=True, text=True, check=True).stdout
    files = {}
    for line in listing.splitlines():
        mode, _owner, _size, _date, _time, path = line.split(None, 5)
        if not mode.startswith("d"):
            files[path.removeprefix(".")] = mode
    return files


def expected_files(scripts, with_generated):
    ext = f"/usr/share/postgresql/{PG_MAJOR}/extension"
    lib = f"/usr/lib/postgresql/{PG_MAJOR}/lib"
    files = {f"{lib}/vetassist_auth.so": "-rw-r--r--",
             f"{ext}/vetassist_auth.control": "-rw-r--r--",
             f"{lib}/vetassist_auth/kms/aws-kms": "-rwxr-xr-x",
             f"{lib}/vetassist_auth/kms/openbao-transit": "-rwxr-xr-x",
             f"/usr/share/doc/{PACKAGE}/copyright": "-rw-r--r--",
             f"/usr/share/doc/{PACKAGE}/changelog.gz": "-rw-r--r--"}
    files.update({f"{ext}/{s}": "-rw-r--r--" for s in scripts})
    if with_generated:
        files[f"{ext}/vetassist_auth--{CURRENT}.sql"] = "-rw-r--r--"
    return files


@in_a_debian_root
def test_the_packages_hold_the_library_every_script_and_the_kms_providers(packages):
    sql_scripts = sorted(p.name for p in (ROOT / "sql").glob("vetassist_auth--*.sql"))
    assert f"vetassist_auth--{released()[0][0]}.sql" in sql_scripts  # the base, which pgrx does not copy
    assert deb_files(packages[CURRENT]) == expected_files(sql_scripts, with_generated=True)
    chain = [script for v, script, _digest in released()]
    chain = chain[:[v for v, _s, _d in released()].index(LAST_RELEASE) + 1]
    assert deb_files(packages[LAST_RELEASE]) == expected_files(chain, with_generated=False)
    for v, deb in packages.items():
        assert (deb_field(deb, "Package"), deb_field(deb, "Version"), deb_field(deb, "Architecture")) == (PACKAGE, v, ARCH)
        assert deb_field(deb, "Section") == "database" and deb_field(deb, "Priority") == "optional"
        depends = [d.strip() for d in deb_field(deb, "Depends").split(",")]
        assert depends[0] == f"postgresql-{PG_MAJOR}" and any(d.startswith("libc6 (>= ") for d in depends), depends
        assert deb_field(deb, "Maintainer") == json.loads((ROOT / "META.json").read_text())["maintainer"]


@as_root
@in_a_debian_root
def test_an_operator_installs_the_package_and_runs_the_walkthrough(packages):
    with debian_root() as root:
        assert root.run("dpkg-query", "-W", PACKAGE, check=False).returncode != 0  # a clean root
        out = apt_install(root, packages[CURRENT])
        assert installed_version(root) == f"install ok installed {CURRENT}", out.stdout
        owned = set(root.run("dpkg", "-L", PACKAGE).stdout.split())
        assert set(deb_files(packages[CURRENT])) <= owned
        copyright_file = (root.path / f"usr/share/doc/{PACKAGE}/copyright").read_text()
        assert copyright_file.startswith("Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/\n")
        assert "\nFiles: *\n" in copyright_file and "\nLicense: Apache-2.0\n" in copyright_file
        for script in ("aws-kms", "openbao-transit"):
            assert os.access(root.path / f"usr/lib/postgresql/{PG_MAJOR}/lib/vetassist_auth/kms/{script}", os.X_OK)

        server = Server(root)
        assert server.value("SHOW shared_preload_libraries", db="postgres") == "vetassist_auth"
        server.sql("CREATE DATABASE app", db="postgres")
        server.sql("CREATE EXTENSION vetassist_auth")
        assert extension_version(server) == CURRENT
        assert server.sql("SELECT check_name, detail FROM vetassist_auth.verify_installation() WHERE NOT ok") == []

        # The walkthrough, as tests/run.sh runs it: every step, and the application refused a table.
        walkthrough = root.copy_in(ROOT / "examples/walkthrough.sql")
        ran = root.run("psql", "-X", "-v", "ON_ERROR_STOP=1", "-p", server.port, "-d", "app", "-f", walkthrough,
                       user="postgres")
        steps = len(re.findall(r"^\\echo '==", (ROOT / "examples/walkthrough.sql").read_text(), re.M))
        assert steps > 5 and len(re.findall(r"^==", ran.stdout, re.M)) == steps, ran.stdout
        assert "permission denied for table va_tokens" in ran.stderr
        server.ctl("stop")


@as_root
@in_a_debian_root
def test_the_package_upgrades_the_last_release_in_place(packages):
    with debian_root() as root:
        apt_install(root, packages[LAST_RELEASE])
        assert installed_version(root) == f"install ok installed {LAST_RELEASE}"
        server = Server(root)
        server.sql("CREATE DATABASE app", db="postgres")
        server.sql("CREATE EXTENSION vetassist_auth")
        assert extension_version(server) == LAST_RELEASE

        # Written through the last release's API: a veteran, VA tokens (encrypted), an audit row.
        uid = server.value("SELECT vetassist_auth.upsert_va_user('1012667145V762142', 'veteran', "
                           "'maria.hernandez@example.org', 'Maria', 'Hernandez')", role="vetassist_app")
        server.sql(f"SELECT vetassist_auth.store_va_tokens('{uid}', 'va-access-before-upgrade', "
                   "'va-refresh-before-upgrade', now() + interval '1 hour', 'openid')", role="vetassist_app")
        server.sql("BEGIN", f"SELECT vetassist_auth.set_actor('{uid}')",
                   "SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', '{\"page\": \"labs\"}')",
                   "COMMIT", role="vetassist_app")
        assert int(server.value("SELECT vetassist_auth.seal_audit_log(100000)", role="vetassist_admin")) > 0

        # This version's package over it, as a package upgrade, and a restart onto its library.
        out = apt_install(root, packages[CURRENT])
        assert f"over ({LAST_RELEASE})" in out.stdout, out.stdout
        assert installed_version(root) == f"install ok installed {CURRENT}"
        server.ctl("restart")
        # The new library serves the old SQL until the update.
        assert extension_version(server) == LAST_RELEASE
        assert server.value(f"SELECT vetassist_auth.va_access_token('{uid}')", role="vetassist_app") \
            == "va-access-before-upgrade"

        server.sql("ALTER EXTENSION vetassist_auth UPDATE")
        assert extension_version(server) == CURRENT
        assert server.sql("SELECT check_name, detail FROM vetassist_auth.verify_installation() WHERE NOT ok") == []
        assert server.value(f"SELECT vetassist_auth.va_access_token('{uid}')", role="vetassist_app") \
            == "va-access-before-upgrade"
        assert server.value(f"SELECT vetassist_auth.va_refresh_token('{uid}')", role="vetassist_app") \
            == "va-refresh-before-upgrade"
        assert server.value(f"SELECT concat_ws(' ', va_icn, email, first_name, last_name) "
                            f"FROM vetassist_auth.user_profile('{uid}')", role="vetassist_app") \
            == "1012667145V762142 maria.hernandez@example.org Maria Hernandez"
        server.sql("BEGIN", f"SELECT vetassist_auth.set_actor('{uid}')",
                   "SELECT vetassist_auth.audit_event('phi', 'record_viewed', 'success', '{\"page\": \"meds\"}')",
                   "COMMIT", role="vetassist_app")
        assert int(server.value("SELECT vetassist_auth.seal_audit_log(100000)", role="vetassist_admin")) > 0
        # The chain sealed before the upgrade continues after it and verifies end to end.
        ok, checked, bad, problem = server.value("SELECT * FROM vetassist_auth.verify_audit_chain()",
                                                 role="vetassist_auditor").split("|")
        assert (ok, bad, problem) == ("t", "", "")
        assert checked == server.value("SELECT count(*) FROM vetassist_auth.audit_log", role="vetassist_auditor")
        assert server.value("SELECT count(*) FROM vetassist_auth.audit_log WHERE event_type = 'record_viewed'",
                            role="vetassist_auditor") == "2"
        server.ctl("stop")


@pytest.mark.no_pg
def test_meta_json_is_valid_pgxn_metadata(tmp_path):
    built = subprocess.run([ROOT / "tools/ensure-pgxn-meta.sh"], capture_output=True, text=True)
    assert built.returncode == 0, built.stderr[-3000:]
    validator = built.stdout.strip().splitlines()[-1]
    checked = subprocess.run([validator, ROOT / "META.json"], capture_output=True, text=True)
    assert checked.returncode == 0 and "is OK" in checked.stdout, checked.stdout + checked.stderr
    # The validator refuses what PGXN would: META.json without its license.
    meta = json.loads((ROOT / "META.json").read_text())
    del meta["license"]
    (tmp_path / "META.json").write_text(json.dumps(meta))
    refused = subprocess.run([validator, tmp_path / "META.json"], capture_output=True, text=True)
    assert refused.returncode != 0 and "license" in refused.stdout + refused.stderr


@pytest.mark.no_pg
def test_meta_json_describes_this_version():
    meta = json.loads((ROOT / "META.json").read_text())
    assert meta["meta-spec"]["version"] == "1.0.0"
    assert meta["version"] == meta["provides"]["vetassist_auth"]["version"] == CURRENT
    # The control file's default_version is Cargo.toml's (pgrx writes it in).
    control = (ROOT / "vetassist_auth.control").read_text()
    assert re.search(r"^default_version = '(.*)'$", control, re.M).group(1) in ("@CARGO_VERSION@", CURRENT)
    assert re.search(r'^license = "Apache-2.0"$', (ROOT / "Cargo.toml").read_text(), re.M)
    assert meta["license"] == "apache_2_0"
    for key in ("file", "docfile"):
        assert (ROOT / meta["provides"]["vetassist_auth"][key]).is_file()
    # The oldest PostgreSQL the Makefile supports.
    supported = re.search(r"^ALL_PG\s*:=\s*(.*)$", (ROOT / "Makefile").read_text(), re.M).group(1).split()
    assert meta["prereqs"]["runtime"]["requires"]["PostgreSQL"] == f"{min(map(int, supported))}.0.0"
