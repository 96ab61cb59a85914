"""The client against a real cluster, as app_user."""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import LiteralString
from uuid import UUID

import psycopg
import pytest
from psycopg.rows import TupleRow
from psycopg_pool import ConnectionPool

from vetassist_client import (
    AuthenticationRefused,
    CrisisNotice,
    DuplicateSession,
    InvalidArgument,
    MalformedInput,
    MalformedTime,
    NotFound,
    PermissionDenied,
    Request,
    SessionStatus,
    TokenExpired,
    VetAssistClient,
    VetAssistError,
    translated_errors,
)

Conn = psycopg.Connection[TupleRow]


def later(**delta: float) -> datetime:
    return datetime.now(UTC) + timedelta(**delta)


def sign_in(client: VetAssistClient, icn: str) -> UUID:
    with client.request() as r:
        return r.upsert_va_user(icn, "veteran", "pat.doe@example.org", "Pat", "Doe")


def new_session(client: VetAssistClient, user_id: UUID) -> str:
    jwt_id = f"jwt-{uuid.uuid4()}"
    with client.request(actor_user_id=user_id) as r:
        r.create_session(user_id, jwt_id, later(hours=1))
    return jwt_id


@translated_errors()
def raw(conn: Conn, query: LiteralString) -> list[TupleRow]:
    """A query outside the wrapped API, translated by the decorator form."""
    return conn.execute(query).fetchall()


def test_sign_in_stores_tokens_and_decrypts_the_profile(client: VetAssistClient, icn: str) -> None:
    with client.request(client_ip="203.0.113.9") as r:
        uid = r.upsert_va_user(f" {icn.lower()} ", "veteran", "pat.doe@example.org", "Pat", "Doe")
        assert r.store_va_tokens(uid, "access-1", "refresh-1", later(hours=1), "openid profile") == 1
    with client.request(actor_user_id=uid) as r:
        assert r.upsert_va_user(icn, None, None, None, None) == uid  # the ICN is normalized
        assert r.find_user_by_icn(icn) == uid
        assert uid in r.find_users_by_email("pat.doe@example.org")
        assert r.va_access_token(uid) == "access-1"
        assert r.va_refresh_token(uid) == "refresh-1"
        # A refresh without a new refresh token keeps the stored one.
        assert r.store_va_tokens(uid, "access-2", None, later(minutes=3), None) == 2
        assert r.va_access_token(uid) == "access-2"
        assert r.va_refresh_token(uid) == "refresh-1"
        assert uid in r.va_tokens_due(timedelta(minutes=5))
        assert uid not in r.va_tokens_due(timedelta(0))
        profile = r.user_profile(uid)
    assert profile is not None
    assert (profile.id, profile.va_icn, profile.veteran_status) == (uid, icn, "veteran")
    assert (profile.email, profile.first_name, profile.last_name) == ("pat.doe@example.org", "Pat", "Doe")
    assert profile.is_active and not profile.mfa_enabled
    assert profile.last_login_at is not None and profile.created_at <= profile.last_login_at
    assert icn not in repr(profile) and "Pat" not in repr(profile)
    with client.request() as r:
        assert r.find_user_by_icn("10999999999V999999") is None
        assert r.delete_va_tokens(uid) is True
        assert r.delete_va_tokens(uid) is False
        assert r.va_access_token(uid) is None
        assert r.va_refresh_token(uid) is None


