"""Every vetassist_auth call, written once: a function per SQL function builds its query and says
how to read the rows (a ``Call``); ``sql_call`` makes it a blocking method on a sync scope and a
coroutine method on an async one. Queries use the exact signatures of docs/api.md, by position.
"""

from __future__ import annotations

import functools
import ipaddress
import logging
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any, Generic, LiteralString, ParamSpec, Self, TypeVar, overload
from uuid import UUID

import psycopg
from psycopg import pq
from psycopg.rows import TupleRow
from psycopg.types.json import Jsonb

from .errors import RequestClosed, TransactionAborted, VetAssistError, translated_errors
from .rows import (
    AccountingEntry,
    Authentication,
    ChainHead,
    ChainVerification,
    CrisisEvent,
    Disclosure,
    DisclosurePurpose,
    InstallationCheck,
    MetricDefinition,
    MetricSample,
    KeyUsage,
    NodeChainHead,
    NodeRole,
    PhiAccess,
    Profile,
    PromoteStep,
    ProtectedColumn,
    RefreshedToken,
    ResyncStep,
    SealStatus,
    SessionEvent,
    SessionStatus,
    ShardPlacement,
    TrustedDevice,
)

log = logging.getLogger("vetassist_client")

T = TypeVar("T")
R = TypeVar("R")
P = ParamSpec("P")
Rows = list[TupleRow]


@dataclass(frozen=True, slots=True)
class Call(Generic[T]):
    """One statement and how its rows become the method's result."""

    query: LiteralString
    params: tuple[Any, ...]
    result: Callable[[Rows], T]


def _value(rows: Rows) -> Any:
    return rows[0][0]


def _column(rows: Rows) -> list[Any]:
    return [row[0] for row in rows]


def _nothing(rows: Rows) -> None:
    return None


def _all(make: Callable[..., R]) -> Callable[[Rows], list[R]]:
    return lambda rows: [make(*row) for row in rows]


def _first(make: Callable[..., R]) -> Callable[[Rows], R | None]:
    return lambda rows: make(*rows[0]) if rows else None


def _one(make: Callable[..., R]) -> Callable[[Rows], R]:
    return lambda rows: make(*rows[0])


def client_address(client_ip: str | None) -> str | None:
    """``client_ip`` if it is an IP address, else None with a warning: a proxy or test client's
    placeholder (``testclient``, ``unknown``) must not fail the request. An IPv6 zone index
    (``fe80::1%eth0``, a link-local peer), which PostgreSQL's inet does not take, is dropped
    first, as the Node client does. The warning leaves the value out: it may be anything a client
    sent."""
    if client_ip is None:
        return None
    try:
        return str(ipaddress.ip_address(client_ip.partition("%")[0]))
    except ValueError:
        log.warning("client_ip is not an IP address; the request's audit rows carry no address")
        return None


# The scopes a call runs in: one connection in one open transaction.


class _Scope:
    """Open until the client's block that made it ends (``_close``): a call after that raises
    RequestClosed, never running on a connection that went back to the pool."""

    _closed = False
    # The last call that failed in this scope's transaction, named by TransactionAborted.
    _failure: VetAssistError | None = None

    def _close(self) -> None:
        self._closed = True

    def _failed(self, exc: VetAssistError) -> None:
        self._failure = exc

    def _check_open(self) -> None:
        if self._closed:
            raise RequestClosed("vetassist_client: this request has ended (committed or rolled back);"
                                " use it only inside its block")


def check_not_aborted(scope: _Scope, status: pq.TransactionStatus) -> None:
    """At the normal end of a block: raises TransactionAborted (the caller's transaction() then
    rolls back) when a statement failed inside it. COMMIT of an aborted transaction is a
    silent ROLLBACK, so a block whose code caught the error would otherwise look committed."""
    if status != pq.TransactionStatus.INERROR:
        return
    failure = scope._failure
    cause = f" ({type(failure).__name__}, SQLSTATE {failure.sqlstate})" if failure is not None else ""
    raise TransactionAborted(
        f"vetassist_client: a statement failed in this transaction{cause} and the block went on, so"
        " nothing in it was committed: the transaction was rolled back. Catch VetAssistError"
        " outside the block, not inside it")


