//! Event counters for `metrics()` (docs/operations.md, "Metrics"), per database, in shared
//! memory (with the library preloaded; they start from zero at server start, which Prometheus'
//! `rate()` takes as a counter reset). What an audit row counts for is counted when its
//! transaction commits, so a rolled-back sign-in counts nothing; a refusal by the recorder is
//! counted at once, since its caller's transaction fails.

use pgrx::prelude::*;
use std::cell::RefCell;
use std::sync::atomic::{AtomicPtr, AtomicU32, AtomicU64, Ordering};

/// What is counted.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Counter {
    Signins,
    SessionExpirations,
    MfaFailures,
    MfaLockouts,
    RefreshReuse,
    /// A disclosure on record, by where it came from (its audit category).
    Disclosures(Source),
    RecorderRefusals,
}

/// Where a disclosure came from: its label value is the audit category it is recorded under.
#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Source {
    /// `record_disclosure`: the application disclosed PHI to a third party.
    Recorded,
    /// PHI opened for a caller (`phi`, e.g. decrypt of a PHI column).
    Phi,
    /// A veteran's profile read (`phi_access`).
    PhiAccess,
    /// A VA token returned to the caller.
    VaToken,
}

impl Source {
    pub const ALL: [Source; 4] = [
        Source::Recorded,
        Source::Phi,
        Source::PhiAccess,
        Source::VaToken,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Source::Recorded => "disclosure",
            Source::Phi => "phi",
            Source::PhiAccess => "phi_access",
            Source::VaToken => "va_token",
        }
    }
}

const COUNTERS: usize = 6 + Source::ALL.len();

impl Counter {
    fn index(self) -> usize {
        match self {
            Counter::Signins => 0,
            Counter::SessionExpirations => 1,
            Counter::MfaFailures => 2,
            Counter::MfaLockouts => 3,
            Counter::RefreshReuse => 4,
            Counter::RecorderRefusals => 5,
            Counter::Disclosures(source) => 6 + source as usize,
        }
    }

    /// What an audit row counts for, if anything.
    pub fn of_audit_row(category: &str, event_type: &str, outcome: &str) -> Option<Counter> {
        Some(match (category, event_type, outcome) {
            // upsert_va_user: a veteran's first sign-in creates the account.
            ("identity", "user_signed_in" | "user_created", _) => Counter::Signins,
            ("session", "session_expired", _) => Counter::SessionExpirations,
            ("mfa", "mfa_locked_out", _) => Counter::MfaLockouts,
            ("mfa", _, "failure") => Counter::MfaFailures,
            ("session", "refresh_token_reuse", _) => Counter::RefreshReuse,
            ("disclosure", _, "success") => Counter::Disclosures(Source::Recorded),
            ("phi", _, "success") => Counter::Disclosures(Source::Phi),
            ("phi_access", _, "success") => Counter::Disclosures(Source::PhiAccess),
            ("auth", event, "success") if event.starts_with("va_") && event.ends_with("_read") => {
                Counter::Disclosures(Source::VaToken)
            }
            _ => return None,
        })
    }
}

/// Databases with counters of their own; further ones share the last entry's counters.
const DATABASES: usize = 64;

#[repr(C)]
struct Entry {
    database: AtomicU32,
    counts: [AtomicU64; COUNTERS],
}

#[repr(C)]
struct Shared {
    entries: [Entry; DATABASES],
}

pub const SHMEM_SIZE: usize = std::mem::size_of::<Shared>();

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());

/// Finds (or creates, zeroed) the counters; called by the shared-memory start-up hook.
///
/// # Safety
/// Only from that hook, with AddinShmemInitLock held.
pub unsafe fn attach_shared() {
    // SAFETY: see the function's contract; all zero is "no database, no counts".
    unsafe {
        let mut found = false;
        let shared =
            pg_sys::ShmemInitStruct(c"vetassist_auth counters".as_ptr(), SHMEM_SIZE, &mut found)
                as *mut Shared;
        if !found {
            std::ptr::write_bytes(shared as *mut u8, 0, SHMEM_SIZE);
        }
        SHARED.store(shared, Ordering::Release);
    }
}

/// This database's entry; with `claim`, one is taken when there is none yet (only to count:
/// a database that never counts takes none). None when every entry belongs to another database:
/// that database's counters are then absent, never shared with another's.
fn entry(database: pg_sys::Oid, claim: bool) -> Option<&'static Entry> {
    // SAFETY: set once by attach_shared to memory that lives as long as the server.
    let shared = unsafe { SHARED.load(Ordering::Acquire).as_ref() }?;
    let id = database.to_u32();
    if let Some(entry) = shared
        .entries
        .iter()
        .find(|e| e.database.load(Ordering::Acquire) == id)
    {
        return Some(entry);
    }
    if !claim {
        return None;
    }
    for entry in &shared.entries {
        match entry
            .database
            .compare_exchange(0, id, Ordering::AcqRel, Ordering::Acquire)
        {
            Ok(_) => return Some(entry),
            Err(owner) if owner == id => return Some(entry),
            Err(_) => {}
        }
    }
    None
}

