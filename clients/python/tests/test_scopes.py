"""One call per request (authenticated), the application's remaining calls, and the admin and
auditor scopes, through real SQL as app_user, admin_user and auditor_user."""

from __future__ import annotations

import logging
import uuid
from datetime import UTC, datetime, timedelta
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import TupleRow
from vetassist_testing import authenticator_code, wait_for  # on sys.path through conftest.py

from vetassist_client import (
    AccountingEntry,
    AdminClient,
    AuditorClient,
    Authentication,
    ChainHead,
    CiphertextInvalid,
    CrisisEvent,
    InvalidArgument,
    KeyNotConfigured,
    MalformedInput,
    NodeRole,
    NotFound,
    NotText,
    PermissionDenied,
    PhiAccess,
    SessionEvent,
    SessionStatus,
    TrustedDevice,
    VetAssistClient,
    client_address,
)

Conn = psycopg.Connection[TupleRow]


def later(**delta: float) -> datetime:
    return datetime.now(UTC) + timedelta(**delta)


def signed_in(client: VetAssistClient, icn: str, device: str = "laptop") -> tuple[UUID, str, UUID]:
    """A veteran with a session on ``device``: (user id, jwt_id, session id)."""
    jwt_id = f"jwt-{uuid.uuid4()}"
    with client.request() as r:
        uid = r.upsert_va_user(icn, "veteran", "casey.doe@example.org", "Casey", "Doe")
        r.set_actor(uid)
        sid = r.create_session(uid, jwt_id, later(hours=2), device_fingerprint=device)
    return uid, jwt_id, sid


def audit_row(su: Conn, audit_id: int) -> tuple[object, ...] | None:
    return su.execute("SELECT actor_user_id, subject_user_id, session_id, ip_hash IS NOT NULL, db_role"
                      " FROM vetassist_auth.audit_log WHERE id = %s", (audit_id,)).fetchone()


def test_authenticated_names_user_session_and_address_on_the_audit_rows(
        client: VetAssistClient, su: Conn, icn: str) -> None:
    uid, jwt_id, sid = signed_in(client, icn)
    before = datetime.now(UTC)
    with client.authenticated(jwt_id, "203.0.113.7") as r:
        auth = r.authentication
        audit_id = r.audit_event("phi", "chart_viewed", "success", {"chart": 17}, subject_user_id=uid)
    assert (auth.status, auth.reason, auth.user_id, auth.session_id, auth.mfa_required) == (
        SessionStatus.ACTIVE, None, uid, sid, False)
    assert auth.active
    assert auth.idle_expires_at is not None and auth.absolute_expires_at is not None
    assert before < auth.idle_expires_at <= auth.absolute_expires_at <= later(hours=2)
    assert audit_row(su, audit_id) == (uid, uid, sid, True, "app_user")


def test_authenticated_refuses_unknown_ended_and_idle_sessions_and_commits_what_it_found(
        client: VetAssistClient, su: Conn, icn: str) -> None:
    uid, jwt_id, _ = signed_in(client, icn)
    with client.authenticated("no-such-jwt") as r:
        unknown = r.authentication
        anonymous = r.audit_event("app", "page_viewed", "info")
    assert unknown == Authentication(None, "unknown", None, None, None, None, None)
    assert not unknown.active
    assert audit_row(su, anonymous) == (None, None, None, False, "app_user")  # authenticate set nothing

    su.execute("UPDATE vetassist_auth.sessions SET live_until = now() - interval '1 second' WHERE jwt_id = %s",
               (jwt_id,))
    with client.authenticated(jwt_id) as r:
        idle = r.authentication
    assert (idle.status, idle.reason, idle.user_id) == (SessionStatus.EXPIRED, "idle_timeout", None)
    # The block ended normally: the session authenticate ended stays ended.
    assert su.execute("SELECT status::text, end_reason FROM vetassist_auth.sessions WHERE jwt_id = %s",
                      (jwt_id,)).fetchone() == ("EXPIRED", "idle_timeout")

    _, other, _ = signed_in(client, icn)
    with client.request(actor_user_id=uid) as r:
        assert r.end_session(other) is True
    with client.authenticated(other) as r:
        assert (r.authentication.status, r.authentication.reason) == (SessionStatus.TERMINATED, "logout")


