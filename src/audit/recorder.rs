//! Audit rows that outlive the caller's transaction (docs/ARCHITECTURE.md, "Records that survive
//! a rollback"): PHI and token disclosures and failed authentications. The same recorder creates
//! a purpose's first data key, so no application transaction holds key creation.
//!
//! The caller puts the row into a slot of a shared-memory outbox and waits until a recorder, a
//! background worker connected to the caller's database, has committed it in a transaction of
//! its own. Only then does the caller go on and return what it discloses. So a ROLLBACK, a
//! ROLLBACK TO SAVEPOINT, an error, a cancel or an exiting backend cannot take the row back, and
//! a crash of the whole server loses only rows whose callers never got an answer.
//!
//! One recorder runs per database while there is work, started on demand as a dynamic background
//! worker and gone after a second without any (an idle connection would keep DROP DATABASE out).
//! Without `shared_preload_libraries` there is no outbox: rows are written in the caller's
//! transaction, and `verify_installation()` says the guarantee is not in force.

use super::writer::{self, AuditRow, Who};
use crate::connections::{self, Connector};
use crate::error::{Failure, Kind, Result};
use crate::keys::{self, Purpose};
use crate::{gucs, signals};
use pgrx::bgworkers::BackgroundWorkerBuilder;
use pgrx::prelude::*;
use pgrx::Uuid;
use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::Duration;

/// Rows waiting at once, across databases, and the largest encoded row.
const SLOTS: usize = 256;
const PAYLOAD: usize = 4096;
/// Databases with a recorder at once.
const RECORDERS: usize = 32;
/// A recorder with nothing to do for this long exits.
const IDLE_EXIT: Duration = Duration::from_secs(1);
/// A recorder that was asked for but has not started after this long is asked for again.
const START_TIMEOUT_US: i64 = 10_000_000;
/// A caller gives up waiting for its row after this long (the row may still be written).
const WAIT_LIMIT_US: i64 = 10_000_000;
/// How long a recorder waits for a lock before the write fails (its caller may hold it).
const RECORDER_LOCK_TIMEOUT: &std::ffi::CStr = c"5s";

const FREE: u32 = 0;
const QUEUED: u32 = 1;
const WRITING: u32 = 2;
const FAILED: u32 = 3;

const NO_RECORDER: u32 = 0;
const STARTING: u32 = 1;
const RUNNING: u32 = 2;

#[repr(C)]
struct Slot {
    state: u32,
    database: pg_sys::Oid,
    /// The recorder writing it (WRITING): only that recorder's exit puts it back in the queue.
    writer: i32,
    ticket: u64,
    changed_at: pg_sys::TimestampTz,
    len: usize,
    payload: [u8; PAYLOAD],
}

#[repr(C)]
struct Recorder {
    database: pg_sys::Oid,
    state: u32,
    since: pg_sys::TimestampTz,
    pid: i32,
    latch: *mut pg_sys::Latch,
}

#[repr(C)]
struct Outbox {
    lock: *mut pg_sys::LWLock,
    /// Broadcast whenever a recorder has written (or failed) rows, or stopped.
    written: pg_sys::ConditionVariable,
    next_ticket: u64,
    /// Per database of `vetassist_auth.databases`: the oid its reserved recorder last ran in.
    reserved_seen: [pg_sys::Oid; RECORDERS],
    recorders: [Recorder; RECORDERS],
    slots: [Slot; SLOTS],
}

/// Set in the postmaster by the shared-memory start-up hook (and inherited by every backend);
/// null when the library was not preloaded.
static OUTBOX: AtomicPtr<Outbox> = AtomicPtr::new(std::ptr::null_mut());
const TRANCHE: &std::ffi::CStr = c"vetassist_auth recorder";

/// The outbox's size in shared memory (src/shmem.rs asks for it).
pub const SHMEM_SIZE: usize = std::mem::size_of::<Outbox>();

/// Asks for the outbox's lock; called by the shared-memory request hook.
///
/// # Safety
/// Only in the postmaster's shared-memory request phase.
pub unsafe fn request_lock() {
    // SAFETY: the caller is in the request phase, the only time this is allowed.
    unsafe { pg_sys::RequestNamedLWLockTranche(TRANCHE.as_ptr(), 1) };
}

