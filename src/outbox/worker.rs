//! The recorder: the background worker that runs the outbox's jobs of one database, started on
//! demand or reserved for a database of `vetassist_auth.databases`.

use super::*;

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

/// Runs `write` in a transaction of its own, which holds the extension first so that a DROP
/// EXTENSION waits for it rather than deadlocking (pg::lock_extension); false (and the error in
/// the log) when it fails.
fn in_transaction(write: impl FnOnce() + std::panic::UnwindSafe) -> bool {
    // SAFETY: the recorder runs one transaction at a time, outside any other.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::StartTransactionCommand();
        pg_sys::XactIsoLevel = pg_sys::XACT_READ_COMMITTED as i32;
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    let ok = PgTryBuilder::new(|| {
        if !crate::pg::lock_extension(pg_sys::AccessShareLock) {
            pgrx::error!("the extension is not installed in this database");
        }
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
pub fn reserved_recorder_ran() -> bool {
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

/// Whether this database is one of `vetassist_auth.databases`.
pub fn reserved_here() -> bool {
    // SAFETY: the current database's name from the syscache, palloc'd; NULL when it is gone.
    let name = unsafe { pg_sys::get_database_name(database()) };
    // SAFETY: a NUL-terminated string just returned, when not NULL.
    !name.is_null()
        && gucs::recorder_databases()
            .iter()
            .any(|d| d.as_c_str() == unsafe { CStr::from_ptr(name) })
}