class SyncScope(_Scope):
    def __init__(self, conn: psycopg.Connection[TupleRow]) -> None:
        self._conn = conn

    @property
    def connection(self) -> psycopg.Connection[TupleRow]:
        """The connection, for the application's own queries in the same transaction."""
        self._check_open()
        return self._conn

    def _run(self, call: Call[T]) -> T:
        self._check_open()
        try:
            with translated_errors():
                return call.result(self._conn.execute(call.query, call.params).fetchall())
        except VetAssistError as exc:
            self._failed(exc)
            raise


class AsyncScope(_Scope):
    def __init__(self, conn: psycopg.AsyncConnection[TupleRow]) -> None:
        self._conn = conn

    @property
    def connection(self) -> psycopg.AsyncConnection[TupleRow]:
        """The connection, for the application's own queries in the same transaction."""
        self._check_open()
        return self._conn

    async def _run(self, call: Call[T]) -> T:
        self._check_open()
        try:
            with translated_errors():
                cursor = await self._conn.execute(call.query, call.params)
                return call.result(await cursor.fetchall())
        except VetAssistError as exc:
            self._failed(exc)
            raise


class sql_call(Generic[P, T]):  # noqa: N801 - used as a decorator-like attribute maker
    """A method of a scope class made from a call builder: ``Request.user_profile(uid)`` returns
    the Profile, ``AsyncRequest.user_profile(uid)`` a coroutine of it."""

    def __init__(self, build: Callable[P, Call[T]]) -> None:
        self.build = build

    @overload
    def __get__(self, scope: None, owner: type) -> Self: ...
    @overload
    def __get__(self, scope: SyncScope, owner: type) -> Callable[P, T]: ...
    @overload
    def __get__(self, scope: AsyncScope, owner: type) -> Callable[P, Coroutine[Any, Any, T]]: ...

    def __get__(self, scope: SyncScope | AsyncScope | None, owner: type) -> Any:
        if scope is None:
            return self
        build = self.build
        if isinstance(scope, AsyncScope):
            run_async = scope._run

            @functools.wraps(build)
            async def call_async(*args: P.args, **kwargs: P.kwargs) -> T:
                return await run_async(build(*args, **kwargs))
            return call_async
        run = scope._run

        @functools.wraps(build)
        def call(*args: P.args, **kwargs: P.kwargs) -> T:
            return run(build(*args, **kwargs))
        return call


# One builder per SQL function, in the order of docs/api.md's sections.

# Primitives


def encrypt(plaintext: bytes, context: str) -> Call[bytes]:
    """The envelope of ``plaintext`` under the PHI key, bound to ``context``."""
    return Call("SELECT vetassist_auth.encrypt(%s, %s)", (plaintext, context), _value)


def decrypt(ciphertext: bytes, context: str) -> Call[bytes]:
    """CiphertextInvalid for a wrong context or a modified value."""
    return Call("SELECT vetassist_auth.decrypt(%s, %s)", (ciphertext, context), _value)


def encrypt_text(plaintext: str, context: str) -> Call[bytes]:
    return Call("SELECT vetassist_auth.encrypt_text(%s, %s)", (plaintext, context), _value)


def decrypt_text(ciphertext: bytes, context: str) -> Call[str]:
    """VetAssistError 22021 for a value holding a NUL byte (use decrypt)."""
    return Call("SELECT vetassist_auth.decrypt_text(%s, %s)", (ciphertext, context), _value)


def field_hash(value: str, field: str) -> Call[bytes]:
    """The keyed hash of ``value`` as field ``field`` (normalized: email, va_icn, names, phone, ip)."""
    return Call("SELECT vetassist_auth.field_hash(%s, %s)", (value, field), _value)


def field_hashes(value: str, field: str) -> Call[list[bytes]]:
    """One hash per usable hash key, for ``WHERE h = ANY (...)`` across a key rotation."""
    return Call("SELECT vetassist_auth.field_hashes(%s, %s)", (value, field), _value)


