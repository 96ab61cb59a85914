"""The install script of a released version never changes: a schema change needs a new version
and an upgrade script (README, "Releases and upgrades")."""
import re

import pytest

from conftest import EXTENSION_DIR, ROOT


def version():
    return re.search(r'^version = "([^"]+)"', (ROOT / "Cargo.toml").read_text(), re.M).group(1)


def normalized(sql):
    """The script's statement blocks, order-free (the generator may order independent blocks
    differently from build to build), without comments (they carry source line numbers)."""
    blocks = []
    for block in sql.split("/* <begin connected objects> */"):
        lines = (line.rstrip() for line in block.replace("/* </end connected objects> */", "").splitlines())
        text = "\n".join(line for line in lines if line and not line.lstrip().startswith("--"))
        if text:
            blocks.append(text)
    return sorted(blocks)


def test_the_installed_script_of_this_version_is_the_released_one():
    v = version()
    installed = EXTENSION_DIR / f"vetassist_auth--{v}.sql"
    released = ROOT / "sql" / "releases" / f"vetassist_auth--{v}.sql"
    if not released.exists():
        # A version in development (0.2.0) ships no frozen copy: the upgrade test's catalog diff
        # and its chain from the newest release hold it to its upgrade script instead.
        pytest.skip(f"{v} is in development: no frozen install script")
    assert normalized(installed.read_text()) == normalized(released.read_text()), (
        f"the schema of {v} changed after its release: bump the version and add an upgrade script")
