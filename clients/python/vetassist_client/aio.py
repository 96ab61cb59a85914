"""The asyncio clients, on psycopg's AsyncConnectionPool: the same transactions as client.py,
yielding AsyncRequest, AsyncAdmin and AsyncAuditor, whose methods are coroutines."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any, Self, TypeVar
from uuid import UUID

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool

from .calls import AsyncScope, check_not_aborted
from .errors import translated_errors
from .scopes import AsyncAdmin, AsyncAuditor, AsyncRequest

S = TypeVar("S", bound=AsyncScope)


class _AsyncPooledClient:
    """Owns an async connection pool of one database role; ``async with`` opens and closes it."""

    def __init__(self, conninfo: str, **pool_kwargs: Any) -> None:
        # Not opened here: an async pool opens inside the running event loop (open() or
        # `async with`, e.g. in a FastAPI lifespan), so the client can be made at import time.
        self._pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]] = AsyncConnectionPool(
            conninfo, **{"open": False, **pool_kwargs})

    @classmethod
    def from_pool(cls, pool: AsyncConnectionPool[psycopg.AsyncConnection[TupleRow]]) -> Self:
        """Wraps an existing pool; closing the client closes it."""
        client = cls.__new__(cls)
        client._pool = pool
        return client

    async def open(self) -> None:
        await self._pool.open()

    async def close(self) -> None:
        await self._pool.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    @asynccontextmanager
    async def _transaction(self, scope: Callable[[psycopg.AsyncConnection[TupleRow]], S]) -> AsyncIterator[S]:
        """As the sync client's: committed when the block ends, rolled back when it raises,
        TransactionAborted (rolled back) when it ends normally after a failed call, and the
        scope refuses calls (RequestClosed) once the block is over."""
        with translated_errors():
            async with self._pool.connection() as conn:
                opened = scope(conn)
                try:
                    async with conn.transaction():
                        yield opened
                        check_not_aborted(opened, conn.info.transaction_status)
                finally:
                    opened._close()


class AsyncVetAssistClient(_AsyncPooledClient):
    """VetAssistClient for asyncio (a vetassist_app member)."""

    @asynccontextmanager
    async def authenticated(self, jwt_id: str, client_ip: str | None = None) -> AsyncIterator[AsyncRequest]:
        """One call per request, as VetAssistClient.authenticated: check
        ``request.authentication``, end the block normally, raise the HTTP error after it."""
        async with self._transaction(AsyncRequest) as request:
            request._authentication = await request.authenticate(jwt_id, client_ip)
            yield request

    @asynccontextmanager
    async def request(self, actor_user_id: UUID | None = None,
                      client_ip: str | None = None) -> AsyncIterator[AsyncRequest]:
        """A transaction not tied to a session, as VetAssistClient.request."""
        async with self._transaction(AsyncRequest) as request:
            if actor_user_id is not None or client_ip is not None:
                await request.set_actor(actor_user_id, client_ip)
            yield request


class AsyncAdminClient(_AsyncPooledClient):
    """AdminClient for asyncio (a vetassist_admin member)."""

    @asynccontextmanager
    async def transaction(self, actor_user_id: UUID | None = None,
                          client_ip: str | None = None) -> AsyncIterator[AsyncAdmin]:
        async with self._transaction(AsyncAdmin) as admin:
            if actor_user_id is not None or client_ip is not None:
                await admin.set_actor(actor_user_id, client_ip)
            yield admin


class AsyncAuditorClient(_AsyncPooledClient):
    """AuditorClient for asyncio (a vetassist_auditor member)."""

    @asynccontextmanager
    async def transaction(self) -> AsyncIterator[AsyncAuditor]:
        async with self._transaction(AsyncAuditor) as auditor:
            yield auditor