/// Finds (or creates and initialises) the outbox; called by the shared-memory start-up hook.
///
/// # Safety
/// Only from that hook, with AddinShmemInitLock held: the struct is zeroed and initialised
/// only by whoever creates it.
pub unsafe fn attach_shared() {
    // SAFETY: see the function's contract.
    unsafe {
        let mut found = false;
        let outbox = pg_sys::ShmemInitStruct(
            c"vetassist_auth audit outbox".as_ptr(),
            SHMEM_SIZE,
            &mut found,
        ) as *mut Outbox;
        if !found {
            std::ptr::write_bytes(outbox as *mut u8, 0, SHMEM_SIZE);
            (*outbox).lock = &raw mut (*pg_sys::GetNamedLWLockTranche(TRANCHE.as_ptr())).lock;
            pg_sys::ConditionVariableInit(&raw mut (*outbox).written);
            (*outbox).next_ticket = 1;
        }
        OUTBOX.store(outbox, Ordering::Release);
    }
}

/// The outbox under its lock, held exclusively until the guard drops. Nothing that can raise
/// an ERROR runs while it is held.
struct Locked(*mut Outbox);

impl Locked {
    fn take() -> Option<Locked> {
        let outbox = OUTBOX.load(Ordering::Acquire);
        if outbox.is_null() {
            return None;
        }
        // SAFETY: the outbox lives in shared memory for the life of the server.
        unsafe { pg_sys::LWLockAcquire((*outbox).lock, pg_sys::LWLockMode::LW_EXCLUSIVE) };
        Some(Locked(outbox))
    }

    fn outbox(&mut self) -> &mut Outbox {
        // SAFETY: the lock is held, so no other process touches the outbox meanwhile.
        unsafe { &mut *self.0 }
    }
}

impl Drop for Locked {
    fn drop(&mut self) {
        // SAFETY: taken in Locked::take.
        unsafe { pg_sys::LWLockRelease((*self.0).lock) };
    }
}

fn written_cv() -> *mut pg_sys::ConditionVariable {
    // SAFETY: only called once the outbox exists; the field's address never changes.
    unsafe { &raw mut (*OUTBOX.load(Ordering::Acquire)).written }
}

fn now() -> pg_sys::TimestampTz {
    // SAFETY: reads the clock; cannot fail.
    unsafe { pg_sys::GetCurrentTimestamp() }
}

/// Whether rows written through `record` survive the caller's rollback.
pub fn in_force() -> bool {
    !OUTBOX.load(Ordering::Acquire).is_null()
}

/// What a slot asks the recorder to do: its payload's first byte.
const JOB_AUDIT_ROW: u8 = 0;
const JOB_CREATE_KEY: u8 = 1;
const JOB_ROTATE_WORN_KEY: u8 = 2;

