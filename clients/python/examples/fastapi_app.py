"""A runnable FastAPI app on vetassist_client: the sign-in callback, a page of PHI, MFA, logout.

    pip install './clients/python[fastapi]' uvicorn
    export VETASSIST_PG_CONNINFO="host=/run/postgresql dbname=vetassist user=app_user"
    uvicorn --factory --app-dir clients/python/examples fastapi_app:create_app

Tokens are left out: the callback returns the new session's jwt_id, and a client sends it back
in the ``X-Session-JTI`` header, standing in for the ``jti`` claim of the JWT your middleware
verifies (``session_jti`` is the one place that changes).
"""

import os
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any
from uuid import UUID

from fastapi import FastAPI, HTTPException, Request, Response
from pydantic import BaseModel

from vetassist_client import AsyncRequest, AsyncVetAssistClient, client_address
from vetassist_client.fastapi import session


class VaIdentity(BaseModel):
    """What VA.gov's userinfo says after the OAuth callback (the exchange itself is left out)."""

    icn: str
    email: str | None = None
    first_name: str | None = None
    last_name: str | None = None


class MfaCode(BaseModel):
    code: str


def session_jti(request: Request) -> str | None:
    """The session's jwt_id: here a header; in an application, the verified JWT's ``jti``."""
    return request.headers.get("x-session-jti")


def create_app(conninfo: str | None = None) -> FastAPI:
    client = AsyncVetAssistClient(conninfo or os.environ["VETASSIST_PG_CONNINFO"], min_size=1, max_size=10)
    # A route taking SignedIn runs only for an ACTIVE session past MFA (else 401/403);
    # MfaPending also admits a session still waiting for its second factor.
    SignedIn = Annotated[AsyncRequest, session(client, session_jti)]
    MfaPending = Annotated[AsyncRequest, session(client, session_jti, require_mfa=False)]

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        async with client:
            yield

    app = FastAPI(lifespan=lifespan)

    @app.post("/auth/callback")
    async def sign_in(identity: VaIdentity, request: Request) -> dict[str, Any]:
        """After VA.gov sign-in: the account and a session, in one transaction."""
        ip = client_address(request.client.host if request.client else None)
        jwt_id = str(uuid.uuid4())
        async with client.request(client_ip=ip) as r:
            user_id = await r.upsert_va_user(identity.icn, "veteran", identity.email,
                                             identity.first_name, identity.last_name)
            await r.set_actor(user_id, ip)
            await r.create_session(user_id, jwt_id, datetime.now(UTC) + timedelta(hours=12), ip=ip,
                                   user_agent=request.headers.get("user-agent"))
            mfa = await r.mfa_required(jwt_id)
        return {"jwt_id": jwt_id, "user_id": str(user_id), "mfa_required": mfa}

    @app.post("/auth/mfa")
    async def verify_mfa(body: MfaCode, request: Request, r: MfaPending) -> dict[str, bool]:
        jwt_id = session_jti(request)
        assert jwt_id is not None  # the dependency answered 401 otherwise
        # A wrong code is recorded durably by the extension, so answering 200 {"verified": false}
        # (and committing) loses nothing.
        return {"verified": await r.mfa_verify(jwt_id, body.code)}

    @app.get("/veterans/{user_id}/summary")
    async def summary(user_id: UUID, r: SignedIn) -> dict[str, Any]:
        """A page of the veteran's PHI. Who may see whose record is the application's rule:
        here, veterans see their own."""
        if user_id != r.authentication.user_id:
            raise HTTPException(403, "not your record")
        profile = await r.user_profile(user_id)  # decrypted; the extension audits the read
        audit_id = await r.audit_event("phi", "summary_viewed", "success", {"page": "summary"},
                                       subject_user_id=user_id)
        return {"first_name": profile.first_name, "veteran_status": profile.veteran_status,
                "audit_id": audit_id}

    @app.post("/auth/logout", status_code=204)
    async def logout(request: Request, r: MfaPending) -> Response:
        jwt_id, user_id = session_jti(request), r.authentication.user_id
        assert jwt_id is not None and user_id is not None  # the dependency admits ACTIVE sessions only
        await r.end_session(jwt_id, "logout")
        await r.delete_va_tokens(user_id)
        return Response(status_code=204)

    return app
