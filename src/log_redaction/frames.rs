//! Which statements ran a function of ours: an fmgr hook sees every entry into one. Once a
//! function of ours has started in a statement, its arguments may have come from anywhere in
//! it (an application's function that passes a token on, a variable, a CTE), so every line
//! logged for that statement from then on has all its literals masked
//! (docs/ARCHITECTURE.md, "Log redaction").
//!
//! Functions Postgres may inline (plain SQL, not SECURITY DEFINER, no SET) are left alone:
//! asking for the hook would stop the planner from inlining them, and what they call of ours
//! is seen on its own.

use super::verdict;
use pgrx::pg_sys;
use std::cell::{Cell, RefCell};
use std::collections::HashMap;

static mut PREVIOUS_NEEDS_HOOK: pg_sys::needs_fmgr_hook_type = None;
static mut PREVIOUS_HOOK: pg_sys::fmgr_hook_type = None;

/// pg_language's `sql`, a fixed OID of Postgres's catalog.
const SQL_LANGUAGE: pg_sys::Oid = pg_sys::Oid::from_u32(14);

thread_local! {
    /// Whether each function the hook has seen in this backend is one of ours. Postgres calls
    /// the hook for every SECURITY DEFINER function without asking `needs_fmgr_hook` first.
    static OURS: RefCell<HashMap<pg_sys::Oid, bool>> = RefCell::new(HashMap::new());
    /// How many frames of ours are on the stack.
    static ACTIVE: Cell<u32> = const { Cell::new(0) };
    /// The statement (its text) in which a function of ours last started.
    static RAN_IN: RefCell<Option<String>> = const { RefCell::new(None) };
}

pub fn install() {
    // SAFETY: _PG_init runs once per process before any function call; the previous hooks are
    // called from ours.
    unsafe {
        PREVIOUS_NEEDS_HOOK = pg_sys::needs_fmgr_hook;
        pg_sys::needs_fmgr_hook = Some(needs_hook);
        PREVIOUS_HOOK = pg_sys::fmgr_hook;
        pg_sys::fmgr_hook = Some(hook);
    }
}

/// Whether a function of ours is running, or one started in the statement `text`.
pub fn ran_in(text: &str) -> bool {
    ACTIVE.get() > 0 || RAN_IN.with_borrow(|ran| ran.as_deref() == Some(text))
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn needs_hook(function: pg_sys::Oid) -> bool {
    let previous = PREVIOUS_NEEDS_HOOK.is_some_and(|h| h(function));
    is_ours(function) || previous
}

/// Whether `function` is one of ours, asked of the catalog once per backend.
unsafe fn is_ours(function: pg_sys::Oid) -> bool {
    if let Some(known) = OURS.with_borrow(|ours| ours.get(&function).copied()) {
        return known;
    }
    if !pg_sys::IsTransactionState() {
        return false;
    }
    let ours = is_tracked(function);
    OURS.with_borrow_mut(|known| known.insert(function, ours));
    ours
}

/// A function of the extension's schema that Postgres would not inline.
unsafe fn is_tracked(function: pg_sys::Oid) -> bool {
    let schema = pg_sys::get_namespace_oid(c"vetassist_auth".as_ptr(), true);
    if schema == pg_sys::InvalidOid {
        return false;
    }
    let tuple = pg_sys::SearchSysCache1(
        pg_sys::SysCacheIdentifier::PROCOID as _,
        pg_sys::Datum::from(function),
    );
    if tuple.is_null() {
        return false;
    }
    let proc = &*pg_sys::heap_tuple_get_struct::<pg_sys::FormData_pg_proc>(tuple);
    let inlinable = proc.prolang == SQL_LANGUAGE
        && !proc.prosecdef
        && pg_sys::heap_attisnull(
            tuple,
            pg_sys::Anum_pg_proc_proconfig as _,
            std::ptr::null_mut(),
        );
    let ours = proc.pronamespace == schema && !inlinable;
    pg_sys::ReleaseSysCache(tuple);
    ours
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn hook(
    event: pg_sys::FmgrHookEventType::Type,
    flinfo: *mut pg_sys::FmgrInfo,
    private: *mut pg_sys::Datum,
) {
    if let Some(previous) = PREVIOUS_HOOK {
        previous(event, flinfo, private);
    }
    if !is_ours((*flinfo).fn_oid) {
        return;
    }
    match event {
        pg_sys::FmgrHookEventType::FHET_START => {
            ACTIVE.set(ACTIVE.get() + 1);
            started();
        }
        _ => ACTIVE.set(ACTIVE.get().saturating_sub(1)),
    }
}

/// A function of ours started: the statement running it is remembered, and its masked text is
/// made ready here, where parsing it may raise, for the log lines written about it later.
fn started() {
    let Some(statement) = super::current_statement_text() else {
        return;
    };
    if RAN_IN.with_borrow(|ran| ran.as_deref() == Some(statement.as_str())) {
        return;
    }
    if verdict::lookup(&statement).is_none() {
        super::with_parse_settings(&statement, || {
            verdict::remember(&statement, verdict::analyze_caught(&statement))
        });
    }
    RAN_IN.set(Some(statement));
}
