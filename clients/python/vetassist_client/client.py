"""A psycopg 3 client for the vetassist_auth SQL API, one transaction per application request."""

from __future__ import annotations

import enum
import json
import logging
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from types import TracebackType
from typing import Any, LiteralString, Self, cast
from uuid import UUID

import psycopg
from psycopg.rows import TupleRow, class_row
from psycopg.types.json import Jsonb
from psycopg_pool import ConnectionPool

from .errors import translated_errors

log = logging.getLogger("vetassist_client")


class SessionStatus(enum.Enum):
    ACTIVE = "ACTIVE"
    IDLE = "IDLE"
    EXPIRED = "EXPIRED"
    TERMINATED = "TERMINATED"
    LOCKED = "LOCKED"


@dataclass(frozen=True, slots=True)
class Profile:
    """A decrypted user profile. PHI fields are left out of ``repr`` so it can be logged."""

    id: UUID
    va_icn: str = field(repr=False)
    veteran_status: str | None
    email: str | None = field(repr=False)
    first_name: str | None = field(repr=False)
    last_name: str | None = field(repr=False)
    is_active: bool
    mfa_enabled: bool
    created_at: datetime
    last_login_at: datetime | None


@dataclass(frozen=True, slots=True)
class CrisisNotice:
    """A NOTIFY on vetassist_auth_crisis: ids only; an auditor reads the event with
    vetassist_auth.crisis_events(since)."""

    session_id: UUID
    event_id: int


@dataclass(frozen=True, slots=True)
class Disclosure:
    """An access to or disclosure of the signed-in veteran's PHI, as my_disclosures shows it.

    ``recipient`` and ``purpose`` are None for accesses that are not disclosures (the extension's
    own reads, the application's audit_event rows of category phi). ``accountable``: 45 CFR
    164.528 requires it in an accounting (exempt purposes such as treatment do not).
    ``recorded_by``: extension or application. Recipient and description are left out of
    ``repr`` so it can be logged.
    """

    occurred_at: datetime
    actor_user_id: UUID | None
    recipient: str | None = field(repr=False)
    description: str | None = field(repr=False)
    purpose: str | None
    accountable: bool
    recorded_by: str


