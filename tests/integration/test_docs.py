"""Every ```sql block of the README and of docs/ runs in psql as written, so the examples cannot
drift from the API. A block that cannot run here is fenced ```sql-norun and starts with a
`-- not run: <reason>` line. The psql variables the examples use (`:'uid'`, `:'jti'`, …) are set
by the preamble below, as an application would pass bind parameters."""
import re
import subprocess

import pytest

from vetassist_testing import BIN, ROOT, install

DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")), ROOT / "clients/python/README.md",
             ROOT / "clients/node/README.md"]
FENCE = re.compile(r"^( *)```(sql|sql-norun)\n(.*?)^\1```", re.S | re.M)

# A veteran with VA tokens and a live session, another user, an audited table and a sealed chain.
PREAMBLE = r"""
\set ON_ERROR_STOP 1
CREATE TABLE public.notes (id int PRIMARY KEY, body text, diagnosis text, viewed_at timestamptz);
SELECT vetassist_auth.upsert_va_user('1012667985V123456', 'veteran', 'maria@example.org', 'Maria', 'Lopez') AS uid \gset
\set veteran :uid
SELECT vetassist_auth.upsert_va_user('1012667985V654321', 'caregiver', NULL, 'Ana', 'Ruiz') AS clerk \gset
\set jti 'jti-docs-1'
\set jwt_id :jti
\set jwt_exp '2099-01-01 00:00:00+00'
\set client_ip '203.0.113.7'
\set ua 'Mozilla/5.0 (iPhone)'
\set fp 'device-fp-9f3a'
\set access 'va-access-docs'
\set refresh 'va-refresh-docs'
\set rt1 'rt-docs-1'
\set rt2 'rt-docs-2'
\set rt3 'rt-docs-3'
SELECT vetassist_auth.create_session(:'uid', :'jti', now() + interval '1 hour', :'client_ip') AS session_id \gset
SELECT vetassist_auth.seal_audit_log() AS sealed \gset
SELECT seq, hash FROM vetassist_auth.audit_chain_head() \gset
"""


def blocks():
    for document in DOCUMENTS:
        text = document.read_text()
        for match in FENCE.finditer(text):
            line = text[:match.start()].count("\n") + 1
            body = "\n".join(row[len(match.group(1)):] for row in match.group(3).splitlines())
            yield pytest.param(match.group(2), body, id=f"{document.relative_to(ROOT)}:{line}")


@pytest.fixture(scope="module")
def docs_cluster(cluster):
    return cluster


@pytest.mark.parametrize("fence,body", list(blocks()))
def test_every_sql_example_runs_as_written(docs_cluster, request, fence, body):
    if fence == "sql-norun":
        first = body.lstrip().splitlines()[0]
        assert first.startswith("-- not run: ") and len(first) > 20, f"a sql-norun block says why first: {first!r}"
        return
    db = "docs_" + re.sub(r"[^a-z0-9]+", "_", request.node.callspec.id.lower())[-50:]
    if body.lstrip().startswith("CREATE EXTENSION vetassist_auth"):
        docs_cluster.psql(f"CREATE DATABASE {db}")
        script = body
    else:
        install(docs_cluster, db)
        script = PREAMBLE + body
    try:
        out = subprocess.run([str(BIN / "psql"), "-X", "-q", "-v", "ON_ERROR_STOP=1", docs_cluster.conninfo(db), "-f", "-"],
                             input=script, capture_output=True, text=True)
    finally:
        # Its audit recorder leaves with it: the shared cluster's worker slots are for the rest.
        docs_cluster.psql(f"DROP DATABASE {db}")
    assert out.returncode == 0, f"{out.stderr}\n--- block ---\n{body}"
