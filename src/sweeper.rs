//! The sweeper: a background worker that expires and purges sessions, seals the audit log,
//! refreshes key counters and logs the chain head (docs/ARCHITECTURE.md, "Background worker").

use crate::connections::{self, Connector};
use crate::{gucs, signals};
use pgrx::bgworkers::BackgroundWorkerBuilder;
use pgrx::prelude::*;
use std::time::Duration;

/// How soon Postgres starts the sweeper again after it stopped.
pub const RESTART_AFTER: Duration = Duration::from_secs(10);

/// Registers the sweeper when the library is preloaded and a database is configured.
pub fn register() {
    if gucs::string_setting(&gucs::SWEEP_DATABASE).is_none() {
        return;
    }
    BackgroundWorkerBuilder::new("vetassist_auth sweeper")
        .set_type("vetassist_auth sweeper")
        .set_function("vetassist_auth_sweeper_main")
        .set_library("vetassist_auth")
        .enable_spi_access()
        // Postgres starts the worker again this long after it exits with status 1, which it does
        // whenever it is stopped (pg_terminate_backend included); only a server shutdown, which
        // restarts no worker, ends it for good.
        .set_restart_time(Some(RESTART_AFTER))
        .load();
}

fn message_of(caught: &pg_sys::panic::CaughtError) -> String {
    use pg_sys::panic::CaughtError::*;
    match caught {
        PostgresError(report)
        | ErrorReport(report)
        | RustPanic {
            ereport: report, ..
        } => report.message().to_owned(),
    }
}

/// One maintenance pass in its own transaction; an error is logged, rolled back, and the next
/// pass runs as usual.
fn run_in_transaction<T: FromDatum + IntoDatum + Default>(what: &str, sql: &str) -> Option<T> {
    in_transaction(what, sql, || {
        Spi::get_one::<T>(sql)
            .map(Option::unwrap_or_default)
            .map_err(|e| e.to_string())
    })
}

/// Runs `work` in a transaction of its own that holds the extension first (pg::lock_extension),
/// shown in pg_stat_activity as `activity`; None without the extension, and an error is logged
/// and rolled back.
fn in_transaction<T>(
    what: &str,
    activity: &str,
    work: impl FnOnce() -> Result<T, String> + std::panic::UnwindSafe,
) -> Option<T> {
    // What the sweeper is doing shows in pg_stat_activity, as a backend's statement would.
    let statement = std::ffi::CString::new(activity).expect("our statements hold no NUL");
    // SAFETY: the worker runs one transaction at a time, outside any other; the isolation level
    // is set before the first snapshot, as SET TRANSACTION would. pgstat copies the statement.
    unsafe {
        pg_sys::SetCurrentStatementStartTimestamp();
        pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_RUNNING, statement.as_ptr());
        pg_sys::StartTransactionCommand();
        // Whatever default_transaction_isolation says: the sweep and the sealer work on fresh
        // snapshots, one per statement.
        pg_sys::XactIsoLevel = pg_sys::XACT_READ_COMMITTED as i32;
        pg_sys::PushActiveSnapshot(pg_sys::GetTransactionSnapshot());
    }
    // Without the extension there is nothing to do, and nothing to report.
    let outcome = PgTryBuilder::new(|| {
        crate::pg::lock_extension(pg_sys::AccessShareLock)
            .then(work)
            .transpose()
    })
    .catch_others(|caught| Err(message_of(&caught)))
    .execute();
    match outcome {
        Ok(changed) => {
            // SAFETY: pops the snapshot pushed above and commits the transaction started above.
            unsafe {
                pg_sys::PopActiveSnapshot();
                pg_sys::CommitTransactionCommand();
                pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
            }
            changed
        }
        Err(message) => {
            // SAFETY: the caught error left the transaction started above in an aborted state;
            // this cleans it up, snapshot included, as the top-level error handler would.
            unsafe {
                pg_sys::AbortCurrentTransaction();
                pg_sys::pgstat_report_activity(pg_sys::BackendState::STATE_IDLE, std::ptr::null());
            }
            pgrx::warning!("vetassist_auth sweeper: {what} failed: {message}");
            None
        }
    }
}

/// Whether the sweeper may write in its database now.
enum Readiness {
    Ready,
    /// The extension is missing, or holds neither a data key nor an audit row yet.
    NotYet,
    /// pg_restore is connected (the oldest such session, and for how many seconds).
    Restoring {
        pid: i32,
        seconds: i64,
    },
}