thread_local! {
    /// Set in the recorder process: jobs run there directly.
    static IS_RECORDER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether jobs on `table` are handed to a recorder: the outbox exists, this is not the
/// recorder, and this transaction did not create the table (a recorder could not see it:
/// CREATE EXTENSION and its use in one transaction).
fn delegated(table: pg_sys::Oid) -> bool {
    in_force() && !IS_RECORDER.get() && !created_in_this_transaction(table)
}

fn created_in_this_transaction(table: pg_sys::Oid) -> bool {
    // SAFETY: the relcache entry is taken and released without a lock; only its creation
    // subtransaction is read. A table merely altered in this transaction does not count: the
    // recorder then waits for its lock, times out and the call fails (fail closed).
    unsafe {
        let rel = pg_sys::RelationIdGetRelation(table);
        if rel.is_null() {
            return false;
        }
        // InvalidSubTransactionId is 0.
        let created = (*rel).rd_createSubid != 0;
        pg_sys::RelationClose(rel);
        created
    }
}

/// Writes an audit row that the caller's rollback cannot take back, and returns once it is
/// committed. Without the outbox (library not preloaded) it is written in the caller's
/// transaction instead.
pub fn record(row: &AuditRow<'_>) -> Result<()> {
    // Before the job is queued: nothing is disclosed on a subscriber.
    crate::replica::require_primary();
    let who = Who::current();
    if !delegated(writer::log_oids().0) {
        writer::append_as(row, &who);
        return Ok(());
    }
    let mut payload = vec![JOB_AUDIT_ROW];
    encode(row, &who, &mut payload)?;
    submit(&payload).map_err(|failure| {
        failure.unwrap_or_else(|| {
            Failure::new(
                Kind::InsufficientResources,
                "vetassist_auth: the audit row could not be recorded",
            )
            .with_hint("Nothing was disclosed. The server log names the cause.")
        })
    })
}

/// Has the recorder create the first active key of a purpose in a transaction of its own, so
/// the caller holds no lock on key creation for the rest of its transaction. False when no
/// recorder can run it (the caller then creates the key itself).
pub fn create_key(purpose: Purpose) -> Result<bool> {
    crate::replica::require_primary();
    if !delegated(keys::keys_relid()) {
        return Ok(false);
    }
    match submit(&[JOB_CREATE_KEY, purpose.ordinal()]) {
        Ok(()) => Ok(true),
        Err(Some(_unavailable)) => Ok(false),
        Err(None) => Err(Failure::new(
            Kind::NotConfigured,
            "vetassist_auth: the data key could not be created",
        )
        .with_hint("The server log names the cause.")),
    }
}

/// Asks the recorder to rotate a key that reached the warning mark of its encryption budget,
/// without waiting: the caller goes on with its lease. Without a recorder, or when the outbox is
/// full, nothing happens (the caller's WARNING still says to rotate; the next lease asks again).
pub fn rotate_worn_key_soon(purpose: Purpose, key_id: u32) {
    if !delegated(keys::keys_relid()) || !crate::replica::is_primary() {
        return;
    }
    let mut payload = vec![JOB_ROTATE_WORN_KEY, purpose.ordinal()];
    payload.extend_from_slice(&key_id.to_le_bytes());
    if let Ok((slot, ticket)) = enqueue_now(&payload) {
        if wake_recorder().is_err() {
            if let Some(mut locked) = Locked::take() {
                let s = &mut locked.outbox().slots[slot];
                if s.ticket == ticket && s.state == QUEUED {
                    s.state = FREE;
                }
            }
        }
    }
}

/// Queues a job and waits until a recorder has committed it. Err(None) when the recorder ran
/// the job and it failed; Err(Some) when it could not be run at all.
fn submit(payload: &[u8]) -> std::result::Result<(), Option<Failure>> {
    let (slot, ticket) = enqueue(payload).map_err(Some)?;
    // The job is only as good as a recorder that runs it.
    if let Err(failure) = wake_recorder() {
        if let Some(mut locked) = Locked::take() {
            let s = &mut locked.outbox().slots[slot];
            if s.ticket == ticket && s.state == QUEUED {
                s.state = FREE;
            }
        }
        return Err(Some(failure));
    }
    wait_until_done(slot, ticket)
}

fn database() -> pg_sys::Oid {
    // SAFETY: set once the backend is connected; our functions run only in connected backends.
    unsafe { pg_sys::MyDatabaseId }
}

fn unavailable(message: &str) -> Failure {
    Failure::new(Kind::InsufficientResources, message.to_owned()).with_hint(
        "Nothing was disclosed. The recorder needs a free background worker slot \
         (max_worker_processes) per database in use; see verify_installation().",
    )
}

/// A job no recorder took for this long belongs to a database whose recorder cannot start
/// (dropped, refusing connections); its caller gave up long ago, disclosing nothing.
const ABANDONED_US: i64 = 3 * WAIT_LIMIT_US;
/// Most slots one database may hold, so no database can fill the outbox for the others.
const SLOTS_PER_DATABASE: usize = SLOTS / 2;

/// Takes a free slot for the job at once, if there is one (and the database is within its
/// share).
fn enqueue_now(payload: &[u8]) -> std::result::Result<(usize, u64), ()> {
    let mut locked = Locked::take().expect("the outbox exists");
    let outbox = locked.outbox();
    let t = now();
    for s in outbox.slots.iter_mut() {
        if matches!(s.state, QUEUED | FAILED) && t - s.changed_at > ABANDONED_US {
            s.state = FREE;
        }
    }
    let db = database();
    let held = outbox
        .slots
        .iter()
        .filter(|s| s.state != FREE && s.database == db)
        .count();
    if held >= SLOTS_PER_DATABASE {
        return Err(());
    }
    let i = outbox
        .slots
        .iter()
        .position(|s| s.state == FREE)
        .ok_or(())?;
    let ticket = outbox.next_ticket;
    outbox.next_ticket += 1;
    let s = &mut outbox.slots[i];
    s.state = QUEUED;
    s.database = database();
    s.ticket = ticket;
    s.changed_at = now();
    s.len = payload.len();
    s.payload[..payload.len()].copy_from_slice(payload);
    Ok((i, ticket))
}

/// Takes a free slot, waiting a while for one when every slot is in use.
fn enqueue(payload: &[u8]) -> Result<(usize, u64)> {
    let deadline = now() + WAIT_LIMIT_US;
    loop {
        if let Ok(taken) = enqueue_now(payload) {
            return Ok(taken);
        }
        if now() > deadline {
            return Err(unavailable(
                "vetassist_auth: the audit outbox is full; the audit row could not be recorded",
            ));
        }
        // SAFETY: a timed sleep on the outbox's condition variable; interrupts are checked.
        unsafe {
            pg_sys::ConditionVariableTimedSleep(written_cv(), 100, pg_sys::PG_WAIT_EXTENSION);
        }
    }
}

/// Wakes this database's recorder, or starts one when none is running (or one asked for did
/// not come up in time).
fn wake_recorder() -> Result<()> {
    let db = database();
    let (latch, start) = {
        let mut locked = Locked::take().expect("the outbox exists");
        let outbox = locked.outbox();
        let t = now();
        let index = outbox
            .recorders
            .iter()
            .position(|r| r.state != NO_RECORDER && r.database == db)
            .or_else(|| outbox.recorders.iter().position(|r| r.state == NO_RECORDER));
        let Some(index) = index else {
            return Err(unavailable(
                "vetassist_auth: too many databases are recording audit rows at once",
            ));
        };
        let reserved = outbox.reserved_seen.contains(&db);
        let r = &mut outbox.recorders[index];
        match r.state {
            RUNNING => (r.latch, false),
            STARTING if t - r.since < START_TIMEOUT_US => (std::ptr::null_mut(), false),
            // The database's reserved recorder is being started again (it always is): it takes
            // the queue then, and no dynamic one competes with parallel query for a slot.
            _ if reserved => (std::ptr::null_mut(), false),
            _ => {
                r.database = db;
                r.state = STARTING;
                r.since = t;
                r.pid = 0;
                r.latch = std::ptr::null_mut();
                (std::ptr::null_mut(), true)
            }
        }
    };
    if !latch.is_null() {
        // SAFETY: a latch in the PGPROC of a running recorder, in shared memory.
        unsafe { pg_sys::SetLatch(latch) };
    }
    if start {
        let started = BackgroundWorkerBuilder::new("vetassist_auth recorder")
            .set_type("vetassist_auth recorder")
            .set_library("vetassist_auth")
            .set_function("vetassist_auth_recorder_main")
            .set_argument(Some(pg_sys::Datum::from(db.to_u32())))
            .enable_spi_access()
            .set_restart_time(None)
            .load_dynamic();
        if started.is_err() {
            if let Some(mut locked) = Locked::take() {
                if let Some(r) = locked
                    .outbox()
                    .recorders
                    .iter_mut()
                    .find(|r| r.state == STARTING && r.database == db)
                {
                    r.state = NO_RECORDER;
                }
            }
            return Err(unavailable(
                "vetassist_auth: no background worker slot is free for the audit recorder",
            ));
        }
    }
    Ok(())
}

enum Progress {
    Written,
    Failed,
    Pending,
}

/// Sleeps until the recorder has committed the job (or failed to), starting a recorder again
/// should the one that was to run it have stopped.
fn wait_until_done(slot: usize, ticket: u64) -> std::result::Result<(), Option<Failure>> {
    let deadline = now() + WAIT_LIMIT_US;
    PgTryBuilder::new(|| loop {
        let progress = {
            let mut locked = Locked::take().expect("the outbox exists");
            let s = &mut locked.outbox().slots[slot];
            if s.ticket != ticket || s.state == FREE {
                Progress::Written
            } else if s.state == FAILED {
                s.state = FREE;
                Progress::Failed
            } else {
                Progress::Pending
            }
        };
        match progress {
            Progress::Written => return Ok(()),
            Progress::Failed => return Err(None),
            Progress::Pending if now() > deadline => {
                return Err(Some(unavailable(
                    "vetassist_auth: the audit recorder did not run in time",
                )))
            }
            Progress::Pending => wake_recorder().map_err(Some)?,
        }
        // SAFETY: a timed sleep on the outbox's condition variable; interrupts are checked.
        unsafe {
            pg_sys::ConditionVariableTimedSleep(written_cv(), 100, pg_sys::PG_WAIT_EXTENSION);
        }
    })
    .finally(|| {
        // SAFETY: ends the sleep begun above, on success and on error alike.
        unsafe { pg_sys::ConditionVariableCancelSleep() };
    })
    .execute()
}

// ---------------------------------------------------------------------------------------------
// Encoding: a row and who stands behind it, as length-prefixed fields.

struct Writer(Vec<u8>);

impl Writer {
    fn field(&mut self, bytes: Option<&[u8]>) {
        match bytes {
            Some(b) => {
                self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
                self.0.extend_from_slice(b);
            }
            None => self.0.extend_from_slice(&u32::MAX.to_le_bytes()),
        }
    }
}

struct Reader<'a>(&'a [u8]);