# Identity


def upsert_va_user(va_icn: str, veteran_status: str | None, email: str | None,
                   first_name: str | None, last_name: str | None) -> Call[UUID]:
    """After VA.gov sign-in: creates or updates the account keyed by the ICN (None keeps a value)."""
    return Call("SELECT vetassist_auth.upsert_va_user(%s, %s, %s, %s, %s)",
                (va_icn, veteran_status, email, first_name, last_name), _value)


def find_user_by_icn(va_icn: str) -> Call[UUID | None]:
    return Call("SELECT vetassist_auth.find_user_by_icn(%s)", (va_icn,), _value)


def find_users_by_email(email: str) -> Call[list[UUID]]:
    return Call("SELECT * FROM vetassist_auth.find_users_by_email(%s)", (email,), _column)


def user_profile(user_id: UUID) -> Call[Profile]:
    """The decrypted profile (audited as PHI access); NotFound for an unknown user."""
    return Call("SELECT * FROM vetassist_auth.user_profile(%s)", (user_id,), _one(Profile))


def deactivate_user(user_id: UUID, reason: str) -> Call[None]:
    """Deactivates the account, ends its sessions and deletes its VA tokens."""
    return Call("SELECT vetassist_auth.deactivate_user(%s, %s)", (user_id, reason), _nothing)


# VA tokens


def store_va_tokens(user_id: UUID, access_token: str, refresh_token: str | None,
                    expires_at: datetime, scope: str | None = None) -> Call[int]:
    """Stores or refreshes the VA.gov tokens, encrypted; returns the token generation.
    A refresh_token of None keeps the stored one."""
    return Call("SELECT vetassist_auth.store_va_tokens(%s, %s, %s, %s, %s)",
                (user_id, access_token, refresh_token, expires_at, scope), _value)


def va_access_token(user_id: UUID) -> Call[str | None]:
    """The VA access token, None if none is stored; TokenExpired once it has expired."""
    return Call("SELECT vetassist_auth.va_access_token(%s)", (user_id,), _value)


def va_refresh_token(user_id: UUID) -> Call[str | None]:
    return Call("SELECT vetassist_auth.va_refresh_token(%s)", (user_id,), _value)


def va_tokens_due(within: timedelta) -> Call[list[UUID]]:
    """Users whose access token expires within ``within`` and who have a refresh token."""
    return Call("SELECT * FROM vetassist_auth.va_tokens_due(%s)", (within,), _column)


def delete_va_tokens(user_id: UUID) -> Call[bool]:
    """Deletes the user's VA tokens; False if there were none."""
    return Call("SELECT vetassist_auth.delete_va_tokens(%s)", (user_id,), _value)


# One call per request, sessions


def authenticate(jwt_id: str, client_ip: str | None = None) -> Call[Authentication]:
    """Validates and touches the session; while it stays ACTIVE, names its user, the session and
    the client address on the transaction's audit rows. A client_ip that is not an IP address is
    passed as NULL (see client_address)."""
    return Call("SELECT * FROM vetassist_auth.authenticate(%s, %s)", (jwt_id, client_address(client_ip)),
                _one(Authentication.from_row))


def create_session(user_id: UUID, jwt_id: str, expires_at: datetime, ip: str | None = None,
                   user_agent: str | None = None, device_fingerprint: str | None = None,
                   device_info: dict[str, Any] | None = None) -> Call[UUID]:
    """Starts a session; IP and device fingerprint are stored only as keyed hashes (InvalidArgument
    for an ``ip`` that is not an address: pass client_address(...) for a value from a proxy)."""
    return Call("SELECT vetassist_auth.create_session(%s, %s, %s, %s, %s, %s, %s)",
                (user_id, jwt_id, expires_at, ip, user_agent, device_fingerprint,
                 None if device_info is None else Jsonb(device_info)), _value)


def touch_session(jwt_id: str) -> Call[SessionStatus]:
    """Validates the session and records activity (authenticate does this and more)."""
    return Call("SELECT vetassist_auth.touch_session(%s)", (jwt_id,), lambda rows: SessionStatus(rows[0][0]))


