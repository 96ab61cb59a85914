"""What each extension role may call (docs/api.md, "Who may call what"), as the methods of the
objects a client's transaction yields: ``Request`` (vetassist_app), ``Admin`` (vetassist_admin),
``Auditor`` (vetassist_auditor), and their asyncio twins. The calls themselves are in calls.py.
"""

from __future__ import annotations

from . import calls as q
from .calls import AsyncScope, SyncScope, sql_call
from .rows import Authentication


class AppCalls:
    """Every function vetassist_app may execute."""

    # Primitives
    encrypt = sql_call(q.encrypt)
    decrypt = sql_call(q.decrypt)
    encrypt_text = sql_call(q.encrypt_text)
    decrypt_text = sql_call(q.decrypt_text)
    field_hash = sql_call(q.field_hash)
    field_hashes = sql_call(q.field_hashes)
    # Identity
    upsert_va_user = sql_call(q.upsert_va_user)
    find_user_by_icn = sql_call(q.find_user_by_icn)
    find_users_by_email = sql_call(q.find_users_by_email)
    user_profile = sql_call(q.user_profile)
    deactivate_user = sql_call(q.deactivate_user)
    # VA tokens
    store_va_tokens = sql_call(q.store_va_tokens)
    va_access_token = sql_call(q.va_access_token)
    va_refresh_token = sql_call(q.va_refresh_token)
    va_tokens_due = sql_call(q.va_tokens_due)
    delete_va_tokens = sql_call(q.delete_va_tokens)
    # Sessions
    authenticate = sql_call(q.authenticate)
    create_session = sql_call(q.create_session)
    touch_session = sql_call(q.touch_session)
    session_status = sql_call(q.session_status)
    end_session = sql_call(q.end_session)
    end_user_sessions = sql_call(q.end_user_sessions)
    lock_session = sql_call(q.lock_session)
    refresh_session_token = sql_call(q.refresh_session_token)
    rotate_session_refresh_token = sql_call(q.rotate_session_refresh_token)
    log_session_event = sql_call(q.log_session_event)
    verify_crisis_notice = sql_call(q.verify_crisis_notice)
    expire_sessions = sql_call(q.expire_sessions)
    # MFA
    mfa_enroll_totp = sql_call(q.mfa_enroll_totp)
    mfa_confirm_totp = sql_call(q.mfa_confirm_totp)
    mfa_required = sql_call(q.mfa_required)
    mfa_verify = sql_call(q.mfa_verify)
    mfa_generate_backup_codes = sql_call(q.mfa_generate_backup_codes)
    mfa_trust_device = sql_call(q.mfa_trust_device)
    mfa_trusted_devices = sql_call(q.mfa_trusted_devices)
    mfa_revoke_device = sql_call(q.mfa_revoke_device)
    mfa_disable = sql_call(q.mfa_disable)
    # Audit and disclosures
    set_actor = sql_call(q.set_actor)
    audit_event = sql_call(q.audit_event)
    node_role = sql_call(q.node_role)
    disclosure_purposes = sql_call(q.disclosure_purposes)
    record_disclosure = sql_call(q.record_disclosure)
    my_disclosures = sql_call(q.my_disclosures)

    # Set by the client's authenticated(): the row authenticate returned for this request.
    _authentication: Authentication | None = None

    @property
    def authentication(self) -> Authentication:
        """The row ``authenticate`` returned when the request was opened with ``authenticated()``."""
        if self._authentication is None:
            raise RuntimeError("this request was opened with request(), not authenticated()")
        return self._authentication


class ChainCalls:
    """The audit chain's reads, granted to both vetassist_admin and vetassist_auditor."""

    audit_chain_head = sql_call(q.audit_chain_head)
    audit_chain_heads = sql_call(q.audit_chain_heads)
    audit_seal_status = sql_call(q.audit_seal_status)
    verify_audit_chain = sql_call(q.verify_audit_chain)
    verify_audit_chain_at = sql_call(q.verify_audit_chain_at)
    verify_installation = sql_call(q.verify_installation)
    protected_columns = sql_call(q.protected_columns)
    node_role = sql_call(q.node_role)


class AdminCalls(ChainCalls):
    """Every function vetassist_admin may execute."""

    set_actor = sql_call(q.set_actor)
    audit_event = sql_call(q.audit_event)
    deactivate_user = sql_call(q.deactivate_user)
    end_user_sessions = sql_call(q.end_user_sessions)
    expire_sessions = sql_call(q.expire_sessions)
    mfa_disable = sql_call(q.mfa_disable)
    enable_row_audit = sql_call(q.enable_row_audit)
    disable_row_audit = sql_call(q.disable_row_audit)
    seal_audit_log = sql_call(q.seal_audit_log)
    seal_worker_audit_logs = sql_call(q.seal_worker_audit_logs)
    purge_audit_log = sql_call(q.purge_audit_log)
    key_usage_summary = sql_call(q.key_usage_summary)
    rotate_key = sql_call(q.rotate_key)
    reencrypt = sql_call(q.reencrypt)
    rewrap_keys = sql_call(q.rewrap_keys)
    unretire_key = sql_call(q.unretire_key)
    destroy_key = sql_call(q.destroy_key)
    resync_sequences = sql_call(q.resync_sequences)
    promote = sql_call(q.promote)
    distribute = sql_call(q.distribute)
    veteran_placement = sql_call(q.veteran_placement)


class AuditorCalls(ChainCalls):
    """Every function vetassist_auditor may execute."""

    disclosure_purposes = sql_call(q.disclosure_purposes)
    phi_disclosures = sql_call(q.phi_disclosures)
    accounting_of_disclosures = sql_call(q.accounting_of_disclosures)
    crisis_events = sql_call(q.crisis_events)
    session_events_of = sql_call(q.session_events_of)
    metrics = sql_call(q.metrics)
    metric_definitions = sql_call(q.metric_definitions)
    exporter_queries = sql_call(q.exporter_queries)


class Request(AppCalls, SyncScope):
    """The vetassist_auth calls of one application request, all in its transaction."""


class AsyncRequest(AppCalls, AsyncScope):
    """Request for asyncio: the same methods, as coroutines."""


class Admin(AdminCalls, SyncScope):
    """An administrator's calls, in one transaction."""


class AsyncAdmin(AdminCalls, AsyncScope):
    """Admin for asyncio."""


class Auditor(AuditorCalls, SyncScope):
    """An auditor's calls, in one transaction (the accounting reads are recorded durably)."""


class AsyncAuditor(AuditorCalls, AsyncScope):
    """Auditor for asyncio."""
