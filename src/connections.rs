//! Where the background processes connect (docs/ARCHITECTURE.md, "Background worker").
//! `DROP DATABASE`, `CREATE DATABASE … TEMPLATE` and `ALTER DATABASE … RENAME` need a database
//! no one is connected to: a ProcessUtility hook asks ours to leave first. And a process whose
//! database does not exist (yet, or any more) fails to connect once, then waits for the next
//! `CREATE DATABASE` instead of failing again at every restart. `ALTER EXTENSION vetassist_auth
//! UPDATE` locks the extension first, as `DROP EXTENSION` does, so it never deadlocks with our
//! processes (pg::lock_extension).

use crate::signals;
use pgrx::prelude::*;
use std::cell::Cell;
use std::ffi::CStr;
use std::sync::atomic::{AtomicI32, AtomicPtr, AtomicU32, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// A process of ours that connects to a database by name.
#[derive(Clone, Copy)]
pub enum Connector {
    Sweeper,
    /// The reserved recorder of the n-th database of `vetassist_auth.databases`.
    ReservedRecorder(usize),
}

/// The sweeper and up to 32 reserved recorders.
const CONNECTORS: usize = 33;
const NOT_MISSING: u64 = u64::MAX;
/// A database still missing is looked for again after this long anyway (one created by a
/// backend that had not loaded the library, whose CREATE DATABASE the hook did not see).
const MISSING_RECHECK: Duration = Duration::from_secs(60);

#[repr(C)]
struct Shared {
    /// Bumped when a transaction that created or renamed a database commits.
    generation: AtomicU64,
    /// Per connector: the generation at which its database could not be found, or NOT_MISSING.
    missing_at: [AtomicU64; CONNECTORS],
    /// Per connector: its latch while it waits for a database to be created.
    waiting: [AtomicPtr<pg_sys::Latch>; CONNECTORS],
    /// Every process of ours connected to a database (pid, database oid), the sweeper and the
    /// recorders: whom a DROP DATABASE asks to leave. A pid of 0 is a free entry.
    connected: [(AtomicI32, AtomicU32); PROCESSES],
}

/// The sweeper and the recorders, at most.
const PROCESSES: usize = 1 + 2 * 32;

pub const SHMEM_SIZE: usize = std::mem::size_of::<Shared>();

static SHARED: AtomicPtr<Shared> = AtomicPtr::new(std::ptr::null_mut());

/// Finds (or creates and initialises) the shared state; called by the shared-memory start-up
/// hook.
///
/// # Safety
/// Only from that hook, with AddinShmemInitLock held.
pub unsafe fn attach_shared() {
    // SAFETY: see the function's contract; the struct is initialised only by its creator.
    unsafe {
        let mut found = false;
        let shared = pg_sys::ShmemInitStruct(
            c"vetassist_auth connections".as_ptr(),
            SHMEM_SIZE,
            &mut found,
        ) as *mut Shared;
        if !found {
            shared.write(Shared {
                generation: AtomicU64::new(0),
                missing_at: std::array::from_fn(|_| AtomicU64::new(NOT_MISSING)),
                waiting: std::array::from_fn(|_| AtomicPtr::new(std::ptr::null_mut())),
                connected: std::array::from_fn(|_| (AtomicI32::new(0), AtomicU32::new(0))),
            });
        }
        SHARED.store(shared, Ordering::Release);
    }
}

fn shared() -> &'static Shared {
    // SAFETY: set at start-up whenever the library is preloaded, which our background
    // processes and the hooks below require; it lives as long as the server.
    unsafe { &*SHARED.load(Ordering::Acquire) }
}

impl Connector {
    fn index(self) -> usize {
        match self {
            Connector::Sweeper => 0,
            Connector::ReservedRecorder(n) => 1 + n.min(CONNECTORS - 2),
        }
    }
}

thread_local! {
    /// This process's connection attempt: the connector and the generation it started at;
    /// cleared once connected.
    static ATTEMPT: Cell<Option<(usize, u64)>> = const { Cell::new(None) };
}

