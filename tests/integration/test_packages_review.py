"""Adversarial review of the Debian package (scripts/package.sh, README "Install in your own
cluster"), without a Debian root: what dpkg would put on a machine. All attacks here held; the
tests keep them: ownership and modes, files of two majors never collide, nothing is left behind by
`apt-get remove` (no conffiles, no maintainer scripts), every released version can reach this one
through the shipped upgrade scripts, and md5sums covers every file."""
import hashlib
import io
import re
import subprocess
import tarfile

import pytest

from vetassist_testing import PG_CONFIG, PG_MAJOR, ROOT

PACKAGE = f"postgresql-{PG_MAJOR}-vetassist-auth"
CURRENT = re.search(r'^version = "(.*)"$', (ROOT / "Cargo.toml").read_text(), re.M).group(1)


@pytest.fixture(scope="module")
def deb(tmp_path_factory):
    """This version's package for the PostgreSQL under test, from the build already made (the
    release build if there is one, else the debug build `cargo pgrx install` made)."""
    out = tmp_path_factory.mktemp("packages")
    release = (ROOT / "target/release/libvetassist_auth.so").exists()
    made = subprocess.run([ROOT / "scripts/package.sh", *([] if release else ["--debug"]), "--pg-config", PG_CONFIG,
                           "--out-dir", out, str(PG_MAJOR)], capture_output=True, text=True)
    assert made.returncode == 0, made.stderr[-4000:]
    return made.stdout.split()[-1]


def members(deb, archive):
    """The tar members of the package's data or control archive."""
    raw = subprocess.run(["dpkg-deb", "--fsys-tarfile" if archive == "data" else "--ctrl-tarfile", deb],
                         capture_output=True, check=True).stdout
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        return [(m, tar.extractfile(m).read() if m.isfile() else None) for m in tar.getmembers()]


def test_held_every_file_is_root_owned_without_special_bits_or_world_write(deb):
    for m, _data in members(deb, "data"):
        path = m.name.removeprefix(".")
        assert (m.uname, m.gname, m.uid, m.gid) == ("root", "root", 0, 0), path
        assert m.mode & 0o7000 == 0, f"{path}: setuid/setgid/sticky {oct(m.mode)}"
        assert m.mode & 0o002 == 0, f"{path}: world-writable {oct(m.mode)}"
        assert not m.issym() and not m.islnk(), path
        if m.isdir():
            assert m.mode & 0o777 == 0o755, path
        elif "/kms/" in path:
            assert m.mode & 0o777 == 0o755, path
        else:
            assert m.mode & 0o777 == 0o644, path


def test_held_two_majors_packages_share_no_file(deb):
    """Every file lives under a path naming the major, so postgresql-15-... and postgresql-17-...
    install side by side (no Conflicts/Replaces needed, and none is declared)."""
    for m, _data in members(deb, "data"):
        if m.isfile():
            path = m.name.removeprefix(".")
            assert f"/postgresql/{PG_MAJOR}/" in path or f"/{PACKAGE}/" in path, path
    fields = subprocess.run(["dpkg-deb", "-f", deb], capture_output=True, text=True, check=True).stdout
    assert not re.search(r"^(Conflicts|Replaces|Breaks|Provides|Pre-Depends):", fields, re.M), fields


def test_held_remove_leaves_nothing_behind(deb):
    """No conffiles and no maintainer scripts: `apt-get remove` deletes every file the package
    installed, and there is nothing for purge to do. (The operator's shared_preload_libraries entry
    stays, as for any extension package: the server then refuses to start until it is removed.)"""
    control = {m.name.removeprefix("./") for m, _data in members(deb, "control") if m.isfile()}
    assert control == {"control", "md5sums"}, control


def test_held_md5sums_covers_every_file(deb):
    data = {m.name.removeprefix("./"): body for m, body in members(deb, "data") if m.isfile()}
    sums = dict(line.split("  ", 1)[::-1] for body in
                [b for m, b in members(deb, "control") if m.name.removeprefix("./") == "md5sums"]
                for line in body.decode().splitlines())
    assert set(sums) == set(data)
    for path, body in data.items():
        assert hashlib.md5(body).hexdigest() == sums[path], path


def test_held_every_release_upgrades_to_this_version_with_the_shipped_scripts(deb):
    """From every version in sql/RELEASED (and the base install) the shipped upgrade scripts reach
    this version, and the control file's default_version is this version."""
    files = {m.name.rsplit("/", 1)[-1]: body for m, body in members(deb, "data") if m.isfile()}
    assert f"vetassist_auth--{CURRENT}.sql" in files
    control = files["vetassist_auth.control"].decode()
    assert f"default_version = '{CURRENT}'" in control
    edges = {}
    for name in files:
        m = re.fullmatch(r"vetassist_auth--([0-9.]+)--([0-9.]+)\.sql", name)
        if m:
            edges.setdefault(m.group(1), []).append(m.group(2))
    released = [line.split()[0] for line in (ROOT / "sql/RELEASED").read_text().splitlines()
                if line.strip() and not line.startswith("#")]
    assert f"vetassist_auth--{released[0]}.sql" in files  # the base pgrx does not copy
    for start in released:
        seen, todo = set(), [start]
        while todo:
            v = todo.pop()
            if v not in seen:
                seen.add(v)
                todo.extend(edges.get(v, []))
        assert CURRENT in seen, f"no upgrade path from {start} to {CURRENT}"