impl<'a> Reader<'a> {
    fn field(&mut self) -> Option<&'a [u8]> {
        let (len, rest) = self.0.split_at(4);
        let len = u32::from_le_bytes(len.try_into().expect("4 bytes"));
        if len == u32::MAX {
            self.0 = rest;
            return None;
        }
        let (value, rest) = rest.split_at(len as usize);
        self.0 = rest;
        Some(value)
    }

    fn text(&mut self) -> Option<&'a str> {
        self.field()
            .map(|b| std::str::from_utf8(b).expect("written from a &str"))
    }

    fn uuid(&mut self) -> Option<Uuid> {
        self.field()
            .map(|b| Uuid::from_bytes(b.try_into().expect("16 bytes")))
    }
}

fn encode(row: &AuditRow<'_>, who: &Who, out: &mut Vec<u8>) -> Result<()> {
    let mut w = Writer(std::mem::take(out));
    w.field(Some(row.category.as_bytes()));
    w.field(Some(row.event_type.as_bytes()));
    w.field(Some(row.outcome.as_bytes()));
    w.field(
        row.subject_user_id
            .as_ref()
            .map(|u| u.as_bytes().as_slice()),
    );
    w.field(row.target_table.map(str::as_bytes));
    w.field(row.target_id.map(str::as_bytes));
    // SAFETY: details is a detoasted jsonb datum; VARSIZE_ANY covers its whole varlena.
    let details = row.details.map(|d| unsafe {
        let ptr = d.cast_mut_ptr::<pg_sys::varlena>();
        std::slice::from_raw_parts(ptr as *const u8, pgrx::varsize_any(ptr))
    });
    w.field(details);
    w.field(who.actor.as_ref().map(|u| u.as_bytes().as_slice()));
    w.field(who.session.as_ref().map(|u| u.as_bytes().as_slice()));
    w.field(who.ip_hash.as_deref());
    w.field(Some(who.db_role.as_bytes()));
    if w.0.len() > PAYLOAD {
        return Err(Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: audit details are too large to record",
        ));
    }
    *out = w.0;
    Ok(())
}