/// Connects this background worker to `database`, also when it is closed to connections
/// (`ALLOW_CONNECTIONS false`: its maintenance and disclosures go on). When the database could
/// not be found at the last attempt and none has been created since, waits for one first.
pub fn connect(who: Connector, database: &CStr) {
    let state = shared();
    let i = who.index();
    let since = Instant::now();
    let mut generation = state.generation.load(Ordering::Acquire);
    while state.missing_at[i].load(Ordering::Acquire) == generation
        && since.elapsed() < MISSING_RECHECK
    {
        // SAFETY: this process's latch, in its PGPROC, for the hook to set.
        state.waiting[i].store(unsafe { pg_sys::MyLatch }, Ordering::Release);
        let alive = signals::sleep(MISSING_RECHECK.saturating_sub(since.elapsed()));
        state.waiting[i].store(std::ptr::null_mut(), Ordering::Release);
        if !alive {
            // SAFETY: the postmaster died; exit as every backend then does.
            unsafe { pg_sys::proc_exit(1) };
        }
        generation = state.generation.load(Ordering::Acquire);
    }
    ATTEMPT.set(Some((i, generation)));
    // SAFETY: runs at exit, the FATAL of a failed connection included, before shared memory is
    // detached.
    unsafe { pg_sys::before_shmem_exit(Some(note_missing), pg_sys::Datum::from(0)) };
    // SAFETY: connecting is the first thing a background worker does with a database.
    unsafe {
        pg_sys::BackgroundWorkerInitializeConnection(
            database.as_ptr(),
            std::ptr::null(),
            pg_sys::BGWORKER_BYPASS_ALLOWCONN,
        );
    }
    ATTEMPT.set(None);
    state.missing_at[i].store(NOT_MISSING, Ordering::Release);
    note_connected();
}

