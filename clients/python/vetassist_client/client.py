"""The sync clients: a connection pool per database role, one transaction per unit of work.

``VetAssistClient`` (vetassist_app) yields a ``Request`` per application request,
``AdminClient`` an ``Admin``, ``AuditorClient`` an ``Auditor``; aio.py has the asyncio twins.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from types import TracebackType
from typing import Any, Self, TypeVar
from uuid import UUID

import psycopg
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from .calls import SyncScope, check_not_aborted
from .errors import translated_errors
from .rows import CrisisNotice
from .scopes import Admin, Auditor, Request

log = logging.getLogger("vetassist_client")
S = TypeVar("S", bound=SyncScope)


class _PooledClient:
    """Owns a connection pool of one database role."""

    def __init__(self, conninfo: str, **pool_kwargs: Any) -> None:
        self._pool: ConnectionPool[psycopg.Connection[TupleRow]] = ConnectionPool(
            conninfo, **{"open": True, **pool_kwargs})

    @classmethod
    def from_pool(cls, pool: ConnectionPool[psycopg.Connection[TupleRow]]) -> Self:
        """Wraps an existing pool; closing the client closes it."""
        client = cls.__new__(cls)
        client._pool = pool
        return client

    def close(self) -> None:
        self._pool.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.close()

    @contextmanager
    def _transaction(self, scope: Callable[[psycopg.Connection[TupleRow]], S]) -> Iterator[S]:
        """``scope`` of a pooled connection in a transaction: committed when the block ends,
        rolled back when it raises. A failed call aborts the transaction, so handle VetAssistError
        outside: a block that ends normally after one raises TransactionAborted (rolled back),
        never a silent rollback. The scope refuses calls (RequestClosed) once the block is over."""
        with translated_errors(), self._pool.connection() as conn:
            opened = scope(conn)
            try:
                with conn.transaction():
                    yield opened
                    check_not_aborted(opened, conn.info.transaction_status)
            finally:
                opened._close()


class VetAssistClient(_PooledClient):
    """The application's client (a vetassist_app member): one transaction per request."""

    @contextmanager
    def authenticated(self, jwt_id: str, client_ip: str | None = None) -> Iterator[Request]:
        """One call per request: opens the transaction with ``authenticate(jwt_id, client_ip)``.

        ``request.authentication`` is the row: serve the request only when it is ``active`` (and
        MFA is not ``mfa_required`` where that matters). The block runs whatever the status, and
        ends normally to commit what authenticate recorded (a session it found idle ends for
        good); raise the HTTP error after the block. A block that ends normally after a failed
        call raises TransactionAborted (rolled back); ``request`` raises RequestClosed after the
        block. A client_ip that is not an IP address is passed as NULL with a warning (an IPv6
        zone, ``%eth0``, is dropped first).
        """
        with self._transaction(Request) as request:
            request._authentication = request.authenticate(jwt_id, client_ip)
            yield request

    @contextmanager
    def request(self, actor_user_id: UUID | None = None, client_ip: str | None = None) -> Iterator[Request]:
        """A transaction not tied to a session (the sign-in callback, a job), naming the actor and
        the client address for its audit rows with set_actor."""
        with self._transaction(Request) as request:
            # The actor lasts for this transaction only; without one there is nothing to set.
            if actor_user_id is not None or client_ip is not None:
                request.set_actor(actor_user_id, client_ip)
            yield request

    def listen_crisis(self, timeout: float) -> Iterator[CrisisNotice]:
        """Crisis notifications arriving within ``timeout`` seconds, on a dedicated connection.

        NOTIFY reaches only current listeners, so a notice is a wake-up, not the record: the record
        is read by an auditor with vetassist_auth.crisis_events(since). Any role may NOTIFY on the
        channel: a payload the extension did not send (verify_crisis_notice) is dropped, never yielded.
        """
        # The pool's settings; psycopg_pool 3.3 also accepts callables for both.
        conninfo, kwargs = self._pool.conninfo, self._pool.kwargs or {}
        conninfo = conninfo() if callable(conninfo) else conninfo
        kwargs = kwargs() if callable(kwargs) else kwargs
        with translated_errors(), psycopg.connect(conninfo, **{**kwargs, "autocommit": True}) as conn, \
                psycopg.connect(conninfo, **{**kwargs, "autocommit": True}) as checker:
            conn.execute("LISTEN vetassist_auth_crisis")
            for notify in conn.notifies(timeout=timeout):
                if not Request(checker).verify_crisis_notice(notify.payload):
                    log.warning("dropped a forged vetassist_auth_crisis notification from backend %s", notify.pid)
                    continue
                payload = json.loads(notify.payload)
                yield CrisisNotice(UUID(payload["session_id"]), int(payload["event_id"]))


class AdminClient(_PooledClient):
    """An administrator's client (a vetassist_admin member)."""

    @contextmanager
    def transaction(self, actor_user_id: UUID | None = None, client_ip: str | None = None) -> Iterator[Admin]:
        """One transaction; ``actor_user_id`` names the staff member on its audit rows."""
        with self._transaction(Admin) as admin:
            if actor_user_id is not None or client_ip is not None:
                admin.set_actor(actor_user_id, client_ip)
            yield admin


class AuditorClient(_PooledClient):
    """An auditor's client (a vetassist_auditor member)."""

    @contextmanager
    def transaction(self) -> Iterator[Auditor]:
        """One transaction. The accounting reads are recorded durably whatever it does next."""
        with self._transaction(Auditor) as auditor:
            yield auditor