/// Runs one job in the current transaction.
fn run_job(payload: &[u8]) {
    match payload.split_first() {
        Some((&JOB_AUDIT_ROW, row)) => write_encoded(row),
        Some((&JOB_CREATE_KEY, [ordinal])) => {
            if let Err(failure) = keys::create_active_key(Purpose::from_ordinal(*ordinal)) {
                failure.raise();
            }
        }
        Some((&JOB_ROTATE_WORN_KEY, [ordinal, id @ ..])) => {
            let id = u32::from_le_bytes(id.try_into().expect("a key id"));
            if let Err(failure) = keys::rotate_worn_key(Purpose::from_ordinal(*ordinal), id) {
                failure.raise();
            }
        }
        _ => pgrx::error!("vetassist_auth recorder: unknown job"),
    }
}

/// Writes one encoded row in the current transaction.
fn write_encoded(payload: &[u8]) {
    let mut r = Reader(payload);
    let category = r.text().unwrap_or_default();
    let event_type = r.text().unwrap_or_default();
    let outcome = r.text().unwrap_or_default();
    let subject_user_id = r.uuid();
    let target_table = r.text();
    let target_id = r.text();
    // SAFETY: a palloc'd copy of the jsonb varlena the caller encoded; it lives to the end of
    // the transaction's memory context, past the insert.
    let details = r.field().map(|bytes| unsafe {
        let copy = pg_sys::palloc(bytes.len()) as *mut u8;
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), copy, bytes.len());
        pg_sys::Datum::from(copy)
    });
    let who = Who {
        actor: r.uuid(),
        session: r.uuid(),
        ip_hash: r.field().map(<[u8]>::to_vec),
        db_role: r.text().unwrap_or_default().to_owned(),
    };
    let row = AuditRow {
        category,
        event_type,
        outcome,
        subject_user_id,
        target_table,
        target_id,
        changed_columns: None,
        details,
    };
    writer::append_as(&row, &who);
}

// ---------------------------------------------------------------------------------------------
// The recorder: one background worker per database with rows to write.

