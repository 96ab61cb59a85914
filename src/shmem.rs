//! The extension's shared memory, with the library preloaded: the audit outbox
//! (`audit/recorder.rs`), where the background processes connect (`connections.rs`) and the
//! master keys the postmaster loads with a command (`keys/published.rs`) and the event counters
//! of `metrics()` (`counters.rs`). One
//! request hook and one start-up hook for both.

use crate::{connections, counters, keys, outbox};
use pgrx::prelude::*;

static mut PREV_SHMEM_REQUEST_HOOK: pg_sys::shmem_request_hook_type = None;
static mut PREV_SHMEM_STARTUP_HOOK: pg_sys::shmem_startup_hook_type = None;

/// Installs the hooks; called from `_PG_init` while preloading.
pub fn request() {
    // SAFETY: _PG_init runs once in the postmaster while shared_preload_libraries loads, before
    // any hook runs; each hook calls the one it replaced.
    unsafe {
        PREV_SHMEM_REQUEST_HOOK = pg_sys::shmem_request_hook;
        pg_sys::shmem_request_hook = Some(on_shmem_request);
        PREV_SHMEM_STARTUP_HOOK = pg_sys::shmem_startup_hook;
        pg_sys::shmem_startup_hook = Some(on_shmem_startup);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_request() {
    // SAFETY: called by the postmaster in its shared-memory request phase, the only time these
    // requests are allowed.
    unsafe {
        if let Some(previous) = PREV_SHMEM_REQUEST_HOOK {
            previous();
        }
        pg_sys::RequestAddinShmemSpace(
            outbox::SHMEM_SIZE
                + connections::SHMEM_SIZE
                + keys::PUBLISHED_SHMEM_SIZE
                + counters::SHMEM_SIZE,
        );
        outbox::request_lock();
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_shmem_startup() {
    // SAFETY: the postmaster runs this after creating shared memory (again after a crash
    // restart); AddinShmemInitLock (MainLWLockArray[21]) serialises it with other extensions,
    // as the attach functions require.
    unsafe {
        if let Some(previous) = PREV_SHMEM_STARTUP_HOOK {
            previous();
        }
        let init_lock = &raw mut (*pg_sys::MainLWLockArray.add(21)).lock;
        pg_sys::LWLockAcquire(init_lock, pg_sys::LWLockMode::LW_EXCLUSIVE);
        outbox::attach_shared();
        connections::attach_shared();
        counters::attach_shared();
        pg_sys::LWLockRelease(init_lock);
        // Outside the lock: in the postmaster this runs the master key commands.
        keys::attach_shared();
    }
}
