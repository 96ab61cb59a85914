//! The crypto hot path (`encrypt`, `decrypt`, `field_hash`, … in `encryption.rs`) carries no
//! `SET search_path`: setting and restoring it costs more than the cryptography of a small
//! value. Those functions run SQL only in `keys`, when a key or a counter lease must be
//! read, and every such query runs inside `pinned`, under the path the SECURITY DEFINER
//! functions of `sql/` pin (docs/ARCHITECTURE.md, "The hot path and search_path").

use pgrx::pg_sys;

/// Runs `f` (which does SPI) with `search_path = pg_catalog, pg_temp`, restoring the caller's
/// path afterwards. On an error the transaction's or subtransaction's abort restores it, as it
/// does for a function's own `SET` clause.
pub fn pinned<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: the same calls fmgr makes for a function's SET clause: a new GUC nest level, a
    // SAVE-action assignment at it, and its release after the call. The strings are
    // NUL-terminated literals.
    let nest_level = unsafe {
        let nest_level = pg_sys::NewGUCNestLevel();
        pg_sys::set_config_option(
            c"search_path".as_ptr(),
            c"pg_catalog, pg_temp".as_ptr(),
            pg_sys::GucContext::PGC_USERSET,
            pg_sys::GucSource::PGC_S_SESSION,
            pg_sys::GucAction::GUC_ACTION_SAVE,
            true,
            pg_sys::PGERROR as i32,
            false,
        );
        nest_level
    };
    let result = f();
    // SAFETY: releases the nest level taken above, restoring the caller's search_path.
    unsafe { pg_sys::AtEOXact_GUC(true, nest_level) };
    result
}