/// Forgets this process as its database's recorder, puts back rows it had taken but not
/// written, and wakes the waiters so they start another recorder if need be.
#[pg_guard]
unsafe extern "C-unwind" fn recorder_exit(_code: i32, _arg: pg_sys::Datum) {
    // SAFETY: MyProcPid is this process's pid; the outbox exists (the recorder needs it).
    let pid = unsafe { pg_sys::MyProcPid };
    if let Some(mut locked) = Locked::take() {
        let outbox = locked.outbox();
        for r in outbox.recorders.iter_mut().filter(|r| r.pid == pid) {
            r.state = NO_RECORDER;
            r.pid = 0;
            r.latch = std::ptr::null_mut();
        }
        for s in outbox
            .slots
            .iter_mut()
            .filter(|s| s.state == WRITING && s.writer == pid)
        {
            s.state = QUEUED;
            s.writer = 0;
        }
    }
    // SAFETY: the outbox exists.
    unsafe { pg_sys::ConditionVariableBroadcast(written_cv()) };
}

/// Takes this database's queued rows (marking them WRITING); frees failed slots no waiter
/// collected. Returns the slots and their payloads.
fn take_queued() -> Vec<(usize, u64, Vec<u8>)> {
    let db = database();
    // SAFETY: this process's pid.
    let pid = unsafe { pg_sys::MyProcPid };
    let mut locked = Locked::take().expect("the outbox exists");
    let t = now();
    let mut taken = Vec::new();
    for (i, s) in locked.outbox().slots.iter_mut().enumerate() {
        if s.database != db {
            continue;
        }
        if s.state == QUEUED {
            s.state = WRITING;
            s.writer = pid;
            taken.push((i, s.ticket, s.payload[..s.len].to_vec()));
        } else if s.state == FAILED && t - s.changed_at > WAIT_LIMIT_US {
            s.state = FREE;
        }
    }
    taken
}

/// Runs `write` in a transaction of its own; false (and the error in the log) when it fails.
fn in_transaction(write: impl FnOnce() + std::panic::UnwindSafe) -> bool {
    // SAFETY: the recorder runs one transaction at a time, outside any other.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::XactIsoLevel = pg_sys::XACT_READ_COMMITTED as i32;
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let ok = PgTryBuilder::new(|| {
        write();
        true
    })
    .catch_others(|caught| {
        let message = match &caught {
            pg_sys::panic::CaughtError::PostgresError(report)
            | pg_sys::panic::CaughtError::ErrorReport(report)
            | pg_sys::panic::CaughtError::RustPanic {
                ereport: report, ..
            } => report.message().to_owned(),
        };
        pgrx::log!("vetassist_auth recorder: a job failed: {message}");
        false
    })
    .execute();
    // SAFETY: ends the transaction begun above, committing or rolling back.
    unsafe {
        if ok {
            pg_sys::PopActiveSnapshot();
            pg_sys::CommitTransactionCommand();
        } else {
            pg_sys::AbortCurrentTransaction();
        }
    }
    ok
}

/// Marks slots written (free) or failed, and wakes the waiters.
fn settle(slots: &[(usize, u64)], state: u32) {
    {
        let mut locked = Locked::take().expect("the outbox exists");
        let t = now();
        for &(i, ticket) in slots {
            let s = &mut locked.outbox().slots[i];
            if s.ticket == ticket && s.state == WRITING {
                s.state = state;
                s.changed_at = t;
            }
        }
    }
    // SAFETY: the outbox exists.
    unsafe { pg_sys::ConditionVariableBroadcast(written_cv()) };
}

/// Claims this database's recorder entry; false when another recorder already runs for it.
fn claim_entry(reserved: Option<usize>) -> bool {
    let db = database();
    let mut locked = Locked::take().expect("the outbox exists");
    let outbox = locked.outbox();
    // By the database's place in the list: a database dropped and created again (a new oid)
    // takes its old place.
    if let Some(seen) = reserved.and_then(|index| outbox.reserved_seen.get_mut(index)) {
        *seen = db;
    }
    if outbox
        .recorders
        .iter()
        .any(|r| r.state == RUNNING && r.database == db)
    {
        return false;
    }
    let index = outbox
        .recorders
        .iter()
        .position(|r| r.state == STARTING && r.database == db)
        .or_else(|| outbox.recorders.iter().position(|r| r.state == NO_RECORDER));
    let Some(index) = index else { return false };
    let r = &mut outbox.recorders[index];
    r.database = db;
    r.state = RUNNING;
    r.since = now();
    // SAFETY: this process's pid and latch (in its PGPROC, in shared memory).
    unsafe {
        r.pid = pg_sys::MyProcPid;
        r.latch = pg_sys::MyLatch;
    }
    true
}

