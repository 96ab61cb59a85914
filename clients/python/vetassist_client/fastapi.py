"""A FastAPI dependency for one call per request (needs ``pip install 'vetassist-client[fastapi]'``).

``session(client, jwt_id)`` opens the request's transaction with ``authenticate`` and gives the
route the ``AsyncRequest`` inside it; the transaction commits when the route returns, before the
response is sent, and rolls back when the route raises.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, HTTPException, Request, status

from .aio import AsyncVetAssistClient
from .scopes import AsyncRequest


def session(client: AsyncVetAssistClient, jwt_id: Callable[[Request], str | None], *,
            require_mfa: bool = True) -> Any:
    """A ``Depends`` yielding the AsyncRequest of a signed-in session, for ``Annotated[AsyncRequest, …]``.

    ``jwt_id`` returns the session's jwt_id from the HTTP request (the ``jti`` of the token your
    middleware verified), None when there is none. Answers 401 (``WWW-Authenticate: Bearer``,
    detail: authenticate's reason, such as ``idle_timeout`` or ``unknown``) unless the session is
    ACTIVE, and 403 (detail ``mfa_required``) while a second factor is due, unless
    ``require_mfa`` is False (the MFA page itself, logout). The client address is
    ``request.client.host``, passed as NULL when it is not an IP address.
    """

    async def dependency(http: Request) -> AsyncIterator[AsyncRequest]:
        jti = jwt_id(http)
        if jti is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown", headers={"WWW-Authenticate": "Bearer"})
        async with client.authenticated(jti, http.client.host if http.client else None) as request:
            auth = request.authentication
            if auth.active and not (require_mfa and auth.mfa_required):
                yield request
                return
        # Refused after the block ended normally: what authenticate recorded (a session it found
        # idle, now ended) is committed.
        if not auth.active:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, auth.reason, headers={"WWW-Authenticate": "Bearer"})
        raise HTTPException(status.HTTP_403_FORBIDDEN, "mfa_required")

    # scope="function": the exit code (the COMMIT) runs before the response is sent, so a failed
    # commit is a 500, never a success the database does not hold.
    return Depends(dependency, scope="function")
