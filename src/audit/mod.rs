//! The audit log (docs/ARCHITECTURE.md, "Audit chain"): `writer` appends rows, `row_trigger` audits table changes,
//! `chain` seals, verifies and purges. This module keeps the audit context: who the application
//! says is acting in this transaction.
//!
//! `set_actor` stores the application user (and client address) in backend memory for the
//! current transaction only; a pooled connection never carries one request's actor into the
//! next. (A transaction-local setting would not work: SECURITY DEFINER functions with a
//! `SET search_path` clause undo local settings made inside them.)

use crate::error::OrRaise;
use crate::sealing;
use pgrx::prelude::*;
use pgrx::Uuid;
use std::cell::RefCell;

#[derive(Default, Clone)]
struct Actor {
    user_id: Option<Uuid>,
    ip_hash: Option<Vec<u8>>,
    session_id: Option<Uuid>,
}

thread_local! {
    static ACTOR: RefCell<Actor> = RefCell::new(Actor::default());
}

/// Actor and purge permission last for one transaction only.
#[pg_guard]
unsafe extern "C-unwind" fn reset_at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PREPARE
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_PARALLEL_ABORT
    ) {
        ACTOR.with_borrow_mut(|a| *a = Actor::default());
        PURGING.set(false);
    }
}

pub fn register_callbacks() {
    // SAFETY: called once per backend from _PG_init; the callback is a static function.
    unsafe { pg_sys::RegisterXactCallback(Some(reset_at_transaction_end), std::ptr::null_mut()) };
    writer::register_callbacks();
    recorder::register();
}

/// Names the application user behind the current transaction (and, optionally, the end
/// user's IP address, stored only as a keyed hash). Audit rows written later in the same
/// transaction carry both.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn set_actor(user_id: Option<Uuid>, client_ip: default!(Option<&str>, "NULL")) {
    let ip_hash = client_ip.map(|ip| sealing::audit_ip_hash(ip).or_raise());
    ACTOR.with_borrow_mut(|a| {
        a.user_id = user_id;
        a.ip_hash = ip_hash;
    });
}

/// Remembers the session a request runs in (touch_session calls it) for the audit rows after
/// it. Internal: not granted to any role.
#[pg_extern(strict, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn set_current_session(session_id: Uuid) {
    crate::citus::require_coordinator();
    crate::replica::require_primary();
    ACTOR.with_borrow_mut(|a| a.session_id = Some(session_id));
}

#[pg_extern(stable, parallel_safe)]
fn current_actor() -> Option<Uuid> {
    ACTOR.with_borrow(|a| a.user_id)
}

#[pg_extern(stable, parallel_safe)]
fn current_actor_ip_hash() -> Option<Vec<u8>> {
    ACTOR.with_borrow(|a| a.ip_hash.clone())
}

#[pg_extern(stable, parallel_safe)]
fn current_session_id() -> Option<Uuid> {
    ACTOR.with_borrow(|a| a.session_id)
}

// ---------------------------------------------------------------------------------------------
// Purges (docs/ARCHITECTURE.md, "Anchors and purges"): the chain itself is chain.rs.

thread_local! {
    /// Set only while purge_audit_log deletes (cleared after them, and at transaction end
    /// should the purge fail midway): the append-only triggers let exactly those deletes through.
    static PURGING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the current transaction is inside purge_audit_log. Internal.
#[pg_extern(stable)]
fn audit_purge_in_progress() -> bool {
    PURGING.get()
}

pub use writer::AuditRow;

mod chain;
pub mod recorder;
mod row_trigger;
mod writer;

// Who may call the functions above (any other function of the extension: no role,
// sql/grants.sql).
extension_sql!(
    r#"
GRANT EXECUTE ON FUNCTION vetassist_auth.set_actor(uuid, text) TO vetassist_app, vetassist_admin;
"#,
    name = "audit_grants",
    requires = [set_actor],
);