/// Leaves when nothing is queued for this database; false when something is.
fn release_entry_if_idle() -> bool {
    let db = database();
    let mut locked = Locked::take().expect("the outbox exists");
    let outbox = locked.outbox();
    if outbox
        .slots
        .iter()
        .any(|s| s.state == QUEUED && s.database == db)
    {
        return false;
    }
    // SAFETY: this process's pid.
    let pid = unsafe { pg_sys::MyProcPid };
    for r in outbox.recorders.iter_mut().filter(|r| r.pid == pid) {
        r.state = NO_RECORDER;
        r.pid = 0;
        r.latch = std::ptr::null_mut();
    }
    true
}

/// A resident recorder's argument: this bit and its database's place in
/// `vetassist_auth.databases`; a dynamic recorder's is its database's oid.
const RESIDENT: u64 = 1 << 32;

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn vetassist_auth_recorder_main(arg: pg_sys::Datum) {
    signals::attach();
    let resident = arg.value() as u64 & RESIDENT != 0;
    // A database that no longer accepts connections may still have sessions whose rows must
    // be written.
    if resident {
        let index = (arg.value() as u64 & !RESIDENT) as usize;
        let databases = gucs::recorder_databases();
        connections::connect(Connector::ReservedRecorder(index), &databases[index]);
    } else {
        // SAFETY: connecting is the first thing a background worker does.
        unsafe {
            pg_sys::BackgroundWorkerInitializeConnectionByOid(
                pg_sys::Oid::from(arg.value() as u32),
                pg_sys::InvalidOid,
                pg_sys::BGWORKER_BYPASS_ALLOWCONN,
            );
        }
        connections::note_connected();
    }
    IS_RECORDER.set(true);
    // SAFETY: registered once, after connecting; runs at exit (FATAL included) before
    // shared memory is detached.
    unsafe { pg_sys::before_shmem_exit(Some(recorder_exit), pg_sys::Datum::from(0)) };
    // A reserved recorder that finds a dynamic one at work waits for it to leave: it must not
    // exit with status 0, which would unregister it for good.
    let reserved_index = resident.then_some((arg.value() as u64 & !RESIDENT) as usize);
    while !claim_entry(reserved_index) {
        if !resident {
            return;
        }
        signals::sleep(Duration::from_millis(200));
    }
    // The recorder runs as a superuser in a database whose owner may have set anything for it
    // (ALTER DATABASE ... SET): a row is committed only once it is durable; a caller holding a
    // lock the write needs must not hang it for ever.
    signals::pin_settings(&[
        (c"synchronous_commit", c"on"),
        (c"lock_timeout", RECORDER_LOCK_TIMEOUT),
        (c"default_transaction_read_only", c"off"),
    ]);
    let mut idle_since = std::time::Instant::now();
    loop {
        let batch = take_queued();
        // Between batches, not only when idle: under constant load a key created after a
        // master key change must be wrapped under the new key. Checked after taking the batch,
        // so a job queued after a reload's signal always runs with the reloaded settings.
        if signals::reload_asked() {
            // A new master key file, among others.
            // SAFETY: between transactions, as every backend reloads.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
        if batch.is_empty() {
            // A stop (SIGTERM) ends the process in signals::sleep; the rows it had taken go
            // back to the queue (recorder_exit). A reserved recorder stays.
            if !resident && idle_since.elapsed() >= IDLE_EXIT && release_entry_if_idle() {
                break;
            }
            if !signals::sleep(Duration::from_millis(200)) {
                break; // postmaster death
            }
            continue;
        }
        let slots: Vec<(usize, u64)> = batch.iter().map(|(i, t, _)| (*i, *t)).collect();
        if in_transaction(|| batch.iter().for_each(|(_, _, p)| run_job(p))) {
            settle(&slots, FREE);
        } else {
            // One at a time, so one bad job fails alone.
            for (i, ticket, payload) in &batch {
                let ok = in_transaction(|| run_job(payload));
                settle(&[(*i, *ticket)], if ok { FREE } else { FAILED });
            }
        }
        idle_since = std::time::Instant::now();
    }
    if resident {
        // Status 1 asks the postmaster to start it again (it starts none during a shutdown).
        // SAFETY: proc_exit runs the exit callbacks and does not return.
        unsafe { pg_sys::proc_exit(1) };
    }
}

/// Registers a reserved recorder for each database of `vetassist_auth.databases` while the
/// library is preloaded: always running, so those databases never wait for a recorder to start
/// and never compete for a worker slot with parallel queries (a registered worker keeps its
/// slot across restarts).
pub fn register_reserved() {
    for index in 0..gucs::recorder_databases().len() {
        BackgroundWorkerBuilder::new("vetassist_auth reserved recorder")
            .set_type("vetassist_auth reserved recorder")
            .set_library("vetassist_auth")
            .set_function("vetassist_auth_recorder_main")
            .set_argument(Some(pg_sys::Datum::from(RESIDENT | index as u64)))
            .enable_spi_access()
            .set_restart_time(Some(Duration::from_secs(1)))
            .load();
    }
}

/// How long verify_installation waits for a reserved recorder that has not run yet (it starts
/// with the server).
const RESERVED_START_US: i64 = 10_000_000;

/// Whether this database's reserved recorder has run since the server started, waiting a while
/// for one that should but has not yet.
fn reserved_recorder_ran() -> bool {
    let db = database();
    let deadline = now() + RESERVED_START_US;
    loop {
        let seen = {
            let mut locked = Locked::take().expect("the outbox exists");
            locked.outbox().reserved_seen.contains(&db)
        };
        if seen || now() > deadline {
            return seen;
        }
        // SAFETY: a timed sleep on the outbox's condition variable; interrupts are checked.
        unsafe {
            pg_sys::ConditionVariableTimedSleep(written_cv(), 100, pg_sys::PG_WAIT_EXTENSION);
        }
    }
}

/// The check of releases before 0.2.0, whose verify_installation calls it until ALTER EXTENSION
/// UPDATE: NULL when the rows survive a rollback, else why not. Not in the current SQL.
#[pg_extern(sql = false)]
fn durable_audit_problem() -> Option<&'static str> {
    durable_audit_state()
        .find(|(ok, _)| !ok)
        .map(|(_, detail)| detail)
}

