"""The asyncio clients against the real cluster: the same calls as coroutines, one transaction per
``async with``, errors translated, and a rollback when the block raises."""

from __future__ import annotations

import asyncio
import uuid
from datetime import UTC, datetime, timedelta

import psycopg
import pytest
from psycopg.rows import TupleRow

from vetassist_client import (
    AsyncAdminClient,
    AsyncAuditorClient,
    AsyncVetAssistClient,
    NodeRole,
    NotFound,
    Profile,
    SessionStatus,
)

Conn = psycopg.Connection[TupleRow]


def test_one_request_with_authenticate(app_conninfo: str, su: Conn, icn: str) -> None:
    async def scenario() -> None:
        async with AsyncVetAssistClient(app_conninfo, min_size=1, max_size=2) as client:
            jwt_id = f"jwt-{uuid.uuid4()}"
            async with client.request(client_ip="198.51.100.4") as r:
                uid = await r.upsert_va_user(icn, "veteran", "sam@example.org", "Sam", "Doe")
                sid = await r.create_session(uid, jwt_id, datetime.now(UTC) + timedelta(hours=1))
            async with client.authenticated(jwt_id, "198.51.100.4") as r:
                auth = r.authentication
                profile = await r.user_profile(uid)
                viewed = await r.audit_event("phi", "chart_viewed", "success", {}, subject_user_id=uid)
                assert await r.session_status(jwt_id) is SessionStatus.ACTIVE
            assert (auth.status, auth.user_id, auth.session_id) == (SessionStatus.ACTIVE, uid, sid)
            assert isinstance(profile, Profile) and profile.first_name == "Sam"
            assert su.execute("SELECT actor_user_id, subject_user_id, session_id FROM vetassist_auth.audit_log"
                              " WHERE id = %s", (viewed,)).fetchone() == (uid, uid, sid)

            with pytest.raises(RuntimeError):
                async with client.authenticated(jwt_id) as r:
                    rolled_back = await r.audit_event("app", "page_viewed", "info")
                    raise RuntimeError("the handler failed")
            assert su.execute("SELECT 1 FROM vetassist_auth.audit_log WHERE id = %s", (rolled_back,)).fetchone() is None

            with pytest.raises(NotFound):
                async with client.request() as r:
                    await r.user_profile(uuid.uuid4())
            async with client.authenticated("no-such-jwt") as r:
                assert (r.authentication.status, r.authentication.reason) == (None, "unknown")
            async with client.request(actor_user_id=uid) as r:
                assert await r.end_session(jwt_id) is True

    asyncio.run(scenario())


def test_admin_and_auditor_scopes(admin_conninfo: str, auditor_conninfo: str) -> None:
    async def scenario() -> None:
        async with AsyncAdminClient(admin_conninfo, min_size=1) as admin, \
                AsyncAuditorClient(auditor_conninfo, min_size=1) as auditor:
            async with admin.transaction() as a:
                assert await a.node_role() is NodeRole.PRIMARY
                assert await a.seal_audit_log() >= 0
                assert all(k.key_id > 0 for k in await a.key_usage_summary())
            async with auditor.transaction() as s:
                assert (await s.verify_audit_chain()).ok
                assert await s.accounting_of_disclosures(uuid.uuid4()) == []
                assert (await s.audit_seal_status()).waiting_rows is not None

    asyncio.run(scenario())
