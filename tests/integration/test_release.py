"""A shipped script never changes (ParadeDB's rule): sql/RELEASED names each released version
and the SHA-256 of the script it shipped, the base install script for the first and the upgrade
script to it for the others. Every earlier version is built from the base and the chain (README,
"Releases and upgrades")."""
import hashlib
import re

from vetassist_testing import ROOT


def version():
    return re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)


def released():
    """(version, script, sha256) of every shipped version, oldest first."""
    lines = (line.split() for line in (ROOT / "sql" / "RELEASED").read_text().splitlines())
    return [tuple(fields) for fields in lines if fields and not fields[0].startswith("#")]


def test_no_shipped_script_has_changed():
    changed = [script for _v, script, digest in released()
               if hashlib.sha256((ROOT / "sql" / script).read_bytes()).hexdigest() != digest]
    assert changed == [], "shipped scripts changed: write a new upgrade script instead"


def test_the_shipped_scripts_are_the_base_and_the_chain():
    versions = [v for v, _script, _digest in released()]
    assert released()[0][1] == f"vetassist_auth--{versions[0]}.sql"
    for (older, newer), (_v, script, _d) in zip(zip(versions, versions[1:]), released()[1:]):
        assert script == f"vetassist_auth--{older}--{newer}.sql"
    # One base install script: every other one is generated (this version) or built by
    # Postgres from the base and the chain.
    bases = sorted(p.name for p in (ROOT / "sql").glob("vetassist_auth--*.sql") if p.name.count("--") == 1)
    assert bases == [released()[0][1]]