def session_status(jwt_id: str) -> Call[SessionStatus]:
    """The status without recording activity (IDLE: the idle time-out is near)."""
    # Named: session_status('…') with an untyped argument would be a cast to the enum type.
    return Call("SELECT vetassist_auth.session_status(jwt_id => %s)", (jwt_id,),
                lambda rows: SessionStatus(rows[0][0]))


def end_session(jwt_id: str, reason: str = "logout") -> Call[bool]:
    """Ends the session; False if it had already ended."""
    return Call("SELECT vetassist_auth.end_session(%s, %s)", (jwt_id, reason), _value)


def end_user_sessions(user_id: UUID, reason: str) -> Call[int]:
    """Ends every live session of the user; returns how many."""
    return Call("SELECT vetassist_auth.end_user_sessions(%s, %s)", (user_id, reason), _value)


def lock_session(jwt_id: str, reason: str) -> Call[bool]:
    """Locks the session for good; False if it had already ended."""
    return Call("SELECT vetassist_auth.lock_session(%s, %s)", (jwt_id, reason), _value)


def refresh_session_token(jwt_id: str, presented: str | None, replacement: str) -> Call[RefreshedToken | None]:
    """(generation, current refresh token), or None: a stale token was presented and the session
    ended. Within refresh_reuse_grace of a rotation, the token just replaced returns the successor
    already issued (two tabs refreshing at once), not ``replacement``."""
    return Call("SELECT * FROM vetassist_auth.refresh_session_token(%s, %s, %s)",
                (jwt_id, presented, replacement),
                lambda rows: None if rows[0][0] is None else RefreshedToken(*rows[0]))


def rotate_session_refresh_token(jwt_id: str, presented: str | None, replacement: str) -> Call[int | None]:
    """The new refresh generation, or None: a stale token was presented and the session ended."""
    return Call("SELECT vetassist_auth.rotate_session_refresh_token(%s, %s, %s)",
                (jwt_id, presented, replacement), _value)


def log_session_event(jwt_id: str, event_type: str, severity: str,
                      details: dict[str, Any] | None = None) -> Call[int]:
    """Records an event (severity info, warning, critical or crisis); crisis also NOTIFYs on commit."""
    return Call("SELECT vetassist_auth.log_session_event(%s, %s, %s, %s)",
                (jwt_id, event_type, severity, Jsonb(details or {})), _value)


def verify_crisis_notice(payload: str) -> Call[bool]:
    """Whether a vetassist_auth_crisis payload was sent by the extension about a stored event."""
    return Call("SELECT vetassist_auth.verify_crisis_notice(%s)", (payload,), _value)


def expire_sessions(batch_size: int = 10000) -> Call[int]:
    """Ends up to ``batch_size`` timed-out sessions; call until 0."""
    return Call("SELECT vetassist_auth.expire_sessions(%s)", (batch_size,), _value)


# MFA


def mfa_enroll_totp(user_id: UUID) -> Call[str]:
    """The otpauth:// URI for the authenticator app (not enabled until confirmed)."""
    return Call("SELECT vetassist_auth.mfa_enroll_totp(%s)", (user_id,), _value)


def mfa_confirm_totp(user_id: UUID, code: str, jwt_id: str | None = None) -> Call[bool]:
    """Enables TOTP; with the session's jwt_id the confirming code also verifies that session."""
    return Call("SELECT vetassist_auth.mfa_confirm_totp(%s, %s, %s)", (user_id, code, jwt_id), _value)


def mfa_required(jwt_id: str) -> Call[bool]:
    """Whether the session still needs a second factor."""
    return Call("SELECT vetassist_auth.mfa_required(%s)", (jwt_id,), _value)


def mfa_verify(jwt_id: str, code: str) -> Call[bool]:
    """A TOTP or backup code; true marks the session verified. A failure is recorded durably."""
    return Call("SELECT vetassist_auth.mfa_verify(%s, %s)", (jwt_id, code), _value)