def test_authenticated_rolls_back_when_the_block_raises(client: VetAssistClient, su: Conn, icn: str) -> None:
    _, jwt_id, _ = signed_in(client, icn)
    with pytest.raises(RuntimeError), client.authenticated(jwt_id) as r:
        written = r.audit_event("app", "page_viewed", "info")
        raise RuntimeError("the handler failed")
    assert audit_row(su, written) is None
    with client.request() as r, pytest.raises(RuntimeError, match="authenticated"):
        r.authentication  # noqa: B018 - the property raises


def test_a_client_ip_that_is_not_an_address_is_null_with_a_warning(
        client: VetAssistClient, su: Conn, icn: str, caplog: pytest.LogCaptureFixture) -> None:
    uid, jwt_id, sid = signed_in(client, icn)
    with caplog.at_level(logging.WARNING, logger="vetassist_client"):
        with client.authenticated(jwt_id, "testclient") as r:
            assert r.authentication.active
            unaddressed = r.audit_event("app", "page_viewed", "info")
        with client.request(actor_user_id=uid, client_ip="secret-not-an-ip") as r:
            r.audit_event("app", "page_viewed", "info")
    warnings = [rec.getMessage() for rec in caplog.records if rec.name == "vetassist_client"]
    assert len(warnings) == 2 and all("not an IP address" in w for w in warnings)
    assert not any("testclient" in w or "secret" in w for w in warnings)
    assert audit_row(su, unaddressed) == (uid, uid, sid, False, "app_user")
    with client.authenticated(jwt_id, "2001:db8::1") as r:
        addressed = r.audit_event("app", "page_viewed", "info")
    assert audit_row(su, addressed) == (uid, uid, sid, True, "app_user")


def test_an_ipv6_zone_is_dropped_never_failing_the_request(
        client: VetAssistClient, su: Conn, icn: str, caplog: pytest.LogCaptureFixture) -> None:
    # A link-local peer as the ASGI server reports it: PostgreSQL's inet has no zone index.
    uid, jwt_id, sid = signed_in(client, icn)
    assert client_address("fe80::1%eth0") == "fe80::1"
    assert client_address("fe80::1%") == "fe80::1"
    with caplog.at_level(logging.WARNING, logger="vetassist_client"):
        assert client_address("%eth0") is None and client_address("not-an-ip%eth0") is None
    with client.authenticated(jwt_id, "fe80::1%eth0") as r:
        assert r.authentication.active
        zoned = r.audit_event("app", "page_viewed", "info")
    with client.request(actor_user_id=uid, client_ip="fe80::1%25") as r:
        r.audit_event("app", "page_viewed", "info")
    with client.authenticated(jwt_id, "fe80::1") as r:
        bare = r.audit_event("app", "page_viewed", "info")
    assert audit_row(su, zoned) == (uid, uid, sid, True, "app_user")
    hashes = su.execute("SELECT id, ip_hash FROM vetassist_auth.audit_log WHERE id = ANY(%s)",
                        ([zoned, bare],)).fetchall()
    assert len({ip_hash for _, ip_hash in hashes}) == 1


def test_primitives_mfa_and_the_rest_of_the_app_calls(client: VetAssistClient, icn: str) -> None:
    uid, jwt_id, _ = signed_in(client, icn)
    with client.request(actor_user_id=uid) as r:
        sealed = r.encrypt(b"note \x00 bytes", "notes:42")
        assert r.decrypt(sealed, "notes:42") == b"note \x00 bytes"
        assert r.decrypt_text(r.encrypt_text("note", "notes:43"), "notes:43") == "note"
        assert r.field_hash(" Casey.Doe@Example.org ", "email") == r.field_hash("casey.doe@example.org", "email")
        assert r.field_hash("casey.doe@example.org", "email") in r.field_hashes("casey.doe@example.org", "email")
        assert r.node_role() is NodeRole.PRIMARY
        assert {p.purpose for p in r.disclosure_purposes() if p.accountable} >= {"public_health", "law_enforcement"}
        assert r.expire_sessions(100) >= 0
        assert r.mfa_required(jwt_id) is False
        assert r.verify_crisis_notice('{"session_id": "00000000-0000-0000-0000-000000000000", "event_id": 1}') is False
    with pytest.raises(NotText) as not_text, client.request() as r:
        r.decrypt_text(sealed, "notes:42")
    assert not_text.value.sqlstate == "22021"
    with pytest.raises(CiphertextInvalid), client.request() as r:
        r.decrypt(sealed, "notes:41")
    with pytest.raises(MalformedInput) as malformed, client.request() as r:
        r.create_session(uid, f"jwt-{uuid.uuid4()}", later(hours=1), ip="not-an-ip")
    assert isinstance(malformed.value, InvalidArgument) and malformed.value.sqlstate == "22P02"

    with client.authenticated(jwt_id) as r:
        uri = r.mfa_enroll_totp(uid)
        assert uri.startswith("otpauth://totp/")
        # With the session's jwt_id, the confirming code also verifies this session.
        assert r.mfa_confirm_totp(uid, authenticator_code(uri), jwt_id) is True
        assert r.mfa_required(jwt_id) is False
        codes = r.mfa_generate_backup_codes(uid, 3)
        device = r.mfa_trust_device(jwt_id, 7)
    assert len(codes) == 3 and all(isinstance(c, str) for c in codes)
    _, second, _ = signed_in(client, icn, device="phone")  # not the trusted laptop: MFA is due
    with client.authenticated(second) as r:
        assert r.authentication.mfa_required is True
        assert r.mfa_verify(second, codes[0]) is True
        devices = r.mfa_trusted_devices(uid)
        assert [d.device_id for d in devices] == [device] and isinstance(devices[0], TrustedDevice)
        assert r.mfa_revoke_device(uid, device) is True
        assert r.mfa_trusted_devices(uid) == []
        assert r.mfa_disable(uid) is True


