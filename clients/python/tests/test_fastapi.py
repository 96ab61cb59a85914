"""examples/fastapi_app.py with FastAPI's TestClient against the real cluster: sign-in, the PHI
page (authenticate per request, an audit row naming user, session and subject), MFA, logout,
and the 401/403 answers."""

from __future__ import annotations

import importlib.util
import logging
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import psycopg
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from psycopg.rows import TupleRow
from vetassist_testing import authenticator_code  # on sys.path through conftest.py

from vetassist_client import AsyncRequest, AsyncVetAssistClient, NotFound, VetAssistClient
from vetassist_client.fastapi import session

Conn = psycopg.Connection[TupleRow]
EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "fastapi_app.py"


@pytest.fixture(scope="module")
def http(app_conninfo: str) -> Iterator[TestClient]:
    spec = importlib.util.spec_from_file_location("fastapi_app", EXAMPLE)
    assert spec is not None and spec.loader is not None
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    with TestClient(example.create_app(app_conninfo)) as client:  # runs the lifespan: opens the pool
        yield client


def sign_in(http: TestClient, icn: str) -> tuple[str, UUID]:
    answer = http.post("/auth/callback", json={"icn": icn, "email": "lee@example.org", "first_name": "Lee"})
    assert answer.status_code == 200, answer.text
    return answer.json()["jwt_id"], UUID(answer.json()["user_id"])


def test_sign_in_phi_page_and_logout(http: TestClient, su: Conn, icn: str,
                                     caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.WARNING, logger="vetassist_client"):
        jwt_id, uid = sign_in(http, icn)
        page = http.get(f"/veterans/{uid}/summary", headers={"X-Session-JTI": jwt_id})
    assert page.status_code == 200, page.text
    assert page.json()["first_name"] == "Lee"
    row = su.execute("SELECT a.actor_user_id, a.subject_user_id, a.session_id = s.id, a.ip_hash IS NULL"
                     " FROM vetassist_auth.audit_log a, vetassist_auth.sessions s"
                     " WHERE a.id = %s AND s.jwt_id = %s", (page.json()["audit_id"], jwt_id)).fetchone()
    assert row == (uid, uid, True, True)
    # TestClient's address is "testclient": NULL and a warning, never a failed request.
    warnings = [r.getMessage() for r in caplog.records if r.name == "vetassist_client"]
    assert warnings and not any("testclient" in w for w in warnings)

    assert http.get(f"/veterans/{uid}/summary").status_code == 401
    unknown = http.get(f"/veterans/{uid}/summary", headers={"X-Session-JTI": "no-such-jwt"})
    assert (unknown.status_code, unknown.json()["detail"]) == (401, "unknown")
    assert unknown.headers["www-authenticate"] == "Bearer"

    assert http.post("/auth/logout", headers={"X-Session-JTI": jwt_id}).status_code == 204
    after = http.get(f"/veterans/{uid}/summary", headers={"X-Session-JTI": jwt_id})
    assert (after.status_code, after.json()["detail"]) == (401, "logout")


def test_a_route_raising_rolls_back_its_transaction(http: TestClient, su: Conn, icn: str) -> None:
    jwt_id, uid = sign_in(http, icn)
    _, other = sign_in(http, icn[:-1] + ("1" if icn[-1] != "1" else "2"))
    refused = http.get(f"/veterans/{other}/summary", headers={"X-Session-JTI": jwt_id})
    assert refused.status_code == 403
    assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE subject_user_id = %s"
                      " AND event_type = 'summary_viewed'", (other,)).fetchone() == (0,)


def test_mfa_is_required_before_the_phi_page(http: TestClient, client: VetAssistClient, icn: str) -> None:
    _, uid = sign_in(http, icn)
    with client.request(actor_user_id=uid) as r:
        uri = r.mfa_enroll_totp(uid)
        assert r.mfa_confirm_totp(uid, authenticator_code(uri))
    jwt_id, _ = sign_in(http, icn)
    headers = {"X-Session-JTI": jwt_id}
    pending = http.get(f"/veterans/{uid}/summary", headers=headers)
    assert (pending.status_code, pending.json()["detail"]) == (403, "mfa_required")
    # The confirming code is spent; the next time step's is accepted (RFC 6238 allows one step).
    assert http.post("/auth/mfa", json={"code": "000000"}, headers=headers).json() == {"verified": False}
    assert http.post("/auth/mfa", json={"code": authenticator_code(uri, 1)}, headers=headers).json() == {
        "verified": True}
    assert http.get(f"/veterans/{uid}/summary", headers=headers).status_code == 200


def test_a_route_that_catches_a_failed_call_answers_500(http: TestClient, app_conninfo: str, su: Conn,
                                                        icn: str) -> None:
    """A route that catches a VetAssistError and answers normally: its transaction is aborted, so
    the commit would silently roll back. The dependency answers 500, never the route's 200."""
    jwt_id, uid = sign_in(http, icn)  # a session made through the example app
    client = AsyncVetAssistClient(app_conninfo, min_size=1, max_size=2)
    # A local Annotated alias would not resolve under `from __future__ import annotations`.
    signed_in = session(client, lambda request: request.headers.get("x-session-jti"))
    event = f"lost-{uuid.uuid4()}"

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with client:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.get("/caught")
    async def caught(r: AsyncRequest = signed_in) -> dict[str, Any]:
        await r.audit_event("app", event, "info", subject_user_id=uid)
        try:
            await r.user_profile(UUID(int=0))
        except NotFound:
            return {"profile": None}  # "handled": but the transaction is aborted
        return {"profile": "found"}

    @app.get("/fine")
    async def fine(r: AsyncRequest = signed_in) -> dict[str, Any]:
        return {"audit_id": await r.audit_event("app", event, "info", subject_user_id=uid)}

    with TestClient(app) as other:  # an exception the app does not handle would raise here
        answer = other.get("/caught", headers={"X-Session-JTI": jwt_id})
        assert answer.status_code == 500, answer.text
        assert answer.json() == {"detail": "transaction_aborted"}
        assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE event_type = %s",
                          (event,)).fetchone() == (0,)
        # The pooled connection is usable by the next request.
        assert other.get("/fine", headers={"X-Session-JTI": jwt_id}).status_code == 200
    assert su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE event_type = %s",
                      (event,)).fetchone() == (1,)
