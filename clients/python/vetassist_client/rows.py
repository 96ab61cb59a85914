"""The typed results of the vetassist_auth SQL API: one class per row shape, fields in the
functions' column order (docs/api.md and sql/*.sql name them).

Free text that may hold PHI or a secret (names, e-mail, recipients, descriptions, tokens) is left
out of ``repr``, so a row can be logged.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple
from uuid import UUID


class SessionStatus(enum.Enum):
    ACTIVE = "ACTIVE"
    IDLE = "IDLE"
    EXPIRED = "EXPIRED"
    TERMINATED = "TERMINATED"
    LOCKED = "LOCKED"


class NodeRole(enum.Enum):
    """node_role(): whether this node writes (docs/operations.md, "Replicas and failover")."""

    PRIMARY = "primary"
    SUBSCRIBER = "subscriber"


@dataclass(frozen=True, slots=True)
class Authentication:
    """authenticate(jwt_id, client_ip): the request's session, validated and touched.

    For an ACTIVE session the transaction's audit rows name its user, the session and the client
    address; ``mfa_required`` says whether a second factor is still due. Any other status sets
    nothing and ``reason`` says why (logout, idle_timeout, absolute_timeout, mfa_lockout, …); an
    unknown jwt_id is status None with reason ``unknown``.
    """

    status: SessionStatus | None
    reason: str | None
    user_id: UUID | None
    session_id: UUID | None
    mfa_required: bool | None
    idle_expires_at: datetime | None
    absolute_expires_at: datetime | None

    @classmethod
    def from_row(cls, status: str | None, *rest: Any) -> Authentication:
        # The enum arrives as its text: psycopg has no loader registered for it.
        return cls(None if status is None else SessionStatus(status), *rest)

    @property
    def active(self) -> bool:
        return self.status is SessionStatus.ACTIVE


@dataclass(frozen=True, slots=True)
class Profile:
    """A decrypted user profile (user_profile)."""

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


class RefreshedToken(NamedTuple):
    """refresh_session_token: the generation and the session's current refresh token."""

    generation: int
    refresh_token: str

    def __repr__(self) -> str:
        return f"RefreshedToken(generation={self.generation})"


@dataclass(frozen=True, slots=True)
class TrustedDevice:
    """mfa_trusted_devices: a device that skips MFA until ``trusted_until``."""

    device_id: UUID
    created_at: datetime
    trusted_until: datetime
    last_used_at: datetime | None


@dataclass(frozen=True, slots=True)
class CrisisNotice:
    """A NOTIFY on vetassist_auth_crisis: ids only; an auditor reads the event with crisis_events."""

    session_id: UUID
    event_id: int


@dataclass(frozen=True, slots=True)
class DisclosurePurpose:
    """disclosure_purposes: a purpose record_disclosure accepts; ``accountable``: in the accounting."""

    purpose: str
    accountable: bool
    statement: str


@dataclass(frozen=True, slots=True)
class Disclosure:
    """An access to or disclosure of the signed-in veteran's PHI, as my_disclosures shows it.

    ``recipient`` and ``purpose`` are None for accesses that are not disclosures (the extension's
    own reads, the application's audit_event rows of category phi). ``accountable``: 45 CFR
    164.528 requires it in an accounting (exempt purposes such as treatment do not).
    ``recorded_by``: extension or application.
    """

    occurred_at: datetime
    actor_user_id: UUID | None
    recipient: str | None = field(repr=False)
    description: str | None = field(repr=False)
    purpose: str | None
    accountable: bool
    recorded_by: str


@dataclass(frozen=True, slots=True)
class PhiAccess:
    """phi_disclosures (auditor): one access to or disclosure of a veteran's PHI, with its audit row."""

    audit_id: int
    occurred_at: datetime
    actor_user_id: UUID | None
    recipient: str | None = field(repr=False)
    description: str | None = field(repr=False)
    purpose: str | None
    accountable: bool
    recorded_by: str
    event_type: str
    outcome: str
    db_role: str
    session_id: UUID | None
    details: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class AccountingEntry:
    """One accountable disclosure, the content 164.528(b)(2) requires: its date, the recipient, a
    brief description of the PHI disclosed and a brief statement of the purpose."""

    disclosed_at: datetime
    recipient: str = field(repr=False)
    description: str = field(repr=False)
    purpose: str


@dataclass(frozen=True, slots=True)
class CrisisEvent:
    """crisis_events (auditor): a crisis event of any veteran."""

    event_id: int
    occurred_at: datetime
    user_id: UUID
    session_id: UUID
    event_type: str
    details: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class SessionEvent:
    """session_events_of (auditor): one event of one veteran's sessions."""

    event_id: int
    occurred_at: datetime
    session_id: UUID
    event_type: str
    severity: str
    details: dict[str, Any] = field(repr=False)


@dataclass(frozen=True, slots=True)
class ChainHead:
    """audit_chain_head: the newest seal, an anchor to keep outside the database."""

    seq: int
    hash: bytes
    sealed_at: datetime


@dataclass(frozen=True, slots=True)
class NodeChainHead:
    """audit_chain_heads: the newest seal of each node (Citus: the coordinator and every worker)."""

    node: str
    seq: int | None
    hash: bytes | None
    sealed_at: datetime | None


@dataclass(frozen=True, slots=True)
class SealStatus:
    """audit_seal_status: the chain's head, what waits to be sealed, and who seals right now."""

    head_seq: int | None
    head_sealed_at: datetime | None
    sealed_through_id: int | None
    waiting_rows: int | None
    sealer_pid: int | None


@dataclass(frozen=True, slots=True)
class ChainVerification:
    """verify_audit_chain / verify_audit_chain_at: ``first_bad_seq`` and ``problem`` when not ok."""

    ok: bool
    checked: int
    first_bad_seq: int | None
    problem: str | None


@dataclass(frozen=True, slots=True)
class InstallationCheck:
    """verify_installation: one check of the installation."""

    check_name: str
    ok: bool
    detail: str | None


@dataclass(frozen=True, slots=True)
class MetricSample:
    """metrics: one series now (docs/operations.md, "Metrics")."""

    metric: str
    labels: dict[str, str]
    value: float


@dataclass(frozen=True, slots=True)
class MetricDefinition:
    """metric_definitions: a series the extension reports, its Prometheus type and labels."""

    metric: str
    kind: str
    labels: list[str]
    help: str


@dataclass(frozen=True, slots=True)
class ProtectedColumn:
    """protected_columns: an encrypted or hashed column of the extension, and how it is sealed."""

    table_name: str
    column_name: str
    purpose: str
    row_id: str
    context_name: str | None
    context_id: str | None
    hash_field: str | None
    hash_of: str | None
    decrypt_is_disclosure: bool


@dataclass(frozen=True, slots=True)
class KeyUsage:
    """key_usage_summary (admin): a data key's purpose, status and how many stored values use it."""

    key_id: int
    purpose: str
    status: str
    used_by: str | None
    stored_values: int | None


@dataclass(frozen=True, slots=True)
class ResyncStep:
    """resync_sequences (admin): a sequence moved past the ids in use (``new_value``: its value),
    or ``<purpose> key rotated`` (``new_value``: the new key's id)."""

    sequence_name: str
    new_value: int


@dataclass(frozen=True, slots=True)
class PromoteStep:
    """promote (admin): one thing promote() did to make this node the primary."""

    action: str
    detail: str | None


@dataclass(frozen=True, slots=True)
class ShardPlacement:
    """veteran_placement (admin, Citus): the shard holding a veteran's rows and its node."""

    shard_id: int
    node: str
