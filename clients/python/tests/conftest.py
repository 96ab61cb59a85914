"""A throw-away cluster (scripts/cluster.sh, name pyclient, a free port) with the extension
installed in database vetassist; the client connects as app_user (member of vetassist_app)."""

from __future__ import annotations

import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from vetassist_client import VetAssistClient

ROOT = Path(__file__).resolve().parents[3]
NAME = "pyclient"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# A port free now, so a busy one never collides (scripts/cluster.sh listens on it).
PORT = _free_port()


def conninfo(socket_dir: Path, user: str, dbname: str = "vetassist") -> str:
    return f"host={socket_dir} port={PORT} dbname={dbname} user={user}"


@pytest.fixture(scope="session")
def cluster() -> Iterator[Path]:
    """The cluster's socket directory, after the database, extension and app_user exist."""
    script = ROOT / "scripts/cluster.sh"
    started = subprocess.run([script, "start", NAME, str(PORT), "shared_preload_libraries = 'vetassist_auth'"],
                             capture_output=True, text=True)
    try:
        if started.returncode != 0:
            pytest.fail(f"cluster.sh start failed:\n{started.stderr}", pytrace=False)
        socket_dir = Path(started.stdout.strip().splitlines()[-1])
        with psycopg.connect(conninfo(socket_dir, "postgres", "postgres"), autocommit=True) as conn:
            conn.execute("CREATE DATABASE vetassist")
        with psycopg.connect(conninfo(socket_dir, "postgres"), autocommit=True) as conn:
            conn.execute("CREATE EXTENSION vetassist_auth")
            conn.execute("CREATE ROLE app_user LOGIN IN ROLE vetassist_app")
        yield socket_dir
    finally:
        subprocess.run([script, "stop", NAME], check=False)


@pytest.fixture(scope="session")
def app_conninfo(cluster: Path) -> str:
    return conninfo(cluster, "app_user")


@pytest.fixture(scope="session")
def client(app_conninfo: str) -> Iterator[VetAssistClient]:
    with VetAssistClient(app_conninfo, min_size=1, max_size=4) as c:
        yield c


@pytest.fixture
def su(cluster: Path) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A superuser connection to vetassist (autocommit), for checks the application role cannot make."""
    with psycopg.connect(conninfo(cluster, "postgres"), autocommit=True) as conn:
        yield conn


@pytest.fixture
def icn() -> str:
    """A fresh VA ICN, so tests never share an account."""
    digits = f"{uuid.uuid4().int:032d}"
    return f"10{digits[:8]}V{digits[8:14]}"