def test_admin_scope_as_admin_user(admin_client: AdminClient, client: VetAssistClient, su: Conn, icn: str) -> None:
    uid, jwt_id, _ = signed_in(client, icn)
    with admin_client.transaction(actor_user_id=uid) as a:
        reviewed = a.audit_event("admin", "account_reviewed", "info", {"ticket": 7}, subject_user_id=uid)
        assert a.node_role() is NodeRole.PRIMARY
        assert a.end_user_sessions(uid, "password reset") == 1
        assert a.mfa_disable(uid) is False  # never enrolled
        assert a.expire_sessions() >= 0
        a.deactivate_user(uid, "closed by support")
    assert audit_row(su, reviewed) == (uid, uid, None, False, "admin_user")
    with client.authenticated(jwt_id) as r:
        assert r.authentication.status is SessionStatus.TERMINATED

    with admin_client.transaction() as a:
        # One row per key and column using it.
        (old_key,) = {k.key_id for k in a.key_usage_summary() if k.purpose == "phi" and k.status == "active"}
        new_key = a.rotate_key("phi")
        assert new_key > old_key
        assert {k.status for k in a.key_usage_summary() if k.key_id == old_key} == {"decrypt_only"}
        while a.reencrypt(1000) > 0:
            pass
        assert {k.key_id for k in a.key_usage_summary() if k.purpose == "phi"} == {new_key}
        assert any(c.table_name == "users" and c.decrypt_is_disclosure for c in a.protected_columns())
        assert all(check.check_name for check in a.verify_installation())
        assert a.veteran_placement(uid) == []  # no Citus: no shards
        assert a.seal_worker_audit_logs() == 0
        assert a.purge_audit_log("6 years") == 0
        steps = a.resync_sequences()
        assert {"phi key rotated", "token key rotated", "mfa key rotated"} <= {s.sequence_name for s in steps}
        assert a.promote()[-1].action == "promoted"
    # A call that moves nothing retires the keys nothing needs (once older snapshots have ended).
    wait_for("the old phi key retired", lambda: key_status(admin_client, old_key) == "retired")
    with admin_client.transaction() as a:
        assert a.unretire_key(old_key) is True
    wait_for("the old phi key retired again", lambda: key_status(admin_client, old_key) == "retired")
    with admin_client.transaction() as a:
        assert a.destroy_key(old_key) is True
    for refused, call in [(NotFound, lambda a: a.destroy_key(old_key)), (NotFound, lambda a: a.unretire_key(old_key)),
                          (PermissionDenied, lambda a: a.rewrap_keys('/etc/old.key')),  # reads a server file
                          (KeyNotConfigured, lambda a: a.distribute()),   # Citus is not installed
                          (InvalidArgument, lambda a: a.purge_audit_log(timedelta(days=1)))]:
        with pytest.raises(refused), admin_client.transaction() as a:
            call(a)

    table = f"notes_{uuid.uuid4().hex[:8]}"
    su.execute(f"CREATE TABLE public.{table} (id int PRIMARY KEY, body text, secret text)")
    with admin_client.transaction() as a:
        a.enable_row_audit(f"public.{table}", redact=["secret"])
    su.execute(f"INSERT INTO public.{table} VALUES (1, 'hello', 'hidden')")
    logged = su.execute("SELECT details::text FROM vetassist_auth.audit_log WHERE category = 'data'"
                        " AND target_table LIKE '%%' || %s", (table,)).fetchall()
    assert len(logged) == 1 and "hidden" not in logged[0][0]
    with admin_client.transaction() as a:
        assert a.disable_row_audit(f"public.{table}") is True


