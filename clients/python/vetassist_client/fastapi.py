"""A FastAPI dependency for one call per request (needs ``pip install 'vetassist-client[fastapi]'``).

``session(client, jwt_id)`` opens the request's transaction with ``authenticate`` and gives the
route the ``AsyncRequest`` inside it; the transaction commits when the route returns, before the
response is sent, and rolls back when the route raises. A route that caught a failed call and
returned normally gets a 500 (detail ``transaction_aborted``): its transaction was rolled back.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Depends, HTTPException, Request, status

from .aio import AsyncVetAssistClient
from .errors import TransactionAborted
from .scopes import AsyncRequest


def session(client: AsyncVetAssistClient, jwt_id: Callable[[Request], str | None], *,
            require_mfa: bool = True) -> Any:
    """A ``Depends`` yielding the AsyncRequest of a signed-in session, for ``Annotated[AsyncRequest, …]``.

    ``jwt_id`` returns the session's jwt_id from the HTTP request (the ``jti`` of the token your
    middleware verified), None when there is none. Answers 401 (``WWW-Authenticate: Bearer``,
    detail: authenticate's reason, such as ``idle_timeout`` or ``unknown``) unless the session is
    ACTIVE, and 403 (detail ``mfa_required``) while a second factor is due, unless
    ``require_mfa`` is False (the MFA page itself, logout). The client address is
    ``request.client.host``, passed as NULL when it is not an IP address. Answers 500 (detail
    ``transaction_aborted``), never the route's answer, when a call failed in the route and the
    route caught the error: the transaction was aborted and has been rolled back.
    """

    async def dependency(http: Request) -> AsyncIterator[AsyncRequest]:
        jti = jwt_id(http)
        if jti is None:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, "unknown", headers={"WWW-Authenticate": "Bearer"})
        try:
            async with client.authenticated(jti, http.client.host if http.client else None) as request:
                auth = request.authentication
                if auth.active and not (require_mfa and auth.mfa_required):
                    yield request
                    return
        except TransactionAborted as aborted:
            # The route caught a failed call and returned normally: what it did was rolled
            # back, so its answer must not be a success.
            raise HTTPException(status.HTTP_500_INTERNAL_SERVER_ERROR, "transaction_aborted") from aborted
        # Refused after the block ended normally: what authenticate recorded (a session it found
        # idle, now ended) is committed.
        if not auth.active:
            raise HTTPException(status.HTTP_401_UNAUTHORIZED, auth.reason, headers={"WWW-Authenticate": "Bearer"})
        raise HTTPException(status.HTTP_403_FORBIDDEN, "mfa_required")

    # scope="function": the exit code (the COMMIT) runs before the response is sent, so a failed
    # commit is a 500, never a success the database does not hold.
    return Depends(dependency, scope="function")