def mfa_generate_backup_codes(user_id: UUID, n: int = 10) -> Call[list[str]]:
    """New backup codes, shown once; the previous set no longer works."""
    return Call("SELECT vetassist_auth.mfa_generate_backup_codes(%s, %s)", (user_id, n), _value)


def mfa_trust_device(jwt_id: str, days: int = 30) -> Call[UUID]:
    """The session's device skips MFA for ``days``; returns the device id."""
    return Call("SELECT vetassist_auth.mfa_trust_device(%s, %s)", (jwt_id, days), _value)


def mfa_trusted_devices(user_id: UUID) -> Call[list[TrustedDevice]]:
    return Call("SELECT * FROM vetassist_auth.mfa_trusted_devices(%s)", (user_id,), _all(TrustedDevice))


def mfa_revoke_device(user_id: UUID, device_id: UUID) -> Call[bool]:
    return Call("SELECT vetassist_auth.mfa_revoke_device(%s, %s)", (user_id, device_id), _value)


def mfa_disable(user_id: UUID) -> Call[bool]:
    return Call("SELECT vetassist_auth.mfa_disable(%s)", (user_id,), _value)


# Audit


def set_actor(user_id: UUID | None, client_ip: str | None = None) -> Call[None]:
    """Names the actor (and the hashed client address) on this transaction's later audit rows.
    A client_ip that is not an IP address is passed as NULL (see client_address)."""
    return Call("SELECT vetassist_auth.set_actor(%s, %s)", (user_id, client_address(client_ip)), _nothing)


def audit_event(category: str, event_type: str, outcome: str, details: dict[str, Any] | None = None,
                subject_user_id: UUID | None = None) -> Call[int]:
    """Writes an application audit event (outcome success, failure, denied or info); returns its id.

    ``subject_user_id``: the veteran the event is about (None: the actor, as on a veteran's own
    page). Events of category phi about a veteran appear in their my_disclosures and
    phi_disclosures.
    """
    return Call("SELECT vetassist_auth.audit_event(%s, %s, %s, %s, %s)",
                (category, event_type, outcome, Jsonb(details or {}), subject_user_id), _value)


def enable_row_audit(target: str, redact: Sequence[str] = (), ignore: Sequence[str] = ()) -> Call[None]:
    """Row audit on table ``target`` (a name such as ``public.notes``); ``redact`` columns' values
    are never logged, changes to only ``ignore`` columns are not logged."""
    return Call("SELECT vetassist_auth.enable_row_audit(%s, %s, %s)", (target, list(redact), list(ignore)),
                _nothing)


def disable_row_audit(target: str) -> Call[bool]:
    return Call("SELECT vetassist_auth.disable_row_audit(%s)", (target,), _value)


def seal_audit_log(max_rows: int = 10000) -> Call[int]:
    """Seals up to ``max_rows`` audit rows of finished transactions; returns how many."""
    return Call("SELECT vetassist_auth.seal_audit_log(%s)", (max_rows,), _value)


def seal_worker_audit_logs(max_rows: int = 10000) -> Call[int]:
    """Citus: seals the audit logs of the workers; returns how many rows."""
    return Call("SELECT vetassist_auth.seal_worker_audit_logs(%s)", (max_rows,), _value)


def audit_seal_status() -> Call[SealStatus]:
    return Call("SELECT * FROM vetassist_auth.audit_seal_status()", (), _one(SealStatus))


def audit_chain_head() -> Call[ChainHead | None]:
    """The newest seal (None before the first), an anchor to keep outside the database."""
    return Call("SELECT * FROM vetassist_auth.audit_chain_head()", (), _first(ChainHead))


def audit_chain_heads() -> Call[list[NodeChainHead]]:
    """The newest seal of every node (one row without Citus)."""
    return Call("SELECT * FROM vetassist_auth.audit_chain_heads()", (), _all(NodeChainHead))