def test_sqlstates_map_to_exception_classes(client: VetAssistClient, su: Conn, icn: str) -> None:
    uid = sign_in(client, icn)
    with pytest.raises(InvalidArgument) as bad, client.request() as r:
        r.upsert_va_user("", None, None, None, None)
    assert bad.value.sqlstate == "22023"
    assert isinstance(bad.value.__cause__, psycopg.errors.InvalidParameterValue)

    with pytest.raises(NotFound) as missing, client.request() as r:
        r.user_profile(uuid.uuid4())
    assert missing.value.sqlstate == "P0002"
    with pytest.raises(NotFound), client.request() as r:
        r.touch_session("no-such-jwt")

    with client.request() as r:
        r.store_va_tokens(uid, "access", "refresh", later(hours=1), None)
    su.execute("UPDATE vetassist_auth.va_tokens SET expires_at = now() - interval '1 minute' WHERE user_id = %s",
               (uid,))
    with pytest.raises(TokenExpired) as expired, client.request() as r:
        r.va_access_token(uid)
    assert expired.value.sqlstate == "VA001"
    assert str(expired.value) == "vetassist_auth: the VA access token has expired"
    with client.request() as r:
        assert r.va_refresh_token(uid) == "refresh"
        assert uid in r.va_tokens_due(timedelta(0))

    jwt_id = new_session(client, uid)
    with pytest.raises(DuplicateSession) as dup, client.request() as r:
        r.create_session(uid, jwt_id, later(hours=1))
    assert dup.value.sqlstate == "23505"

    with pytest.raises(PermissionDenied) as denied, client.request() as r:
        r.connection.execute("SELECT * FROM vetassist_auth.va_tokens")
    assert denied.value.sqlstate == "42501"
    assert isinstance(denied.value.__cause__, psycopg.errors.InsufficientPrivilege)


def test_translated_errors_works_as_a_decorator(app_conninfo: str) -> None:
    with psycopg.connect(app_conninfo) as conn:
        with pytest.raises(PermissionDenied) as denied:
            raw(conn, "SELECT * FROM vetassist_auth.users")
    assert "permission denied for table users" in str(denied.value)
    with psycopg.connect(app_conninfo) as conn:
        with pytest.raises(VetAssistError) as other:
            raw(conn, "SELECT 1/0")
    assert type(other.value) is VetAssistError and other.value.sqlstate == "22012"
    with psycopg.connect(app_conninfo) as conn:
        with pytest.raises(MalformedTime) as bad_time:
            raw(conn, "SELECT 'half past secret'::timestamptz")
    assert (str(bad_time.value), bad_time.value.sqlstate) == (
        "invalid input syntax for type timestamp with time zone", "22007")
    with psycopg.connect(app_conninfo) as conn, pytest.raises(MalformedInput):
        raw(conn, "SELECT 'a fortnight-ish'::interval")


def test_deactivated_account_is_refused(client: VetAssistClient, icn: str) -> None:
    uid = sign_in(client, icn)
    jwt_id = new_session(client, uid)
    with client.request() as r:
        r.store_va_tokens(uid, "access", "refresh", later(hours=1), None)
        r.deactivate_user(uid, "requested by the veteran")
        profile = r.user_profile(uid)
        assert r.touch_session(jwt_id) is SessionStatus.TERMINATED
    assert profile is not None and not profile.is_active
    # Reads check the account too: no token of a deactivated account is handed out.
    with pytest.raises(AuthenticationRefused), client.request() as r:
        r.va_access_token(uid)
    with pytest.raises(AuthenticationRefused) as refused, client.request() as r:
        r.upsert_va_user(icn, None, None, None, None)
    assert refused.value.sqlstate == "28000"
    with pytest.raises(AuthenticationRefused), client.request() as r:
        r.store_va_tokens(uid, "access", None, later(hours=1), None)


def test_messages_never_carry_secret_or_phi_arguments(client: VetAssistClient, icn: str) -> None:
    uid = sign_in(client, icn)
    jwt_id = new_session(client, uid)
    secret = {
        "access": "eyJ-secret-access-token",
        "email": "secret-mailbox-without-at-sign",
        "ip": "secret-not-an-ip",
        "fingerprint": "f" * 2000,
        "icn": "SECRET-ICN-with-dashes",
    }
    calls: list[Callable[[Request], object]] = [
        lambda r: r.store_va_tokens(uid, secret["access"], None, later(hours=-1), None),
        lambda r: r.upsert_va_user(icn, None, secret["email"], None, None),
        lambda r: r.upsert_va_user(secret["icn"], None, None, None, None),
        lambda r: r.create_session(uid, f"jwt-{uuid.uuid4()}", later(hours=1),
                                   device_fingerprint=secret["fingerprint"]),
        lambda r: r.create_session(uid, jwt_id, later(hours=1)),
    ]
    for call in calls:
        with pytest.raises(VetAssistError) as caught, client.request() as r:
            call(r)
        assert isinstance(caught.value, (InvalidArgument, DuplicateSession))
        text = f"{caught.value} {caught.value.args!r}"
        assert not any(s in text for s in secret.values()), text
        assert jwt_id not in text and icn not in text, text

    # PostgreSQL's own input errors quote the value: with the library preloaded the server masks
    # it in the report itself, and the client's translated message drops it in any case.
    with pytest.raises(InvalidArgument) as bad_ip, client.request() as r:
        r.create_session(uid, f"jwt-{uuid.uuid4()}", later(hours=1), ip=secret["ip"])
    assert "invalid input syntax for type inet" in str(bad_ip.value.__cause__)
    assert secret["ip"] not in str(bad_ip.value.__cause__)
    assert (str(bad_ip.value), bad_ip.value.sqlstate) == ("invalid input syntax for type inet", "22P02")