/// Frees a dropped database's entry (its counts go with it), so that entries do not run out.
pub fn forget_database(database: pg_sys::Oid) {
    if let Some(entry) = entry(database, false) {
        for count in &entry.counts {
            count.store(0, Ordering::Relaxed);
        }
        entry.database.store(0, Ordering::Release);
    }
}

thread_local! {
    /// Counts of this transaction not yet committed, each with the subtransaction that counted
    /// it: a rolled-back savepoint takes back its own counts only.
    static PENDING: RefCell<Vec<Pending>> = const { RefCell::new(Vec::new()) };
}

struct Pending {
    subtransaction: pg_sys::SubTransactionId,
    counter: usize,
    n: u64,
}

/// Counts `n` for the current transaction (added when it commits).
pub fn count_at_commit(counter: Counter, n: u64) {
    if n == 0 {
        return; // a sweep that expired nothing
    }
    // SAFETY: reads the current subtransaction's id; called inside a transaction.
    let subtransaction = unsafe { pg_sys::GetCurrentSubTransactionId() };
    let counter = counter.index();
    PENDING.with_borrow_mut(|pending| {
        match pending
            .iter_mut()
            .find(|p| p.subtransaction == subtransaction && p.counter == counter)
        {
            Some(p) => p.n = p.n.saturating_add(n),
            None => pending.push(Pending {
                subtransaction,
                counter,
                n,
            }),
        }
    });
}

/// Counts one at once, whatever becomes of the transaction.
pub fn count_now(counter: Counter) {
    if let Some(entry) = entry(crate::pg::database(), true) {
        entry.counts[counter.index()].fetch_add(1, Ordering::Relaxed);
    }
}

/// This database's count; None without shared memory (the library not preloaded) or without
/// an entry of its own.
pub fn read(counter: Counter) -> Option<u64> {
    // A database that counted nothing yet has no entry: its counts are zero.
    match entry(crate::pg::database(), false) {
        Some(e) => Some(e.counts[counter.index()].load(Ordering::Relaxed)),
        None if has_room() => Some(0),
        None => None,
    }
}

/// Whether a database without an entry could still take one.
fn has_room() -> bool {
    // SAFETY: SHARED is only read.
    unsafe { SHARED.load(Ordering::Acquire).as_ref() }.is_some_and(|shared| {
        shared
            .entries
            .iter()
            .any(|e| e.database.load(Ordering::Acquire) == 0)
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    // A prepared transaction may still be rolled back (ROLLBACK PREPARED): its counts are
    // dropped rather than counted before its outcome is known.
    let commit = match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT => true,
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT | XACT_EVENT_PREPARE => false,
        _ => return,
    };
    let pending = PENDING.with(|pending| {
        pending
            .try_borrow_mut()
            .map(|mut p| std::mem::take(&mut *p))
    });
    let Ok(pending) = pending else { return };
    if !commit || pending.is_empty() {
        return;
    }
    if let Some(entry) = entry(crate::pg::database(), true) {
        for p in pending {
            entry.counts[p.counter].fetch_add(p.n, Ordering::Relaxed);
        }
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    my: pg_sys::SubTransactionId,
    parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::SubXactEvent::*;
    PENDING.with(|pending| {
        let Ok(mut pending) = pending.try_borrow_mut() else {
            return;
        };
        match event {
            // A savepoint rolled back: its rows are gone, and so are its counts.
            SUBXACT_EVENT_ABORT_SUB => pending.retain(|p| p.subtransaction != my),
            // Released into its parent: the parent's now.
            SUBXACT_EVENT_COMMIT_SUB => {
                for p in pending.iter_mut().filter(|p| p.subtransaction == my) {
                    p.subtransaction = parent;
                }
            }
            _ => {}
        }
    });
}

/// Registers the transaction callbacks; called once per process from `_PG_init`.
pub fn register_callbacks() {
    // SAFETY: static functions registered once per process.
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_counter_has_its_own_place() {
        let mut all = vec![
            Counter::Signins,
            Counter::SessionExpirations,
            Counter::MfaFailures,
            Counter::MfaLockouts,
            Counter::RefreshReuse,
            Counter::RecorderRefusals,
        ];
        all.extend(Source::ALL.map(Counter::Disclosures));
        let mut places: Vec<usize> = all.iter().map(|c| c.index()).collect();
        places.sort();
        assert_eq!(places, (0..COUNTERS).collect::<Vec<_>>());
    }

    #[test]
    fn audit_rows_count_for_what_they_record() {
        assert_eq!(
            Counter::of_audit_row("mfa", "mfa_locked_out", "failure"),
            Some(Counter::MfaLockouts)
        );
        assert_eq!(
            Counter::of_audit_row("mfa", "mfa_verify", "failure"),
            Some(Counter::MfaFailures)
        );
        assert_eq!(Counter::of_audit_row("mfa", "mfa_attempt", "info"), None);
        assert_eq!(
            Counter::of_audit_row("session", "refresh_token_grace_reuse", "success"),
            None
        );
    }
}