def verify_audit_chain(anchor_seq: int | None = None, anchor_hash: bytes | None = None,
                       anchor_timeline: int | None = None, anchor_lsn: str | None = None) -> Call[ChainVerification]:
    """Checks the sealed chain; with an anchor (seq and hash from audit_chain_head or the server
    log), also that the chain still holds it; with the anchor's timeline and LSN (X/Y, from the
    log line), tells a recovery to before the anchor from a cut."""
    if (anchor_seq is None) != (anchor_hash is None) or (anchor_timeline is None) != (anchor_lsn is None):
        raise ValueError("an anchor is a seq and a hash; its position a timeline and an LSN")
    if anchor_seq is None:
        if anchor_timeline is not None:
            raise ValueError("an anchor's position needs the anchor")
        return Call("SELECT * FROM vetassist_auth.verify_audit_chain()", (), _one(ChainVerification))
    if anchor_timeline is None:
        return Call("SELECT * FROM vetassist_auth.verify_audit_chain(%s, %s)", (anchor_seq, anchor_hash),
                    _one(ChainVerification))
    return Call("SELECT * FROM vetassist_auth.verify_audit_chain(%s, %s, %s, %s)",
                (anchor_seq, anchor_hash, anchor_timeline, anchor_lsn), _one(ChainVerification))


def verify_audit_chain_at(node: str, anchor_seq: int, anchor_hash: bytes) -> Call[ChainVerification]:
    """Citus: checks one node's chain against an anchor of that node (audit_chain_heads)."""
    return Call("SELECT * FROM vetassist_auth.verify_audit_chain_at(%s, %s, %s)", (node, anchor_seq, anchor_hash),
                _one(ChainVerification))


def purge_audit_log(older_than: timedelta | str) -> Call[int]:
    """Removes sealed rows older than ``older_than`` (a timedelta or an interval such as
    '6 years'; at least vetassist_auth.audit_min_retention); returns how many."""
    return Call("SELECT vetassist_auth.purge_audit_log(%s)", (older_than,), _value)


def verify_installation() -> Call[list[InstallationCheck]]:
    return Call("SELECT * FROM vetassist_auth.verify_installation()", (), _all(InstallationCheck))


def protected_columns() -> Call[list[ProtectedColumn]]:
    return Call("SELECT * FROM vetassist_auth.protected_columns()", (), _all(ProtectedColumn))


def metrics(names: Sequence[str] | None = None) -> Call[list[MetricSample]]:
    """The extension's health as Prometheus series (all, or only ``names``)."""
    return Call("SELECT * FROM vetassist_auth.metrics(%s)", (None if names is None else list(names),),
                _all(MetricSample))


def metric_definitions() -> Call[list[MetricDefinition]]:
    return Call("SELECT * FROM vetassist_auth.metric_definitions()", (), _all(MetricDefinition))


def exporter_queries() -> Call[str]:
    """The queries file of prometheus-postgres-exporter for these metrics."""
    return Call("SELECT vetassist_auth.exporter_queries()", (), _value)


def node_role() -> Call[NodeRole]:
    return Call("SELECT vetassist_auth.node_role()", (), lambda rows: NodeRole(rows[0][0]))


# Keys and operations (admin)


def key_usage_summary() -> Call[list[KeyUsage]]:
    return Call("SELECT * FROM vetassist_auth.key_usage_summary()", (), _all(KeyUsage))


def rotate_key(purpose: str) -> Call[int]:
    """A new active key of ``purpose`` (phi, hash, token, audit); the old one decrypts only.
    Returns the new key's id."""
    return Call("SELECT vetassist_auth.rotate_key(%s)", (purpose,), _value)


def reencrypt(batch_size: int = 1000) -> Call[int]:
    """Re-encrypts up to ``batch_size`` values under old keys; call until 0."""
    return Call("SELECT vetassist_auth.reencrypt(%s)", (batch_size,), _value)


def rewrap_keys(old_master_key_file: str | None = None) -> Call[int]:
    """Re-wraps the data keys under the current master key; needs pg_read_server_files."""
    return Call("SELECT vetassist_auth.rewrap_keys(%s)", (old_master_key_file,), _value)


