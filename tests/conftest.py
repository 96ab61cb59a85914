"""The pytest plugin of every suite under tests/: markers and the shared cluster's fixtures; the
rest is the plain module vetassist_testing, which the client tests, the bench and the demo
import too."""
import pytest

from vetassist_testing import installed_cluster


def pytest_configure(config):
    config.addinivalue_line("markers", "load: a load or soak run (make test runs it on the default version only)")
    config.addinivalue_line("markers", "no_pg: needs no PostgreSQL (make test runs it on the default version only)")


@pytest.fixture(scope="session")
def cluster():
    """The shared cluster: library preloaded, extension installed in database 'vetassist'."""
    with installed_cluster("pytest") as c:
        yield c


@pytest.fixture
def app(cluster):
    with cluster.connect("vetassist", "app_user") as conn:
        yield conn


@pytest.fixture
def admin(cluster):
    with cluster.connect("vetassist", "admin_user") as conn:
        yield conn


@pytest.fixture
def su(cluster):
    with cluster.connect("vetassist") as conn:
        yield conn