def key_status(admin_client: AdminClient, key_id: int) -> str:
    """After a reencrypt call; administrators read the keys' metadata (never their material)."""
    with admin_client.transaction() as a:
        a.reencrypt(1000)
        row = a.connection.execute("SELECT status FROM vetassist_auth.keys WHERE key_id = %s", (key_id,)).fetchone()
    assert row is not None
    return str(row[0])


def sealed_head(admin_client: AdminClient) -> ChainHead | None:
    with admin_client.transaction() as a:
        a.seal_audit_log(100000)
        return a.audit_chain_head()


def test_chain_reads_as_admin_and_auditor(admin_client: AdminClient, auditor_client: AuditorClient,
                                         su: Conn) -> None:
    head = wait_for("a sealed audit chain", lambda: sealed_head(admin_client))
    timeline, lsn = su.execute("SELECT timeline_id, pg_current_wal_lsn()::text FROM pg_control_checkpoint()").fetchone()  # type: ignore[misc]
    for scope in (admin_client, auditor_client):
        with scope.transaction() as s:
            assert s.verify_audit_chain().ok
            assert s.verify_audit_chain(head.seq, head.hash).ok
            assert s.verify_audit_chain(head.seq, head.hash, timeline, lsn).ok
            forged = s.verify_audit_chain(head.seq, bytes(32))
            assert not forged.ok and forged.problem
            status = s.audit_seal_status()
            assert status.head_seq is not None and status.head_seq >= head.seq
            (node,) = s.audit_chain_heads()
            assert node.seq is not None and node.seq >= head.seq
            assert s.verify_audit_chain_at(node.node, head.seq, head.hash).ok
            assert s.node_role() is NodeRole.PRIMARY
            assert s.protected_columns() and s.verify_installation()
    with pytest.raises(ValueError):
        with auditor_client.transaction() as s:
            s.verify_audit_chain(head.seq)


def test_auditor_scope_reads_what_the_application_recorded(
        auditor_client: AuditorClient, client: VetAssistClient, icn: str) -> None:
    uid, jwt_id, sid = signed_in(client, icn)
    start = datetime.now(UTC) - timedelta(minutes=1)
    with client.authenticated(jwt_id) as r:
        disclosed = r.record_disclosure(uid, "County public health department", "TB test result",
                                        "public_health", {"statute": "reportable disease"})
        viewed = r.audit_event("phi", "chart_viewed", "success", {}, subject_user_id=uid)
        crisis = r.log_session_event(jwt_id, "crisis_language_detected", "crisis", {"score": 0.9})
    with auditor_client.transaction() as s:
        assert {p.purpose for p in s.disclosure_purposes()} >= {"treatment", "public_health"}
        accesses = s.phi_disclosures(uid, start, later(minutes=1))
        accounting = s.accounting_of_disclosures(uid)
        crises = s.crisis_events(start)
        events = s.session_events_of(uid, start)
    by_id = {a.audit_id: a for a in accesses}
    assert isinstance(by_id[disclosed], PhiAccess) and by_id[disclosed].recipient == "County public health department"
    assert by_id[disclosed].accountable and by_id[viewed].recorded_by == "application"
    assert [e for e in accounting if e.recipient == "County public health department"] == [
        AccountingEntry(accounting[-1].disclosed_at, "County public health department", "TB test result",
                        accounting[-1].purpose)]
    assert [(c.event_id, c.user_id, c.session_id) for c in crises if c.event_id == crisis] == [(crisis, uid, sid)]
    assert isinstance(crises[0], CrisisEvent) and isinstance(events[0], SessionEvent)
    assert [e.severity for e in events if e.event_id == crisis] == ["crisis"]
    # An auditor has no application calls: the hint names the role to grant.
    with pytest.raises(PermissionDenied), auditor_client.transaction() as s:
        s.connection.execute("SELECT vetassist_auth.user_profile(%s)", (uid,))