/// Nothing of ours may ever make a restore fail, so a pass writes nothing while the extension is
/// missing, while pg_restore is connected as a role that can restore (a superuser or the
/// database's owner: the application, which can name itself anything, cannot hold the sweeper
/// off), or while the extension holds neither a data key nor an audit row: a fresh install waits
/// for its first caller, and a restore's data section brings both.
fn readiness() -> Readiness {
    in_transaction(
        "readiness check",
        "vetassist_auth sweeper: readiness check",
        || {
            if let Some((pid, seconds)) =
                crate::replica::restore_session().map_err(|e| e.to_string())?
            {
                return Ok(Readiness::Restoring { pid, seconds });
            }
            Spi::get_one::<bool>(
                "SELECT EXISTS (SELECT 1 FROM vetassist_auth.keys) \
                     OR EXISTS (SELECT 1 FROM vetassist_auth.audit_log)",
            )
            .map(|ready| {
                if ready == Some(true) {
                    Readiness::Ready
                } else {
                    Readiness::NotYet
                }
            })
            .map_err(|e| e.to_string())
        },
    )
    .unwrap_or(Readiness::NotYet)
}

/// How often a pause for pg_restore is reported again while it lasts: a session that only calls
/// itself pg_restore (as the database owner) must not stop the sealing unseen.
const RESTORE_REPORT_EVERY: i64 = 600;

/// Logs a pause for pg_restore when it starts, again every RESTORE_REPORT_EVERY seconds as a
/// WARNING, and its end; `reported` is how long the pause had lasted at the last report.
fn report_restore_pause(readiness: &Readiness, reported: &mut Option<i64>, database: &str) {
    match (readiness, *reported) {
        (Readiness::Restoring { pid, seconds }, None) => {
            pgrx::log!(
                "vetassist_auth sweeper: pg_restore (pid {pid}) is connected to database {database}; \
                 maintenance waits until it ends"
            );
            *reported = Some(*seconds);
        }
        (Readiness::Restoring { pid, seconds }, Some(last))
            if *seconds >= last + RESTORE_REPORT_EVERY =>
        {
            pgrx::warning!(
                "vetassist_auth sweeper: maintenance of database {database} has waited {} minutes \
                 for pg_restore (pid {pid}); the audit log is not sealed meanwhile",
                seconds / 60
            );
            *reported = Some(*seconds);
        }
        (Readiness::Restoring { .. }, Some(_)) => {}
        (_, Some(_)) => {
            pgrx::log!(
                "vetassist_auth sweeper: pg_restore has left database {database}; maintenance resumes"
            );
            *reported = None;
        }
        (_, None) => {}
    }
}

#[pg_guard]
#[unsafe(no_mangle)]
pub extern "C-unwind" fn vetassist_auth_sweeper_main(_arg: pg_sys::Datum) {
    signals::attach();
    // Maintenance yields the CPU to backends serving requests: a big sweep must not slow
    // down touch_session on a busy server.
    // SAFETY: nice() changes only this process's scheduling priority.
    unsafe { libc::nice(10) };
    let Some(database) = gucs::string_setting(&gucs::SWEEP_DATABASE) else {
        return; // registered only when it is set
    };
    connections::connect(Connector::Sweeper, database);
    let database = database.to_string_lossy().into_owned();
    // DROP EXTENSION never deadlocks with a pass (pg::lock_extension). In a deadlock with an
    // administrator's DDL on our tables the sweeper finds it first and gives way: its pass is
    // retried, the session's statement goes through.
    signals::pin_settings(&[(c"deadlock_timeout", c"100ms")]);
    pgrx::log!("vetassist_auth sweeper started in database {}", database);
    let mut paused = false;
    let mut restore_reported = None;
    loop {
        let readiness = readiness();
        report_restore_pause(&readiness, &mut restore_reported, &database);
        if matches!(readiness, Readiness::Ready) {
            // On a logical replication subscriber the apply worker writes the extension's tables:
            // a row of ours would collide with the primary's next one (docs/ARCHITECTURE.md,
            // "Replicas and failover"). The pass writes nothing there until promote().
            let primary =
                in_transaction("node role check", "vetassist_auth node role check", || {
                    Ok(crate::replica::role().map_err(|f| f.message)?
                        == crate::replica::Role::Primary)
                });
            match primary {
                Some(false) if !paused => {
                    pgrx::log!(
                        "vetassist_auth sweeper: this node is a logical replication subscriber of the \
                         extension's tables; maintenance is paused until vetassist_auth.promote()"
                    );
                    paused = true;
                }
                Some(true) if paused => {
                    pgrx::log!(
                        "vetassist_auth sweeper: this node is a primary; maintenance resumes"
                    );
                    paused = false;
                }
                _ => {}
            }
            if primary == Some(true) {
                maintain();
            }
            log_chain_head();
        }
        let interval = Duration::from_secs(gucs::SWEEP_INTERVAL.get() as u64);
        if !signals::sleep(interval) {
            break; // postmaster death
        }
        if signals::reload_asked() {
            // SAFETY: outside any transaction, as the postmaster's own children reload.
            unsafe { pg_sys::ProcessConfigFile(pg_sys::GucContext::PGC_SIGHUP) };
        }
    }
    // Exit status 0 would unregister the worker for good; 1 asks the postmaster to start it
    // again after RESTART_AFTER (it starts no worker during a shutdown). A SIGTERM ends the
    // process in signals::sleep or mid-statement, with status 1 too.
    // SAFETY: proc_exit runs the backend's exit callbacks and does not return; no Rust value
    // with a destructor that matters is alive here.
    unsafe { pg_sys::proc_exit(1) };
}