def unretire_key(key_id: int) -> Call[bool]:
    return Call("SELECT vetassist_auth.unretire_key(%s)", (key_id,), _value)


def destroy_key(key_id: int) -> Call[bool]:
    """Destroys a retired key's material for good (NotFound unless retired and not destroyed)."""
    return Call("SELECT vetassist_auth.destroy_key(%s)", (key_id,), _value)


def resync_sequences() -> Call[list[ResyncStep]]:
    return Call("SELECT * FROM vetassist_auth.resync_sequences()", (), _all(ResyncStep))


def promote() -> Call[list[PromoteStep]]:
    """Makes this node (a logical replication subscriber) the primary after a failover."""
    return Call("SELECT * FROM vetassist_auth.promote()", (), _all(PromoteStep))


def distribute(shard_count: int | None = None) -> Call[list[str]]:
    """Citus: distributes the extension's tables; returns the tables distributed."""
    return Call("SELECT * FROM vetassist_auth.distribute(%s)", (shard_count,), _column)


def veteran_placement(user_id: UUID) -> Call[list[ShardPlacement]]:
    return Call("SELECT * FROM vetassist_auth.veteran_placement(%s)", (user_id,), _all(ShardPlacement))


# Accounting of disclosures (45 CFR 164.528)


def disclosure_purposes() -> Call[list[DisclosurePurpose]]:
    return Call("SELECT * FROM vetassist_auth.disclosure_purposes()", (), _all(DisclosurePurpose))


def record_disclosure(subject_user_id: UUID, recipient: str, description: str, purpose: str,
                      details: dict[str, Any] | None = None) -> Call[int]:
    """Records a disclosure of the veteran's PHI to ``recipient``; returns its audit row id.

    Committed before it returns: a rollback of the request does not take it back. ``description``
    says briefly what was disclosed (recipient and description: 1 to 1000 characters);
    ``details`` (a JSON object) is kept with it, outside the accounting. ``purpose``: one of
    disclosure_purposes(); anything else is InvalidArgument.
    """
    return Call("SELECT vetassist_auth.record_disclosure(%s, %s, %s, %s, %s)",
                (subject_user_id, recipient, description, purpose, Jsonb(details or {})), _value)


def my_disclosures(jwt_id: str, since: datetime | None = None) -> Call[list[Disclosure]]:
    """Every access to and disclosure of the session's veteran's PHI since ``since`` (None: six
    years back), oldest first; the read is audited as theirs. AuthenticationRefused unless the
    session is live and MFA-verified."""
    if since is None:
        return Call("SELECT * FROM vetassist_auth.my_disclosures(%s)", (jwt_id,), _all(Disclosure))
    return Call("SELECT * FROM vetassist_auth.my_disclosures(%s, %s)", (jwt_id, since), _all(Disclosure))


def phi_disclosures(user_id: UUID, since: datetime, until: datetime) -> Call[list[PhiAccess]]:
    """Every access to and disclosure of the veteran's PHI in [since, until), oldest first."""
    return Call("SELECT * FROM vetassist_auth.phi_disclosures(%s, %s, %s)", (user_id, since, until),
                _all(PhiAccess))


def accounting_of_disclosures(user_id: UUID, since: datetime | None = None) -> Call[list[AccountingEntry]]:
    """The accountable disclosures (164.528(b)(2)) since ``since`` (None: six years back)."""
    if since is None:
        return Call("SELECT * FROM vetassist_auth.accounting_of_disclosures(%s)", (user_id,),
                    _all(AccountingEntry))
    return Call("SELECT * FROM vetassist_auth.accounting_of_disclosures(%s, %s)", (user_id, since),
                _all(AccountingEntry))


def crisis_events(since: datetime) -> Call[list[CrisisEvent]]:
    return Call("SELECT * FROM vetassist_auth.crisis_events(%s)", (since,), _all(CrisisEvent))


def session_events_of(user_id: UUID, since: datetime) -> Call[list[SessionEvent]]:
    return Call("SELECT * FROM vetassist_auth.session_events_of(%s, %s)", (user_id, since), _all(SessionEvent))
