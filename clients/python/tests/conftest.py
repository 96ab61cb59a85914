"""A throw-away cluster (tests/vetassist_testing.py, name pyclient) with the extension installed
in database vetassist; the client connects as app_user (member of vetassist_app)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from vetassist_client import VetAssistClient

ROOT = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(ROOT / "tests"))
from vetassist_testing import Cluster, installed_cluster  # noqa: E402


@pytest.fixture(scope="session")
def cluster() -> Iterator[Cluster]:
    with installed_cluster("pyclient") as c:
        yield c


@pytest.fixture(scope="session")
def app_conninfo(cluster: Cluster) -> str:
    return cluster.conninfo("vetassist", "app_user")


@pytest.fixture(scope="session")
def client(app_conninfo: str) -> Iterator[VetAssistClient]:
    with VetAssistClient(app_conninfo, min_size=1, max_size=4) as c:
        yield c


@pytest.fixture
def su(cluster: Cluster) -> Iterator[psycopg.Connection[tuple[object, ...]]]:
    """A superuser connection to vetassist (autocommit), for checks the application role cannot make."""
    with cluster.connect("vetassist") as conn:
        yield conn


@pytest.fixture
def icn() -> str:
    """A fresh VA ICN, so tests never share an account."""
    digits = f"{uuid.uuid4().int:032d}"
    return f"10{digits[:8]}V{digits[8:14]}"
