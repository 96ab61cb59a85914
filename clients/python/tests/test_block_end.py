"""How a request's transaction ends: never a reported success after a silent rollback (a call
that failed inside the block and was caught aborts the transaction, and COMMIT would roll it
back), and never a call through a request object after its transaction ended (on a pool, its
connection may already serve another request). Sync and asyncio, app, admin and auditor scopes."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import TupleRow
from psycopg_pool import AsyncConnectionPool, ConnectionPool

from vetassist_client import (
    AdminClient,
    AsyncAdminClient,
    AsyncAuditorClient,
    AsyncVetAssistClient,
    AuditorClient,
    NotFound,
    RequestClosed,
    TransactionAborted,
    VetAssistClient,
    VetAssistError,
)

Conn = psycopg.Connection[TupleRow]
NOBODY = UUID(int=0)


def audit_rows(su: Conn, event_type: str) -> int:
    row = su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE event_type = %s", (event_type,)).fetchone()
    assert row is not None
    return int(row[0])


def signed_in(client: VetAssistClient, icn: str) -> tuple[UUID, str]:
    jwt_id = f"jwt-{uuid.uuid4()}"
    with client.request() as r:
        uid = r.upsert_va_user(icn, "veteran", "kim@example.org", "Kim", "Doe")
        r.create_session(uid, jwt_id, datetime.now(UTC) + timedelta(hours=1))
    return uid, jwt_id


def test_the_error_classes() -> None:
    assert issubclass(TransactionAborted, VetAssistError) and issubclass(RequestClosed, VetAssistError)
    assert TransactionAborted.sqlstate is None and RequestClosed.sqlstate is None


def test_a_caught_failure_inside_the_block_is_never_a_silent_rollback(client: VetAssistClient, su: Conn,
                                                                      icn: str) -> None:
    uid, jwt_id = signed_in(client, icn)
    event = f"lost-{uuid.uuid4()}"
    with pytest.raises(TransactionAborted, match="rolled back"):
        with client.authenticated(jwt_id) as r:
            assert r.authentication.active
            r.audit_event("app", event, "info", subject_user_id=uid)
            try:
                r.user_profile(NOBODY)
            except NotFound:
                pass  # the handler "handles" it; the transaction is aborted all the same
    assert audit_rows(su, event) == 0
    # request() too, and the connection goes back to the pool usable.
    with pytest.raises(TransactionAborted):
        with client.request(actor_user_id=uid) as r:
            r.audit_event("app", event, "info")
            with pytest.raises(NotFound):
                r.user_profile(NOBODY)
    assert audit_rows(su, event) == 0
    with client.request(actor_user_id=uid) as r:
        r.audit_event("app", event, "info")
    assert audit_rows(su, event) == 1


def test_the_staff_scopes_report_an_aborted_transaction(admin_client: AdminClient,
                                                        auditor_client: AuditorClient) -> None:
    with pytest.raises(TransactionAborted):
        with admin_client.transaction() as a:
            with pytest.raises(NotFound):
                a.unretire_key(2**31 - 1)
    with pytest.raises(TransactionAborted):
        with auditor_client.transaction() as s:
            with pytest.raises(psycopg.errors.DivisionByZero):
                s.connection.execute("SELECT 1/0")  # the application's own query, in the transaction


def test_a_request_refuses_calls_after_its_transaction(app_conninfo: str, su: Conn, icn: str) -> None:
    with VetAssistClient.from_pool(ConnectionPool(app_conninfo, min_size=1, max_size=1, open=True)) as client:
        uid, jwt_id = signed_in(client, icn)
        with client.authenticated(jwt_id) as first:
            assert first.authentication.active
        event = f"stray-{uuid.uuid4()}"
        # max_size=1: the second block has the very connection the first request used.
        with client.authenticated(jwt_id) as second:
            assert second.connection is first._conn
            with pytest.raises(RequestClosed):
                first.audit_event("app", event, "info", subject_user_id=uid)
            with pytest.raises(RequestClosed):
                first.connection  # noqa: B018 - the property is what is tested
            second.audit_event("app", "second_request", "info")
        assert audit_rows(su, event) == 0
        # A request whose block raised is closed as well.
        with pytest.raises(RuntimeError), client.request() as failed:
            raise RuntimeError("the handler failed")
        with pytest.raises(RequestClosed):
            failed.node_role()


def test_the_staff_scopes_refuse_calls_after_their_transaction(admin_client: AdminClient,
                                                               auditor_client: AuditorClient) -> None:
    with admin_client.transaction() as a:
        a.node_role()
    with auditor_client.transaction() as s:
        s.node_role()
    with pytest.raises(RequestClosed):
        a.node_role()
    with pytest.raises(RequestClosed):
        s.verify_audit_chain()


def test_asyncio_aborted_and_closed(app_conninfo: str, admin_conninfo: str, auditor_conninfo: str,
                                    client: VetAssistClient, su: Conn, icn: str) -> None:
    uid, jwt_id = signed_in(client, icn)
    event = f"async-{uuid.uuid4()}"

    async def scenario() -> None:
        pool = AsyncConnectionPool(app_conninfo, min_size=1, max_size=1, open=False)
        async with AsyncVetAssistClient.from_pool(pool) as app, \
                AsyncAdminClient(admin_conninfo, min_size=1) as admin, \
                AsyncAuditorClient(auditor_conninfo, min_size=1) as auditor:
            with pytest.raises(TransactionAborted):
                async with app.authenticated(jwt_id) as r:
                    await r.audit_event("app", event, "info", subject_user_id=uid)
                    try:
                        await r.user_profile(NOBODY)
                    except NotFound:
                        pass
            with pytest.raises(TransactionAborted):
                async with app.request(actor_user_id=uid) as r:
                    await r.audit_event("app", event, "info")
                    with pytest.raises(NotFound):
                        await r.user_profile(NOBODY)
            async with app.authenticated(jwt_id) as first:
                assert first.authentication.active
            async with app.authenticated(jwt_id) as second:
                assert second.connection is first._conn
                with pytest.raises(RequestClosed):
                    await first.audit_event("app", event, "info")
            with pytest.raises(TransactionAborted):
                async with admin.transaction() as a:
                    with pytest.raises(NotFound):
                        await a.unretire_key(2**31 - 1)
            with pytest.raises(RequestClosed):
                await a.node_role()
            async with auditor.transaction() as s:
                await s.node_role()
            with pytest.raises(RequestClosed):
                await s.verify_audit_chain()

    asyncio.run(scenario())
    assert audit_rows(su, event) == 0