def test_actor_is_attributed_for_its_transaction_only(app_conninfo: str, su: Conn, icn: str) -> None:
    # One pooled connection, so the second request reuses the first one's backend.
    with VetAssistClient.from_pool(ConnectionPool(app_conninfo, min_size=1, max_size=1, open=True)) as client:
        uid = sign_in(client, icn)
        with client.request(actor_user_id=uid, client_ip="198.51.100.23") as r:
            attributed = r.audit_event("phi", "document_viewed", "success", {"document": "claim-summary"})
        with client.request() as r:
            anonymous = r.audit_event("phi", "document_viewed", "info", {})
        with pytest.raises(InvalidArgument), client.request() as r:
            r.audit_event("phi", "document_viewed", "maybe", {})
    rows = dict(
        (row[0], row[1:]) for row in su.execute(
            "SELECT id, actor_user_id, subject_user_id, ip_hash IS NOT NULL, details, db_role"
            " FROM vetassist_auth.audit_log WHERE id = ANY(%s)", ([attributed, anonymous],)))
    assert rows[attributed] == (uid, uid, True, {"document": "claim-summary"}, "app_user")
    assert rows[anonymous] == (None, None, False, {}, "app_user")


def test_request_rolls_back_when_the_block_raises(client: VetAssistClient, icn: str) -> None:
    with pytest.raises(RuntimeError), client.request() as r:
        r.upsert_va_user(icn, "veteran", None, None, None)
        raise RuntimeError("handler failed")
    with pytest.raises(InvalidArgument), client.request() as r:
        r.upsert_va_user(icn, "veteran", None, None, None)
        r.audit_event("", "x", "info", {})
    with client.request() as r:
        assert r.find_user_by_icn(icn) is None


def test_a_disclosure_in_a_request_that_raises_stays_on_record(client: VetAssistClient, su: Conn, icn: str) -> None:
    """The rollback of a failed request undoes its writes, never the record of what it disclosed."""
    with client.request() as r:
        uid = r.upsert_va_user(icn, "veteran", "rollback@example.org", None, None)
    with pytest.raises(RuntimeError), client.request(actor_user_id=uid) as r:
        profile = r.user_profile(uid)
        assert profile is not None and profile.email == "rollback@example.org"
        raise RuntimeError("the page failed to render")
    recorded = su.execute("SELECT count(*) FROM vetassist_auth.audit_log WHERE subject_user_id = %s"
                          " AND event_type = 'user_profile_read' AND actor_user_id = %s", (uid, uid)).fetchone()
    assert recorded == (1,)


