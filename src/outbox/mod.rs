//! The outbox (docs/ARCHITECTURE.md, "Records that survive a rollback"): jobs that must commit
//! in a transaction of their own, before the caller goes on, so that a ROLLBACK, an error, a
//! cancel or an exiting backend cannot take them back. The caller puts a job into a slot of
//! shared memory and waits until a recorder, a background worker connected to the caller's
//! database, has committed it. Each job's owner registers what runs it: audit rows
//! (audit/recorder.rs) and key jobs (key_jobs.rs).
//!
//! One recorder runs per database while there is work, started on demand as a dynamic background
//! worker and gone after a second without any (an idle connection would keep DROP DATABASE out);
//! the databases of `vetassist_auth.databases` have a reserved one (worker.rs). Without
//! `shared_preload_libraries` there is no outbox, and the owners do the work in the caller's
//! transaction.

use crate::connections::{self, Connector};
use crate::error::{Failure, Kind, Result};
use crate::{gucs, signals};
use pgrx::bgworkers::BackgroundWorkerBuilder;
use pgrx::prelude::*;
use pgrx::Uuid;
use std::ffi::CStr;
use std::sync::atomic::{AtomicPtr, Ordering};
use std::time::Duration;

mod worker;
pub use worker::{register_reserved, reserved_here, reserved_recorder_ran};

/// Rows waiting at once, across databases, and the largest encoded row.
const SLOTS: usize = 256;
pub const PAYLOAD: usize = 4096;
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

/// Whether jobs handed to the outbox commit before their caller goes on.
pub fn in_force() -> bool {
    !OUTBOX.load(Ordering::Acquire).is_null()
}

thread_local! {
    /// Set in the recorder process: jobs run there directly.
    static IS_RECORDER: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether jobs on `table` are handed to a recorder: the outbox exists, this is not the
/// recorder, and this transaction did not create the table (a recorder could not see it:
/// CREATE EXTENSION and its use in one transaction).
pub fn delegated(table: pg_sys::Oid) -> bool {
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

/// What a slot asks the recorder to do: its payload's first byte. Each job's owner registers
/// what runs it (`register`) when the library loads.
#[derive(Clone, Copy)]
pub enum Job {
    /// An audit row that must outlive the caller's transaction (audit/recorder.rs).
    AuditRow = 0,
    /// A purpose's first data key (key_jobs.rs).
    CreateKey = 1,
    /// A key at the warning mark of its encryption budget (key_jobs.rs).
    RotateWornKey = 2,
    /// The first use of a master key load in a database, put on record (key_jobs.rs).
    RecordKeyCustody = 3,
}

const JOBS: usize = 4;

/// What runs a job, given the bytes its owner queued after the job's number.
pub type Runner = fn(&[u8]);

static RUNNERS: [std::sync::OnceLock<Runner>; JOBS] = [const { std::sync::OnceLock::new() }; JOBS];

/// Registers what runs a job (in the recorder, in a transaction of its own; an ERROR fails it).
pub fn register(job: Job, run: Runner) {
    // Once per process, from _PG_init: a second registration (there is none) changes nothing.
    let _ = RUNNERS[job as usize].set(run);
}

/// Runs one job in the current transaction.
fn run_job(payload: &[u8]) {
    match payload.split_first() {
        Some((&job, body)) => match RUNNERS.get(usize::from(job)).and_then(|r| r.get()) {
            Some(run) => run(body),
            None => pgrx::error!("vetassist_auth recorder: unknown job"),
        },
        None => pgrx::error!("vetassist_auth recorder: empty job"),
    }
}

/// Queues a job without waiting for it: the caller goes on. Nothing happens when no recorder
/// can take it (the outbox is full, no slot for a recorder).
pub fn queue_without_waiting(job: Job, body: &[u8]) {
    if let Ok((slot, ticket)) = enqueue_now(&job_payload(job, body)) {
        if wake_recorder().is_err() {
            withdraw(slot, ticket);
        }
    }
}

/// Queues a job and waits until a recorder has committed it. Err(None) when the recorder ran
/// the job and it failed; Err(Some) when it could not be run at all.
pub fn submit(job: Job, body: &[u8]) -> std::result::Result<(), Option<Failure>> {
    let (slot, ticket) = enqueue(&job_payload(job, body)).map_err(Some)?;
    // The job is only as good as a recorder that runs it.
    if let Err(failure) = wake_recorder() {
        withdraw(slot, ticket);
        return Err(Some(failure));
    }
    wait_until_done(slot, ticket)
}

/// A slot's payload: the job's number, then what its owner queued.
fn job_payload(job: Job, body: &[u8]) -> Vec<u8> {
    let mut payload = Vec::with_capacity(1 + body.len());
    payload.push(job as u8);
    payload.extend_from_slice(body);
    payload
}

/// Frees a slot no recorder will run (none could be woken), unless one has taken it already.
fn withdraw(slot: usize, ticket: u64) {
    if let Some(mut locked) = Locked::take() {
        let s = &mut locked.outbox().slots[slot];
        if s.ticket == ticket && s.state == QUEUED {
            s.state = FREE;
        }
    }
}

pub(crate) use crate::pg::database;

/// A refusal to take a job (fail closed: nothing is disclosed), counted for metrics() at once:
/// the caller's transaction fails with it.
fn unavailable(message: &str) -> Failure {
    crate::counters::count_now(crate::counters::Counter::RecorderRefusals);
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

/// This database's jobs in the outbox (queued or being written), and for how many microseconds
/// the oldest queued one has waited; None without the outbox.
pub fn queue_state() -> Option<(usize, i64)> {
    let mut locked = Locked::take()?;
    let outbox = locked.outbox();
    let (db, t) = (database(), now());
    let mine = || outbox.slots.iter().filter(|s| s.database == db);
    let depth = mine()
        .filter(|s| matches!(s.state, QUEUED | WRITING))
        .count();
    let oldest = mine()
        .filter(|s| s.state == QUEUED)
        .map(|s| t - s.changed_at)
        .max()
        .unwrap_or(0);
    Some((depth, oldest))
}

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
// Encoding: a job's fields, length-prefixed.

/// Writes a job's fields, each length-prefixed (a NULL is a length of u32::MAX).
pub struct Writer(pub Vec<u8>);

impl Writer {
    pub fn field(&mut self, bytes: Option<&[u8]>) {
        match bytes {
            Some(b) => {
                self.0.extend_from_slice(&(b.len() as u32).to_le_bytes());
                self.0.extend_from_slice(b);
            }
            None => self.0.extend_from_slice(&u32::MAX.to_le_bytes()),
        }
    }
}

/// Reads the fields a Writer wrote, in the same order.
pub struct Reader<'a>(pub &'a [u8]);

impl<'a> Reader<'a> {
    pub fn field(&mut self) -> Option<&'a [u8]> {
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

    pub fn text(&mut self) -> Option<&'a str> {
        self.field()
            .map(|b| std::str::from_utf8(b).expect("written from a &str"))
    }

    pub fn uuid(&mut self) -> Option<Uuid> {
        self.field()
            .map(|b| Uuid::from_bytes(b.try_into().expect("16 bytes")))
    }
}
