//! The audit log (docs/ARCHITECTURE.md, "Audit chain"): `writer` appends rows, `row_trigger` audits table changes,
//! `chain` seals, verifies and purges. This module keeps the audit context: who the application
//! says is acting in this transaction.
//!
//! `set_actor` stores the application user (and client address) in backend memory for the
//! current transaction only; a pooled connection never carries one request's actor into the
//! next. (A transaction-local setting would not work: SECURITY DEFINER functions with a
//! `SET search_path` clause undo local settings made inside them.)

use crate::error::{Failure, Kind, OrRaise};
use crate::sealing;
use pgrx::prelude::*;
use pgrx::Uuid;
use std::cell::RefCell;

#[derive(Default, Clone)]
struct Actor {
    user_id: Option<Uuid>,
    ip_hash: Option<Vec<u8>>,
    session_id: Option<Uuid>,
    /// The user of that session: a row never names one user acting in another's session.
    session_user_id: Option<Uuid>,
}

thread_local! {
    static ACTOR: RefCell<Actor> = RefCell::new(Actor::default());
    /// What the actor was before each change made in a subtransaction still open, with that
    /// subtransaction's id: ROLLBACK TO SAVEPOINT undoes set_actor as it undoes SET LOCAL. The
    /// audit_ip key the hash was made under is pinned for that subtransaction only, so a hash
    /// outliving it could be written under a key that retires meanwhile.
    static ACTOR_BEFORE: RefCell<Vec<(pg_sys::SubTransactionId, Actor)>> = const { RefCell::new(Vec::new()) };
}

/// Changes the actor, remembering the one before for a rollback of the current subtransaction.
fn change_actor(change: impl FnOnce(&mut Actor)) {
    // SAFETY: reads the current subtransaction's id; we are inside a transaction.
    let subid = unsafe { pg_sys::GetCurrentSubTransactionId() };
    ACTOR.with_borrow_mut(|a| {
        // TopSubTransactionId (c.h) is 1: the transaction itself, which nothing rolls back to.
        if subid > 1 {
            ACTOR_BEFORE.with_borrow_mut(|before| before.push((subid, a.clone())));
        }
        change(a);
    });
}

/// A subtransaction that aborts takes its changes of the actor with it; one that commits hands
/// them to its parent.
#[pg_guard]
unsafe extern "C-unwind" fn follow_subtransactions(
    event: pg_sys::SubXactEvent::Type,
    my_subid: pg_sys::SubTransactionId,
    parent_subid: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    match event {
        pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB => ACTOR_BEFORE.with_borrow_mut(|before| {
            while before.last().is_some_and(|(subid, _)| *subid >= my_subid) {
                let (_, actor) = before.pop().expect("just seen");
                ACTOR.with_borrow_mut(|a| *a = actor);
            }
        }),
        pg_sys::SubXactEvent::SUBXACT_EVENT_COMMIT_SUB => ACTOR_BEFORE.with_borrow_mut(|before| {
            for (subid, _) in before.iter_mut().filter(|(subid, _)| *subid >= my_subid) {
                *subid = parent_subid;
            }
        }),
        _ => {}
    }
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
        ACTOR_BEFORE.with_borrow_mut(Vec::clear);
        PURGING.set(false);
    }
}

pub fn register_callbacks() {
    // SAFETY: called once per backend from _PG_init; the callback is a static function.
    unsafe { pg_sys::RegisterXactCallback(Some(reset_at_transaction_end), std::ptr::null_mut()) };
    // SAFETY: as above.
    unsafe { pg_sys::RegisterSubXactCallback(Some(follow_subtransactions), std::ptr::null_mut()) };
    writer::register_callbacks();
    recorder::register();
}

/// Names the application user behind the current transaction (and, optionally, the end
/// user's IP address, stored only as a keyed hash). Audit rows written later in the same
/// transaction carry both, and the session authenticate named only while it is this user's.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn set_actor(user_id: Option<Uuid>, client_ip: default!(Option<&str>, "NULL")) {
    let ip_hash = client_ip.map(|ip| {
        sealing::audit_ip_hash(ip)
            .map_err(|failure| match failure.kind {
                Kind::Malformed => Failure::new(
                    Kind::Malformed,
                    "vetassist_auth: client_ip must be an IPv4 or IPv6 address, as 203.0.113.7 or 2001:db8::1",
                ),
                _ => failure,
            })
            .or_raise()
    });
    change_actor(|a| {
        a.user_id = user_id;
        a.ip_hash = ip_hash;
        if a.session_user_id.is_some() && a.session_user_id != user_id {
            a.session_id = None;
            a.session_user_id = None;
        }
    });
}

/// Remembers the session a request runs in, and its user (touch_session and authenticate call
/// it), for the audit rows after it. Internal: not granted to any role.
#[pg_extern(strict, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn set_request_session(session_id: Uuid, user_id: Uuid) {
    crate::citus::require_coordinator();
    crate::replica::require_primary();
    change_actor(|a| {
        a.session_id = Some(session_id);
        a.session_user_id = Some(user_id);
    });
}

/// The C symbol the touch_session of releases before 0.2.0 calls, until ALTER EXTENSION UPDATE.
#[pg_extern(strict, sql = false)]
fn set_current_session(session_id: Uuid) {
    crate::citus::require_coordinator();
    crate::replica::require_primary();
    change_actor(|a| a.session_id = Some(session_id));
}

/// Forgets actor, address and session for the rest of the transaction: a request whose session
/// is not live writes no row in another request's name. Internal.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn clear_actor() {
    change_actor(|a| *a = Actor::default());
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