/// Whether audit rows of disclosures and failed authentications survive the caller's rollback
/// and can be recorded at all, for verify_installation: `ok` false when not; `detail` says how
/// they are recorded, or why not. Internal.
#[pg_extern]
fn durable_audit_state() -> TableIterator<'static, (name!(ok, bool), name!(detail, &'static str))> {
    let state = if !in_force() {
        (
            false,
            "vetassist_auth is not in shared_preload_libraries: disclosure and failed-authentication \
             audit rows are written in the caller's transaction and a ROLLBACK removes them",
        )
    } else if !reserved_here() {
        (
            true,
            "recorded by an audit recorder started on demand, committed before the caller goes on; \
             no recorder is reserved for this database, so it competes with parallel query for \
             max_worker_processes (name the database in vetassist_auth.databases)",
        )
    } else if reserved_recorder_ran() {
        (
            true,
            "recorded by this database's reserved recorder, committed before the caller goes on",
        )
    } else {
        (
            false,
            "this database's reserved recorder is not running: max_worker_processes is too small \
             for the background workers of shared_preload_libraries (the server log says \"too \
             many background workers\"), so disclosures fail with 53000 when no slot is free",
        )
    };
    TableIterator::once(state)
}

/// Whether this database is one of `vetassist_auth.databases`.
fn reserved_here() -> bool {
    // SAFETY: the current database's name from the syscache, palloc'd; NULL when it is gone.
    let name = unsafe { pg_sys::get_database_name(database()) };
    // SAFETY: a NUL-terminated string just returned, when not NULL.
    !name.is_null()
        && gucs::recorder_databases()
            .iter()
            .any(|d| d.as_c_str() == unsafe { CStr::from_ptr(name) })
}

/// Like write_audit, but the row survives whatever becomes of the caller's transaction: it is
/// committed by the recorder before this returns. For PHI and token disclosures and failed
/// authentications. Internal: not granted to any role.
#[pg_extern]
fn write_audit_durably(
    category: &str,
    event_type: &str,
    outcome: &str,
    subject_user_id: default!(Option<Uuid>, "NULL"),
    target_table: default!(Option<&str>, "NULL"),
    target_id: default!(Option<&str>, "NULL"),
    details: default!(Option<writer::JsonbDatum>, "'{}'"),
) {
    crate::citus::require_coordinator();
    writer::check_outcome(outcome);
    let row = AuditRow {
        category,
        event_type,
        outcome,
        subject_user_id,
        target_table,
        target_id,
        changed_columns: None,
        details: details.map(|d| d.datum()),
    };
    if let Err(failure) = record(&row) {
        failure.raise();
    }
}
