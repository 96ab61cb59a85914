"""The package installs, from the checkout and from a wheel built of it, into a fresh virtual
environment (no system site packages) with its dependencies from PyPI or pip's cache."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

CLIENT_DIR = Path(__file__).resolve().parents[1]
CHECK = """
import importlib.resources, vetassist_client, vetassist_client.aio, vetassist_client.report
from vetassist_client import error_class
assert error_class("VA001").__name__ == "TokenExpired", error_class("VA001")
assert importlib.resources.files("vetassist_client").joinpath("py.typed").is_file()
print(vetassist_client.__file__)
"""


def run(*cmd: str | Path, cwd: Path) -> str:
    done = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"{cmd}: {done.stdout}\n{done.stderr}"
    return done.stdout


def test_installs_from_the_checkout_and_from_a_wheel(tmp_path: Path) -> None:
    # A copy of the checkout's package: setuptools builds in the source tree, and a build/ left
    # there by an earlier run could slip removed modules into the wheel.
    source = tmp_path / "source"
    shutil.copytree(CLIENT_DIR / "vetassist_client", source / "vetassist_client",
                    ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(CLIENT_DIR / name, source / name)
    run(sys.executable, "-m", "venv", tmp_path / "venv", cwd=tmp_path)
    python = tmp_path / "venv" / "bin" / "python"
    site = run(python, "-c", "import sysconfig; print(sysconfig.get_path('purelib'))", cwd=tmp_path).strip()

    run(python, "-m", "pip", "install", "-q", source, cwd=tmp_path)
    assert run(python, "-c", CHECK, cwd=tmp_path).startswith(site)

    run(sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", tmp_path / "dist", source, cwd=tmp_path)
    (wheel,) = (tmp_path / "dist").glob("vetassist_client-*.whl")
    package = {f"vetassist_client/{p.name}" for p in (CLIENT_DIR / "vetassist_client").iterdir()
               if p.suffix in (".py", ".typed")}
    assert package - set(zipfile.ZipFile(wheel).namelist()) == set()
    run(python, "-m", "pip", "install", "-q", "--force-reinstall", "--no-deps", wheel, cwd=tmp_path)
    assert run(python, "-c", CHECK, cwd=tmp_path).startswith(site)
