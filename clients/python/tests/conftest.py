"""A throw-away cluster (tests/vetassist_testing.py, name pyclient) with the extension installed
in database vetassist; the clients connect as app_user, admin_user and auditor_user (members of
vetassist_app, vetassist_admin, vetassist_auditor)."""

from __future__ import annotations

import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from vetassist_client import AdminClient, AuditorClient, VetAssistClient

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


@pytest.fixture(scope="session")
def admin_conninfo(cluster: Cluster) -> str:
    return cluster.conninfo("vetassist", "admin_user")


@pytest.fixture(scope="session")
def auditor_conninfo(cluster: Cluster) -> str:
    return cluster.conninfo("vetassist", "auditor_user")


@pytest.fixture(scope="session", autouse=True)
def staff_roles(cluster: Cluster) -> None:
    """admin_user and auditor_user, the login roles of the admin and auditor scopes (install()
    makes them with app_user; a cluster from elsewhere may lack them)."""
    cluster.psql("""
        DO $$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'admin_user') THEN
            CREATE ROLE admin_user LOGIN IN ROLE vetassist_admin;
          END IF;
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'auditor_user') THEN
            CREATE ROLE auditor_user LOGIN IN ROLE vetassist_auditor;
          END IF;
        END $$""", "vetassist")


@pytest.fixture(scope="session")
def admin_client(admin_conninfo: str) -> Iterator[AdminClient]:
    with AdminClient(admin_conninfo, min_size=1, max_size=2) as c:
        yield c


@pytest.fixture(scope="session")
def auditor_client(auditor_conninfo: str) -> Iterator[AuditorClient]:
    with AuditorClient(auditor_conninfo, min_size=1, max_size=2) as c:
        yield c
