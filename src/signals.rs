//! How the extension's background processes (the sweeper, the recorders) take signals
//! (docs/ARCHITECTURE.md, "Background worker"): SIGTERM as every Postgres backend takes it, so
//! a shutdown in any mode and `pg_terminate_backend` end them whatever they are doing.

use pgrx::bgworkers::{BackgroundWorker, SignalWakeFlags};
use pgrx::prelude::*;
use std::time::Duration;

extern "C-unwind" {
    /// Postgres's SIGTERM handler for backends (tcopprot.h). pgrx binds it as a Rust wrapper;
    /// a signal handler must be the C function itself.
    #[link_name = "die"]
    fn postgres_die(signal: std::ffi::c_int);
}

/// SIGTERM ends the process at the next interrupt check, inside a long statement too
/// (Postgres's `die()`: the executor checks as it goes); SIGHUP sets pgrx's flag and the latch.
/// Called first in a worker's main, while signals are still blocked.
pub fn attach() {
    // SAFETY: installs Postgres's own handler; a background worker starts with signals blocked,
    // and pgrx's attach below unblocks them once both handlers are in place.
    unsafe {
        #[cfg(not(feature = "pg18"))]
        pg_sys::pqsignal(libc::SIGTERM, Some(postgres_die));
        #[cfg(feature = "pg18")]
        pg_sys::pqsignal_be(libc::SIGTERM, Some(postgres_die));
    }
    BackgroundWorker::attach_signal_handlers(SignalWakeFlags::SIGHUP);
}

/// Ends the process here if it was asked to stop (pgrx's flag-only SIGTERM handler is not
/// installed, so nothing can swallow the request).
pub fn stop_if_asked() {
    pgrx::check_for_interrupts!();
}

/// Sleeps on the latch for at most `timeout`; false when the postmaster died. A stop asked for
/// before or during the sleep ends the process here.
pub fn sleep(timeout: Duration) -> bool {
    let alive = BackgroundWorker::wait_latch(Some(timeout));
    stop_if_asked();
    alive
}

/// Whether a SIGHUP came since the last call; the caller reloads the configuration.
pub fn reload_asked() -> bool {
    BackgroundWorker::sighup_received()
}

/// Settings every background process of ours runs with, whatever the database or role says:
/// no parallel workers (they compete for the slots the recorders need and cannot start during
/// a shutdown) and nothing of the database owner's found before pg_catalog.
pub fn pin_settings(extra: &[(&std::ffi::CStr, &std::ffi::CStr)]) {
    let common: [(&std::ffi::CStr, &std::ffi::CStr); 2] = [
        (c"search_path", c"pg_catalog, pg_temp"),
        (c"max_parallel_workers_per_gather", c"0"),
    ];
    for (name, value) in common.iter().chain(extra) {
        // SAFETY: plain settings of this process, set outside any transaction.
        unsafe {
            pg_sys::SetConfigOption(
                name.as_ptr(),
                value.as_ptr(),
                pg_sys::GucContext::PGC_SUSET,
                pg_sys::GucSource::PGC_S_OVERRIDE,
            );
        }
    }
}