/// Whether this library serves 0.1.5's SQL or later (it also serves an older release's SQL
/// until ALTER EXTENSION UPDATE): on a Citus coordinator, the workers' logs too.
fn cluster_aware() -> bool {
    run_in_transaction::<bool>(
        "version check",
        "SELECT pg_catalog.to_regprocedure('vetassist_auth.audit_chain_heads()') IS NOT NULL",
    )
    .unwrap_or(false)
}

/// The pass's writes: sessions, seals, counters.
fn maintain() {
    // Expire and purge sessions in short batches until there is nothing left to do.
    while let Some(changed) = run_in_transaction::<i64>(
        "expire_sessions",
        "SELECT vetassist_auth.expire_sessions(10000)::bigint",
    ) {
        signals::stop_if_asked();
        if changed == 0 {
            break;
        }
    }
    // Then seal what finished since the last pass.
    while let Some(sealed) = run_in_transaction::<i64>(
        "seal_audit_log",
        "SELECT vetassist_auth.seal_audit_log(10000)::bigint",
    ) {
        signals::stop_if_asked();
        if sealed < 10_000 {
            break;
        }
    }
    // Since 0.1.5: on a Citus coordinator, the workers' logs too, one scheduler for the
    // cluster.
    if cluster_aware() {
        run_in_transaction::<i64>(
            "seal_worker_audit_logs",
            "SELECT vetassist_auth.seal_worker_audit_logs(10000)",
        );
    }
    // And show administrators the keys' current encryption counts.
    run_in_transaction::<i64>(
        "refresh_encrypt_counts",
        "SELECT vetassist_auth.refresh_encrypt_counts()::bigint",
    );
}

/// Logs the chain head, a subscriber's too (reading only).
fn log_chain_head() {
    let cluster_aware = cluster_aware();
    // An anchor outside the database's reach: log shipping keeps the chain head where no
    // one who can edit the tables can change it (verify_audit_chain(seq, hash) checks it).
    // On a Citus coordinator, every worker's head too: out of reach of a worker's superuser.
    let heads = if cluster_aware {
        "SELECT pg_catalog.string_agg(pg_catalog.format('%sseq=%s hash=%s', \
                    CASE WHEN node <> 'coordinator' THEN 'node ' || node || ' ' END, \
                    seq, pg_catalog.encode(hash, 'hex')), '; ' ORDER BY node <> 'coordinator', node) \
             FROM vetassist_auth.audit_chain_heads()"
    } else {
        "SELECT pg_catalog.format('seq=%s hash=%s', seq, pg_catalog.encode(hash, 'hex')) \
             FROM vetassist_auth.audit_chain_head()"
    };
    if let Some(head) =
        run_in_transaction::<String>("audit_chain_head", heads).filter(|head| !head.is_empty())
    {
        // This node's head comes first, with the WAL position it is logged at:
        // verify_audit_chain(seq, hash, timeline, lsn) tells a recovery to an earlier point
        // from seals removed (docs/ARCHITECTURE.md, "Anchors and purges"). A Citus worker's
        // head that follows is checked on that worker, without one.
        // SAFETY: reads the shared WAL insert position and timeline; no lock is needed.
        let (timeline, lsn) = unsafe {
            (
                pg_sys::GetWALInsertionTimeLine(),
                pg_sys::GetXLogInsertRecPtr(),
            )
        };
        let position = format!(
            " timeline={timeline} lsn={:X}/{:X}",
            lsn >> 32,
            lsn & 0xFFFF_FFFF
        );
        let line = match head.split_once("; ") {
            _ if head.starts_with("node ") => head,
            Some((own, workers)) => format!("{own}{position}; {workers}"),
            None => format!("{head}{position}"),
        };
        pgrx::log!("vetassist_auth audit chain head {line}");
    }
}