def test_session_lifecycle(client: VetAssistClient, su: Conn, icn: str) -> None:
    uid = sign_in(client, icn)
    jwt_id = f"jwt-{uuid.uuid4()}"
    with client.request(actor_user_id=uid, client_ip="192.0.2.10") as r:
        sid = r.create_session(uid, jwt_id, later(hours=8), ip="192.0.2.10", user_agent="pytest/8",
                               device_fingerprint="fp-1", device_info={"os": "linux", "mobile": False})
        assert r.touch_session(jwt_id) is SessionStatus.ACTIVE
        assert r.session_status(jwt_id) is SessionStatus.ACTIVE
        assert r.rotate_session_refresh_token(jwt_id, None, "app-refresh-1") == 1
        assert r.rotate_session_refresh_token(jwt_id, "app-refresh-1", "app-refresh-2") == 2
        # A second tab presenting the token just replaced, within the grace, gets the same successor.
        assert r.refresh_session_token(jwt_id, "app-refresh-1", "tab-2-refresh") == (2, "app-refresh-2")
    stored = su.execute("SELECT user_id, ip_hash IS NOT NULL, device_fingerprint_hash IS NOT NULL, device_info"
                        " FROM vetassist_auth.sessions WHERE id = %s", (sid,)).fetchone()
    assert stored == (uid, True, True, {"os": "linux", "mobile": False})

    su.execute("UPDATE vetassist_auth.sessions SET refresh_rotated_at = refresh_rotated_at - interval '1 minute'"
               " WHERE jwt_id = %s", (jwt_id,))
    with client.request() as r:  # past the grace, a stale refresh token ends the session
        assert r.rotate_session_refresh_token(jwt_id, "app-refresh-1", "app-refresh-3") is None
        assert r.session_status(jwt_id) is SessionStatus.TERMINATED
    with pytest.raises(AuthenticationRefused), client.request() as r:
        r.rotate_session_refresh_token(jwt_id, "app-refresh-2", "app-refresh-3")

    locked, ended, idle, other = (new_session(client, uid) for _ in range(4))
    su.execute("UPDATE vetassist_auth.sessions SET live_until = now() - interval '1 second' WHERE jwt_id = %s",
               (idle,))
    with client.request(actor_user_id=uid) as r:
        assert r.lock_session(locked, "suspicious activity") is True
        assert r.lock_session(locked, "again") is False
        assert r.touch_session(locked) is SessionStatus.LOCKED
        assert r.end_session(ended) is True
        assert r.end_session(ended) is False
        assert r.touch_session(ended) is SessionStatus.TERMINATED
        assert r.session_status(idle) is SessionStatus.EXPIRED
        assert r.touch_session(idle) is SessionStatus.EXPIRED
        assert r.end_user_sessions(uid, "password reset") == 1
        assert r.session_status(other) is SessionStatus.TERMINATED
    reasons: dict[str, str] = dict(su.execute(
        "SELECT jwt_id, end_reason FROM vetassist_auth.sessions WHERE jwt_id = ANY(%s)",
        ([locked, ended, idle, other],)).fetchall())
    assert reasons == {locked: "suspicious activity", ended: "logout", idle: "idle_timeout", other: "password reset"}


def test_crisis_event_is_notified_after_commit(client: VetAssistClient, su: Conn, icn: str) -> None:
    uid = sign_in(client, icn)
    jwt_id = new_session(client, uid)
    received: list[CrisisNotice] = []

    def listen() -> None:
        for notice in client.listen_crisis(timeout=15):
            received.append(notice)
            return

    listener = threading.Thread(target=listen)
    listener.start()
    deadline = time.monotonic() + 10
    # Idle after its LISTEN: the LISTEN has committed (a listener registers at commit; while the
    # statement is still active a notification sent now would be missed).
    while not su.execute("SELECT 1 FROM pg_stat_activity WHERE usename = 'app_user'"
                         " AND query = 'LISTEN vetassist_auth_crisis' AND state = 'idle'").fetchall():
        assert time.monotonic() < deadline, "the listener did not start"
        time.sleep(0.02)

    sid = su.execute("SELECT id FROM vetassist_auth.sessions WHERE jwt_id = %s", (jwt_id,)).fetchone()
    assert sid is not None
    # Any role may NOTIFY on the channel: forged payloads (no mac, a made-up mac, a mac copied
    # onto another event) never reach the responder.
    for forged in ({"session_id": str(sid[0]), "event_id": 424242},
                   {"session_id": str(sid[0]), "event_id": 424242, "mac": "00" * 36}):
        su.execute("SELECT pg_notify('vetassist_auth_crisis', %s)", (json.dumps(forged),))
    su.execute("SELECT pg_notify('vetassist_auth_crisis', 'not json')")
    with client.request(actor_user_id=uid) as r:
        r.log_session_event(jwt_id, "login_anomaly", "warning", {"reason": "new device"})
        event_id = r.log_session_event(jwt_id, "crisis_language_detected", "crisis", {"score": 0.97})
        time.sleep(0.2)
        assert not received, "notified before commit"
    listener.join(timeout=15)
    assert not listener.is_alive()
    assert sid is not None
    assert received == [CrisisNotice(session_id=sid[0], event_id=event_id)]