/// Records this process, now connected to its database, as one a DROP DATABASE of it asks to
/// leave; the entry is freed at exit.
pub fn note_connected() {
    // SAFETY: this process's pid and database, set once connected.
    let (pid, database) = unsafe { (pg_sys::MyProcPid, pg_sys::MyDatabaseId.to_u32()) };
    let Some(index) = shared().connected.iter().position(|(p, _)| {
        p.compare_exchange(0, pid, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }) else {
        return; // more processes than entries: such a one is not asked to leave
    };
    shared().connected[index]
        .1
        .store(database, Ordering::Release);
    // SAFETY: runs at exit, before shared memory is detached.
    unsafe { pg_sys::before_shmem_exit(Some(forget_connected), pg_sys::Datum::from(index)) };
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_connected(_code: i32, index: pg_sys::Datum) {
    let (pid, database) = &shared().connected[index.value()];
    database.store(0, Ordering::Release);
    pid.store(0, Ordering::Release);
}

/// At exit before the connection succeeded: the database is missing as of the attempt's
/// generation, so the next start waits for a new database instead of failing again.
#[pg_guard]
unsafe extern "C-unwind" fn note_missing(_code: i32, _arg: pg_sys::Datum) {
    if let Some((i, generation)) = ATTEMPT.get() {
        shared().missing_at[i].store(generation, Ordering::Release);
    }
}

static mut PREV_PROCESS_UTILITY_HOOK: pg_sys::ProcessUtility_hook_type = None;

thread_local! {
    /// Set when this transaction creates or renames a database: its commit wakes the waiters.
    static CREATED_DATABASE: Cell<bool> = const { Cell::new(false) };
}

/// Installs the ProcessUtility hook and the commit callback; called from `_PG_init` while
/// preloading (without it there are no background processes to ask).
pub fn install_hooks() {
    // SAFETY: _PG_init runs once per process, before any statement; the hook calls the one it
    // replaced.
    unsafe {
        PREV_PROCESS_UTILITY_HOOK = pg_sys::ProcessUtility_hook;
        pg_sys::ProcessUtility_hook = Some(process_utility);
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::XactEvent::XACT_EVENT_COMMIT && CREATED_DATABASE.get() {
        let state = shared();
        state.generation.fetch_add(1, Ordering::AcqRel);
        for latch in &state.waiting {
            let latch = latch.load(Ordering::Acquire);
            if !latch.is_null() {
                // SAFETY: a latch in the PGPROC of a waiting process of ours, in shared memory.
                unsafe { pg_sys::SetLatch(latch) };
            }
        }
    }
    if matches!(
        event,
        pg_sys::XactEvent::XACT_EVENT_COMMIT | pg_sys::XactEvent::XACT_EVENT_ABORT
    ) {
        CREATED_DATABASE.set(false);
    }
}

/// A statement that needs a database free of connections.
enum Needs {
    /// DROP DATABASE: the caller must own it (and its counters go with it).
    Dropped,
    /// ALTER DATABASE … RENAME: the caller must own it.
    Owned,
    /// CREATE DATABASE … TEMPLATE: the caller must be able to copy it.
    Copied,
}

/// The string value of a statement's option `name` (`WITH TEMPLATE x`, `UPDATE TO 'v'`).
///
/// # Safety
/// `options` is a parsed statement's list of DefElem.
unsafe fn option_string(
    options: *mut pg_sys::List,
    name: &[u8],
) -> Option<*const std::ffi::c_char> {
    // SAFETY: the list holds DefElems with NUL-terminated names; defGetString raises an ERROR
    // for a value that is not a string, as Postgres's own handling of the option would.
    unsafe {
        pgrx::PgList::<pg_sys::DefElem>::from_pg(options)
            .iter_ptr()
            .find(|d| CStr::from_ptr((**d).defname).to_bytes() == name)
            .map(|d| pg_sys::defGetString(d).cast_const())
    }
}

/// The database a statement needs free of connections (and how), and whether it creates one.
///
/// # Safety
/// `stmt` is a parsed utility statement.
unsafe fn database_statement(
    stmt: *mut pg_sys::Node,
) -> (Option<(*const std::ffi::c_char, Needs)>, bool) {
    // SAFETY: the node tag says which statement struct `stmt` is.
    unsafe {
        match (*stmt).type_ {
            pg_sys::NodeTag::T_DropdbStmt => (
                Some(((*(stmt as *mut pg_sys::DropdbStmt)).dbname, Needs::Dropped)),
                false,
            ),
            pg_sys::NodeTag::T_CreatedbStmt => {
                let options = (*(stmt as *mut pg_sys::CreatedbStmt)).options;
                let template = option_string(options, b"template").map(|t| (t, Needs::Copied));
                (template, true)
            }
            pg_sys::NodeTag::T_RenameStmt
                if (*(stmt as *mut pg_sys::RenameStmt)).renameType
                    == pg_sys::ObjectType::OBJECT_DATABASE =>
            {
                (
                    Some(((*(stmt as *mut pg_sys::RenameStmt)).subname, Needs::Owned)),
                    true,
                )
            }
            _ => (None, false),
        }
    }
}

/// Whether `stmt` is ALTER EXTENSION vetassist_auth UPDATE that changes the version, run by a
/// role that may update the extension. Our hook adds no lock for another role, and none for an
/// update to the version in force (a migration tool's habit at the start of every migration):
/// either would hold our processes off for nothing until its transaction ends.
///
/// # Safety
/// `stmt` is a parsed utility statement.
unsafe fn updates_the_extension(stmt: *mut pg_sys::Node) -> bool {
    // SAFETY: the node tag says which statement struct `stmt` is; option values are strings.
    let target = unsafe {
        if (*stmt).type_ != pg_sys::NodeTag::T_AlterExtensionStmt {
            return false;
        }
        let alter = stmt as *mut pg_sys::AlterExtensionStmt;
        if CStr::from_ptr((*alter).extname).to_bytes() != b"vetassist_auth" {
            return false;
        }
        option_string((*alter).options, b"new_version")
            .map(|v| CStr::from_ptr(v).to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    crate::pg::read_one::<bool>(
        "SELECT pg_catalog.pg_has_role(e.extowner, 'USAGE') \
                AND e.extversion <> coalesce(nullif($1, ''), a.default_version) \
           FROM pg_catalog.pg_extension e \
           JOIN pg_catalog.pg_available_extensions a ON a.name = e.extname \
          WHERE e.extname = 'vetassist_auth'",
        &[target.as_str().into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// The database's oid when the caller may run the statement on it (Postgres checks the same
/// again): its owner (or a superuser) for DROP and RENAME, a role with CREATEDB that owns it or
/// finds it a template for a copy. None otherwise, and inside a transaction block, where
/// Postgres refuses these statements: nobody may use a statement that fails to stop ours.
fn allowed_target(database: &CStr, needs: &Needs) -> Option<pg_sys::Oid> {
    // SAFETY: reads this backend's transaction state.
    if unsafe { pg_sys::IsTransactionBlock() } {
        return None;
    }
    let check = match needs {
        Needs::Dropped | Needs::Owned => "pg_catalog.pg_has_role(d.datdba, 'USAGE')",
        Needs::Copied => {
            "(SELECT r.rolcreatedb OR r.rolsuper FROM pg_catalog.pg_roles r WHERE r.rolname = current_user) \
             AND (d.datistemplate OR pg_catalog.pg_has_role(d.datdba, 'USAGE'))"
        }
    };
    Spi::get_one_with_args::<pg_sys::Oid>(
        &format!("SELECT d.oid FROM pg_catalog.pg_database d WHERE d.datname = $1 AND {check}"),
        &[database.to_string_lossy().as_ref().into()],
    )
    .ok()
    .flatten()
}

/// Asks our processes connected to `database` to leave (SIGTERM, as pg_terminate_backend
/// would; they are started again later). Postgres then waits for them as for any backend.
fn ask_to_leave(database: pg_sys::Oid) {
    for (pid, connected_to) in &shared().connected {
        let pid = pid.load(Ordering::Acquire);
        if pid == 0 || connected_to.load(Ordering::Acquire) != database.to_u32() {
            continue;
        }
        // As pg_terminate_backend does: only a process of this server, found in its process
        // array and connected to that database (a pid of ours that has gone may be another
        // process's by now, of this server or of another one on the machine).
        // SAFETY: BackendPidGetProc takes ProcArrayLock itself; the PGPROC it returns stays
        // valid to read (its fields may change, which makes the check fail harmlessly).
        let ours = unsafe {
            let proc = pg_sys::BackendPidGetProc(pid);
            !proc.is_null() && (*proc).databaseId == database
        };
        if ours {
            // SAFETY: a signal to a backend of this server connected to `database`.
            unsafe { libc::kill(pid, libc::SIGTERM) };
        }
    }
}

extern "C-unwind" {
    // Postgres's own, called directly: through pgrx's binding an ERROR would be caught and
    // raised again without its CONTEXT, QUERY and position, so every error of a utility
    // statement (a DO block's) would reach the log and the client without them. An ERROR
    // longjmps through `process_utility`, which holds nothing to drop across the call.
    #[link_name = "standard_ProcessUtility"]
    fn standard_process_utility(
        pstmt: *mut pg_sys::PlannedStmt,
        query_string: *const std::ffi::c_char,
        read_only_tree: bool,
        context: pg_sys::ProcessUtilityContext::Type,
        params: pg_sys::ParamListInfo,
        query_env: *mut pg_sys::QueryEnvironment,
        dest: *mut pg_sys::DestReceiver,
        qc: *mut pg_sys::QueryCompletion,
    );
}

#[pg_guard]
#[allow(clippy::too_many_arguments)]
unsafe extern "C-unwind" fn process_utility(
    pstmt: *mut pg_sys::PlannedStmt,
    query_string: *const std::ffi::c_char,
    read_only_tree: bool,
    context: pg_sys::ProcessUtilityContext::Type,
    params: pg_sys::ParamListInfo,
    query_env: *mut pg_sys::QueryEnvironment,
    dest: *mut pg_sys::DestReceiver,
    qc: *mut pg_sys::QueryCompletion,
) {
    // SAFETY: Postgres passes a planned utility statement; the names it holds live as long as
    // the statement.
    unsafe {
        let (database, creates) = database_statement((*pstmt).utilityStmt);
        let mut dropped = None;
        if let Some((name, needs)) = database.filter(|(d, _)| !d.is_null()) {
            if let Some(oid) = allowed_target(CStr::from_ptr(name), &needs) {
                ask_to_leave(oid);
                if matches!(needs, Needs::Dropped) {
                    dropped = Some(oid);
                }
            }
        }
        if creates {
            CREATED_DATABASE.set(true);
        }
        if updates_the_extension((*pstmt).utilityStmt) {
            crate::pg::lock_extension(pg_sys::AccessExclusiveLock);
        }
        match PREV_PROCESS_UTILITY_HOOK {
            Some(previous) => previous(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
            None => standard_process_utility(
                pstmt,
                query_string,
                read_only_tree,
                context,
                params,
                query_env,
                dest,
                qc,
            ),
        }
        // Dropped (an error would not have returned here): its counters go with it.
        if let Some(oid) = dropped {
            crate::counters::forget_database(oid);
        }
    }
}