class Request:
    """The vetassist_auth calls of one application request, all in its transaction."""

    def __init__(self, conn: psycopg.Connection[TupleRow]) -> None:
        self._conn = conn

    @property
    def connection(self) -> psycopg.Connection[TupleRow]:
        """The request's connection, for the application's own queries in the same transaction."""
        return self._conn

    def _rows(self, query: LiteralString, params: Sequence[Any]) -> list[TupleRow]:
        with translated_errors():
            return self._conn.execute(query, params).fetchall()

    def _value(self, query: LiteralString, params: Sequence[Any]) -> Any:
        return self._rows(query, params)[0][0]

    # Identity

    def upsert_va_user(self, va_icn: str, veteran_status: str | None, email: str | None,
                       first_name: str | None, last_name: str | None) -> UUID:
        """After VA.gov sign-in: creates or updates the account keyed by the ICN."""
        uid = self._value("SELECT vetassist_auth.upsert_va_user(%s, %s, %s, %s, %s)",
                          (va_icn, veteran_status, email, first_name, last_name))
        return cast(UUID, uid)

    def find_user_by_icn(self, icn: str) -> UUID | None:
        return cast("UUID | None", self._value("SELECT vetassist_auth.find_user_by_icn(%s)", (icn,)))

    def find_users_by_email(self, email: str) -> list[UUID]:
        rows = self._rows("SELECT * FROM vetassist_auth.find_users_by_email(%s)", (email,))
        return [row[0] for row in rows]

    def user_profile(self, user_id: UUID) -> Profile | None:
        """The decrypted profile (audited as PHI access); NotFound for an unknown user."""
        with translated_errors():
            cur = self._conn.cursor(row_factory=class_row(Profile))
            return cur.execute("SELECT * FROM vetassist_auth.user_profile(%s)", (user_id,)).fetchone()

    def deactivate_user(self, user_id: UUID, reason: str) -> None:
        """Deactivates the account, ends its sessions and deletes its VA tokens."""
        self._rows("SELECT vetassist_auth.deactivate_user(%s, %s)", (user_id, reason))

    # VA tokens

    def store_va_tokens(self, user_id: UUID, access_token: str, refresh_token: str | None,
                        expires_at: datetime, scope: str | None) -> int:
        """Stores or refreshes the VA.gov tokens, encrypted; returns the token generation.

        A refresh_token of None keeps the stored one.
        """
        generation = self._value("SELECT vetassist_auth.store_va_tokens(%s, %s, %s, %s, %s)",
                                 (user_id, access_token, refresh_token, expires_at, scope))
        return cast(int, generation)

    def va_access_token(self, user_id: UUID) -> str | None:
        """The VA access token, None if none is stored; TokenExpired once it has expired."""
        return cast("str | None", self._value("SELECT vetassist_auth.va_access_token(%s)", (user_id,)))

    def va_refresh_token(self, user_id: UUID) -> str | None:
        return cast("str | None", self._value("SELECT vetassist_auth.va_refresh_token(%s)", (user_id,)))

    def va_tokens_due(self, within: timedelta) -> list[UUID]:
        """Users whose access token expires within ``within`` and who have a refresh token."""
        rows = self._rows("SELECT * FROM vetassist_auth.va_tokens_due(%s)", (within,))
        return [row[0] for row in rows]

    def delete_va_tokens(self, user_id: UUID) -> bool:
        """Deletes the user's VA tokens; False if there were none."""
        return cast(bool, self._value("SELECT vetassist_auth.delete_va_tokens(%s)", (user_id,)))

    # Sessions

    def create_session(self, user_id: UUID, jwt_id: str, expires_at: datetime, ip: str | None = None,
                       user_agent: str | None = None, device_fingerprint: str | None = None,
                       device_info: dict[str, Any] | None = None) -> UUID:
        """Starts a session; IP and device fingerprint are stored only as keyed hashes."""
        sid = self._value("SELECT vetassist_auth.create_session(%s, %s, %s, %s::inet, %s, %s, %s)",
                          (user_id, jwt_id, expires_at, ip, user_agent, device_fingerprint,
                           None if device_info is None else Jsonb(device_info)))
        return cast(UUID, sid)

    def touch_session(self, jwt_id: str) -> SessionStatus:
        """Validates the session and records activity; call it on every API request."""
        return SessionStatus(self._value("SELECT vetassist_auth.touch_session(%s)::text", (jwt_id,)))

    def session_status(self, jwt_id: str) -> SessionStatus:
        """The status without recording activity (IDLE: the idle time-out is near)."""
        # ::text: with an untyped argument, session_status(...) would be a cast to the enum type.
        status = self._value("SELECT vetassist_auth.session_status(%s::text)::text", (jwt_id,))
        return SessionStatus(status)

    def end_session(self, jwt_id: str, reason: str = "logout") -> bool:
        """Ends the session; False if it had already ended."""
        return cast(bool, self._value("SELECT vetassist_auth.end_session(%s, %s)", (jwt_id, reason)))

    def end_user_sessions(self, user_id: UUID, reason: str) -> int:
        """Ends every live session of the user; returns how many."""
        return cast(int, self._value("SELECT vetassist_auth.end_user_sessions(%s, %s)", (user_id, reason)))

    def lock_session(self, jwt_id: str, reason: str) -> bool:
        """Locks the session for good; False if it had already ended."""
        return cast(bool, self._value("SELECT vetassist_auth.lock_session(%s, %s)", (jwt_id, reason)))

    def rotate_session_refresh_token(self, jwt_id: str, presented: str | None, replacement: str) -> int | None:
        """The new refresh generation, or None: a stale token was presented and the session ended."""
        generation = self._value("SELECT vetassist_auth.rotate_session_refresh_token(%s, %s, %s)",
                                 (jwt_id, presented, replacement))
        return cast("int | None", generation)

    def refresh_session_token(self, jwt_id: str, presented: str | None,
                              replacement: str) -> tuple[int, str] | None:
        """(generation, current refresh token), or None: a stale token was presented and the session ended.

        Within vetassist_auth.refresh_reuse_grace of a rotation, the token just replaced returns the
        successor already issued (two tabs refreshing at once), not ``replacement``.
        """
        generation, token = self._rows("SELECT * FROM vetassist_auth.refresh_session_token(%s, %s, %s)",
                                       (jwt_id, presented, replacement))[0]
        return None if generation is None else (int(generation), str(token))

    def log_session_event(self, jwt_id: str, event_type: str, severity: str, details: dict[str, Any]) -> int:
        """Records an event (severity info, warning, critical or crisis); crisis also NOTIFYs on commit."""
        event_id = self._value("SELECT vetassist_auth.log_session_event(%s, %s, %s, %s)",
                               (jwt_id, event_type, severity, Jsonb(details)))
        return cast(int, event_id)

    # Audit

    def audit_event(self, category: str, event_type: str, outcome: str, details: dict[str, Any],
                    subject_user_id: UUID | None = None) -> int:
        """Writes an application audit event (outcome success, failure, denied or info).

        ``subject_user_id``: the veteran the event is about (not given: the request's actor, as on
        a veteran's own page). Events of category phi about a veteran appear in their
        my_disclosures and phi_disclosures.
        """
        if subject_user_id is None:
            audit_id = self._value("SELECT vetassist_auth.audit_event(%s, %s, %s, %s)",
                                   (category, event_type, outcome, Jsonb(details)))
        else:
            audit_id = self._value("SELECT vetassist_auth.audit_event(%s, %s, %s, %s, %s)",
                                   (category, event_type, outcome, Jsonb(details), subject_user_id))
        return cast(int, audit_id)

    # Disclosures (45 CFR 164.528)

    def record_disclosure(self, subject_user_id: UUID, recipient: str, description: str, purpose: str,
                          details: dict[str, Any] | None = None) -> int:
        """Records a disclosure of the veteran's PHI to ``recipient``; returns its audit row id.

        Committed before it returns: a rollback of the request does not take it back.
        ``description`` says briefly what was disclosed (recipient and description: 1 to 1000
        characters); ``details`` (a JSON object) is kept with it, outside the accounting.

        ``purpose``: exempt from the accounting (treatment, payment, health_care_operations,
        to_individual, incidental, authorized, directory_or_involved, national_security,
        correctional_custody, limited_data_set) or accountable (required_by_law, public_health,
        abuse_neglect, health_oversight, judicial_administrative, law_enforcement, decedents,
        organ_donation, research_waiver, serious_threat, specialized_government,
        workers_compensation, impermissible); anything else is InvalidArgument.
        """
        if details is None:
            disclosure_id = self._value("SELECT vetassist_auth.record_disclosure(%s, %s, %s, %s)",
                                        (subject_user_id, recipient, description, purpose))
        else:
            disclosure_id = self._value("SELECT vetassist_auth.record_disclosure(%s, %s, %s, %s, %s)",
                                        (subject_user_id, recipient, description, purpose, Jsonb(details)))
        return cast(int, disclosure_id)

    def my_disclosures(self, jwt_id: str, since: datetime | None = None) -> list[Disclosure]:
        """Every access to and disclosure of the session's veteran's PHI, exempt ones included, since
        ``since`` (None: six years back), oldest first; for the veteran's own page. The read is
        audited as theirs. AuthenticationRefused unless the session is live and MFA-verified.
        """
        with translated_errors():
            cur = self._conn.cursor(row_factory=class_row(Disclosure))
            if since is None:
                cur.execute("SELECT occurred_at, actor_user_id, recipient, description, purpose, accountable,"
                            " recorded_by FROM vetassist_auth.my_disclosures(%s)", (jwt_id,))
            else:
                cur.execute("SELECT occurred_at, actor_user_id, recipient, description, purpose, accountable,"
                            " recorded_by FROM vetassist_auth.my_disclosures(%s, %s)", (jwt_id, since))
            return cur.fetchall()


class VetAssistClient:
    """Owns a connection pool; ``request()`` runs one application request in one transaction."""

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
    def request(self, actor_user_id: UUID | None = None, client_ip: str | None = None) -> Iterator[Request]:
        """A pooled connection in a transaction naming the actor for audit rows.

        Commits when the block ends normally, rolls back when it raises. Any failed call aborts
        the transaction, so handle VetAssistError outside the block.
        """
        with translated_errors(), self._pool.connection() as conn, conn.transaction():
            # The actor lasts for this transaction only; without one there is nothing to set.
            if actor_user_id is not None or client_ip is not None:
                conn.execute("SELECT vetassist_auth.set_actor(%s, %s)", (actor_user_id, client_ip))
            yield Request(conn)

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
                verified = checker.execute("SELECT vetassist_auth.verify_crisis_notice(%s)", (notify.payload,)).fetchone()
                if not (verified and verified[0]):
                    log.warning("dropped a forged vetassist_auth_crisis notification from backend %s", notify.pid)
                    continue
                payload = json.loads(notify.payload)
                yield CrisisNotice(UUID(payload["session_id"]), int(payload["event_id"]))
