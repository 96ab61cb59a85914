//! Configuration parameters (README, "Configuration"). Key settings are SIGHUP so a session
//! cannot change them, and superuser-only so their values are not shown to other roles.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::{CStr, CString};

pub static MASTER_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MASTER_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

pub fn init() {
    GucRegistry::define_string_guc(
        c"vetassist_auth.master_key_file",
        c"Path of a file holding the 32-byte master key as 64 hex characters.",
        c"Preferred over vetassist_auth.master_key. The file should be readable by the server's OS user only.",
        &MASTER_KEY_FILE,
        GucContext::Sighup,
        GucFlags::SUPERUSER_ONLY,
    );
    GucRegistry::define_string_guc(
        c"vetassist_auth.master_key",
        c"The 32-byte master key as 64 hex characters (used when master_key_file is not set).",
        c"Hidden from SHOW ALL and from non-superusers.",
        &MASTER_KEY,
        GucContext::Sighup,
        GucFlags::NO_SHOW_ALL | GucFlags::SUPERUSER_ONLY,
    );
}

/// The raw value of a string setting without copying it; None when unset or empty.
pub fn string_setting(setting: &GucSetting<Option<CString>>) -> Option<&'static CStr> {
    let raw = unsafe { *setting.as_ptr() };
    if raw.is_null() {
        return None;
    }
    // Safety: Postgres keeps the current value alive until the setting changes, which only
    // happens between statements; callers use the value immediately.
    let value = unsafe { CStr::from_ptr(raw) };
    (!value.to_bytes().is_empty()).then_some(value)
}
