//! Configuration parameters (docs/operations.md, "Configuration"). Key settings are SIGHUP so a session
//! cannot change them, and superuser-only so their values are not shown to other roles.

use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting};
use std::ffi::{CStr, CString};

pub static MASTER_KEY_FILE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static MASTER_KEY: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static PREVIOUS_MASTER_KEY_FILE: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static MASTER_KEY_COMMAND: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static PREVIOUS_MASTER_KEY_COMMAND: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(None);
pub static MASTER_KEY_COMMAND_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(10);

// Sessions (docs/operations.md "Configuration"): SUSET so the application cannot stretch its own
// time-outs; an administrator may set them per database or role.
pub static SESSION_IDLE_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(15 * 60);
pub static SESSION_ABSOLUTE_TIMEOUT: GucSetting<i32> = GucSetting::<i32>::new(12 * 60 * 60);
pub static SESSION_IDLE_WARNING: GucSetting<i32> = GucSetting::<i32>::new(2 * 60);
pub static SESSION_TOUCH_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(30);
pub static SESSION_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(30 * 24 * 60 * 60);
pub static MAX_SESSIONS_PER_USER: GucSetting<i32> = GucSetting::<i32>::new(0);
pub static REFRESH_REUSE_GRACE: GucSetting<i32> = GucSetting::<i32>::new(5);

// Audit.
pub static AUDIT_MIN_RETENTION: GucSetting<i32> = GucSetting::<i32>::new(6 * 365 * DAY);

// MFA.
pub static MFA_MAX_FAILURES: GucSetting<i32> = GucSetting::<i32>::new(5);
pub static MFA_LOCKOUT: GucSetting<i32> = GucSetting::<i32>::new(15 * 60);
pub static MFA_ISSUER: GucSetting<Option<CString>> =
    GucSetting::<Option<CString>>::new(Some(c"VetAssist"));

// Background maintenance (read at server start; interval on reload).
pub static SWEEP_DATABASE: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);
pub static SWEEP_INTERVAL: GucSetting<i32> = GucSetting::<i32>::new(60);
pub static DATABASES: GucSetting<Option<CString>> = GucSetting::<Option<CString>>::new(None);

const DAY: i32 = 24 * 60 * 60;

fn seconds_guc(
    name: &'static CStr,
    short: &'static CStr,
    setting: &'static GucSetting<i32>,
    min: i32,
    max: i32,
    context: GucContext,
) {
    GucRegistry::define_int_guc(
        name,
        short,
        c"",
        setting,
        min,
        max,
        context,
        GucFlags::UNIT_S,
    );
}

pub fn init() {
    seconds_guc(
        c"vetassist_auth.session_idle_timeout",
        c"A session with no activity for this long ends (HIPAA automatic logoff).",
        &SESSION_IDLE_TIMEOUT,
        1,
        DAY,
        GucContext::Suset,
    );
    seconds_guc(
        c"vetassist_auth.session_absolute_timeout",
        c"A session ends this long after it was created, however active (NIST SP 800-63B AAL2: 12 h).",
        &SESSION_ABSOLUTE_TIMEOUT,
        60,
        30 * DAY,
        GucContext::Suset,
    );
    seconds_guc(
        c"vetassist_auth.session_idle_warning",
        c"session_status reports IDLE once a session has been inactive this long before its idle time-out.",
        &SESSION_IDLE_WARNING,
        0,
        DAY,
        GucContext::Suset,
    );
    seconds_guc(
        c"vetassist_auth.session_touch_interval",
        c"touch_session writes last_activity_at at most once per this interval.",
        &SESSION_TOUCH_INTERVAL,
        0,
        3600,
        GucContext::Suset,
    );
    seconds_guc(
        c"vetassist_auth.session_retention",
        c"Ended sessions are deleted by expire_sessions this long after they ended.",
        &SESSION_RETENTION,
        0,
        i32::MAX,
        GucContext::Suset,
    );
    seconds_guc(
        c"vetassist_auth.refresh_reuse_grace",
        c"For this long after a rotation, the refresh token it replaced yields the same successor instead of ending the session (two tabs refreshing at once). 0 disables.",
        &REFRESH_REUSE_GRACE,
        0,
        300,
        GucContext::Suset,
    );
    GucRegistry::define_int_guc(
        c"vetassist_auth.max_sessions_per_user",
        c"Most live sessions one user may have; creating one more ends the oldest. 0 means no limit.",
        c"",
        &MAX_SESSIONS_PER_USER,
        0,
        10_000,
        GucContext::Suset,
        GucFlags::default(),
    );
    GucRegistry::define_int_guc(
        c"vetassist_auth.mfa_max_failures",
        c"Consecutive failed MFA codes after which the user is locked out.",
        c"",
        &MFA_MAX_FAILURES,
        1,
        100,
        GucContext::Suset,
        GucFlags::default(),
    );
    seconds_guc(
        c"vetassist_auth.mfa_lockout",
        c"How long a user stays locked out after too many failed MFA codes.",
        &MFA_LOCKOUT,
        1,
        DAY,
        GucContext::Suset,
    );
    GucRegistry::define_string_guc(
        c"vetassist_auth.mfa_issuer",
        c"Issuer shown by authenticator apps for enrolled TOTP secrets.",
        c"",
        &MFA_ISSUER,
        GucContext::Suset,
        GucFlags::default(),
    );
    // A postmaster setting can only be defined while the library is preloaded (defining it
    // later is FATAL); without preloading there is no worker to configure.
    // SAFETY: a flag the postmaster sets around loading shared_preload_libraries.
    if unsafe { pgrx::pg_sys::process_shared_preload_libraries_in_progress } {
        GucRegistry::define_string_guc(
            c"vetassist_auth.sweep_database",
            c"Database in which the background worker expires sessions and seals the audit log.",
            c"Needs shared_preload_libraries = 'vetassist_auth'. Unset: no worker; schedule the functions yourself.",
            &SWEEP_DATABASE,
            GucContext::Postmaster,
            GucFlags::default(),
        );
        GucRegistry::define_string_guc(
            c"vetassist_auth.databases",
            c"Comma-separated databases (at most 16) whose audit recorder is reserved at server start.",
            c"A reserved recorder keeps its background worker slot, so parallel query cannot starve disclosures. Unset: sweep_database.",
            &DATABASES,
            GucContext::Postmaster,
            GucFlags::default(),
        );
    }
    seconds_guc(
        c"vetassist_auth.audit_min_retention",
        c"purge_audit_log never removes audit rows younger than this (HIPAA 164.316(b)(2): 6 years).",
        &AUDIT_MIN_RETENTION,
        0,
        i32::MAX,
        GucContext::Suset,
    );
    seconds_guc(
        c"vetassist_auth.sweep_interval",
        c"How often the background worker runs its sweep.",
        &SWEEP_INTERVAL,
        1,
        DAY,
        GucContext::Sighup,
    );
    secret_string_guc(
        c"vetassist_auth.master_key_file",
        c"Path of a file holding the 32-byte master key as 64 hex characters.",
        c"Preferred over vetassist_auth.master_key. The file should be readable by the server's OS user only.",
        &MASTER_KEY_FILE,
        // NO_SHOW_ALL too: pg_settings shows reset_val unmasked to pg_read_all_settings.
        GucFlags::NO_SHOW_ALL | GucFlags::SUPERUSER_ONLY,
        Some(show_master_key_file),
        None,
    );
    secret_string_guc(
        c"vetassist_auth.previous_master_key_file",
        c"During a master key change: the old master key's file, so data keys open under either key until rewrap_keys.",
        c"Unset it once rewrap_keys() has committed.",
        &PREVIOUS_MASTER_KEY_FILE,
        GucFlags::NO_SHOW_ALL | GucFlags::SUPERUSER_ONLY,
        Some(show_previous_master_key_file),
        None,
    );
    secret_string_guc(
        c"vetassist_auth.master_key",
        c"The 32-byte master key as 64 hex characters (used when master_key_file is not set).",
        c"Hidden from SHOW ALL; only a superuser sees its value.",
        &MASTER_KEY,
        GucFlags::NO_SHOW_ALL | GucFlags::SUPERUSER_ONLY,
        Some(show_master_key),
        None,
    );
}

/// The master key command settings (docs/operations.md, "The master key from a KMS"), with the
/// assign hooks that run them in the postmaster; the time-out first, so that the commands'
/// first run at server start already has it.
pub fn define_master_key_commands(
    current: pgrx::pg_sys::GucStringAssignHook,
    previous: pgrx::pg_sys::GucStringAssignHook,
) {
    seconds_guc(
        c"vetassist_auth.master_key_command_timeout",
        c"How long the postmaster waits for a master key command before it gives up on it.",
        &MASTER_KEY_COMMAND_TIMEOUT,
        1,
        600,
        GucContext::Sighup,
    );
    secret_string_guc(
        c"vetassist_auth.master_key_command",
        c"A shell command that prints the 32-byte master key as 64 hex characters (e.g. after a KMS unwrap).",
        c"Run by the postmaster alone, at server start and at every reload; needs shared_preload_libraries. Only a superuser sees its value.",
        &MASTER_KEY_COMMAND,
        GucFlags::NO_SHOW_ALL | GucFlags::SUPERUSER_ONLY,
        Some(show_master_key_command),
        current,
    );
    secret_string_guc(
        c"vetassist_auth.previous_master_key_command",
        c"During a master key change: a command that prints the old master key, so data keys open under either key until rewrap_keys.",
        c"Unset it once rewrap_keys() has committed.",
        &PREVIOUS_MASTER_KEY_COMMAND,
        GucFlags::NO_SHOW_ALL | GucFlags::SUPERUSER_ONLY,
        Some(show_previous_master_key_command),
        previous,
    );
}

/// A SIGHUP string setting about the master key. SUPERUSER_ONLY alone lets every member of
/// pg_read_all_settings (pg_monitor) read it; the show hook masks the value for anyone but a
/// superuser (SHOW, current_setting, pg_settings).
fn secret_string_guc(
    name: &'static CStr,
    short: &'static CStr,
    long: &'static CStr,
    setting: &'static GucSetting<Option<CString>>,
    flags: GucFlags,
    show: pgrx::pg_sys::GucShowHook,
    assign: pgrx::pg_sys::GucStringAssignHook,
) {
    // SAFETY: the setting's storage is a static that outlives the server; Postgres owns the
    // string it points to from here on, as with GucRegistry::define_string_guc.
    unsafe {
        pgrx::pg_sys::DefineCustomStringVariable(
            name.as_ptr(),
            short.as_ptr(),
            long.as_ptr(),
            setting.as_ptr(),
            std::ptr::null(),
            pgrx::pg_sys::GucContext::PGC_SIGHUP,
            flags.bits(),
            None,
            assign,
            show,
        );
    }
}

/// What a show hook returns: the value for a superuser, else only whether it is set.
fn shown(setting: &'static GucSetting<Option<CString>>) -> *const std::ffi::c_char {
    let Some(value) = string_setting(setting) else {
        return c"".as_ptr();
    };
    // SAFETY: superuser() reads the catalog, so only inside a transaction; outside one the
    // value is masked.
    let superuser = unsafe { pgrx::pg_sys::IsTransactionState() && pgrx::pg_sys::superuser() };
    if superuser {
        value.as_ptr()
    } else {
        c"(set; shown to superusers only)".as_ptr()
    }
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_master_key_file() -> *const std::ffi::c_char {
    shown(&MASTER_KEY_FILE)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_previous_master_key_file() -> *const std::ffi::c_char {
    shown(&PREVIOUS_MASTER_KEY_FILE)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_master_key() -> *const std::ffi::c_char {
    shown(&MASTER_KEY)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_master_key_command() -> *const std::ffi::c_char {
    shown(&MASTER_KEY_COMMAND)
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn show_previous_master_key_command() -> *const std::ffi::c_char {
    shown(&PREVIOUS_MASTER_KEY_COMMAND)
}

/// The raw value of a string setting without copying it; None when unset or empty.
pub fn string_setting(setting: &GucSetting<Option<CString>>) -> Option<&'static CStr> {
    // SAFETY: the GUC's storage is a static pointer that Postgres sets; read here only.
    let raw = unsafe { *setting.as_ptr() };
    if raw.is_null() {
        return None;
    }
    // SAFETY: Postgres keeps the current value alive until the setting changes, which only
    // happens between statements; callers use the value immediately.
    let value = unsafe { CStr::from_ptr(raw) };
    (!value.to_bytes().is_empty()).then_some(value)
}

/// Databases with a reserved recorder at most: the other half of the recorders' table stays
/// for the databases started on demand.
pub const RESERVED_DATABASES_MAX: usize = 16;

/// The databases of `vetassist_auth.databases` (default: `sweep_database`), each once, in order,
/// the first RESERVED_DATABASES_MAX of them.
pub fn recorder_databases() -> Vec<CString> {
    let Some(list) = string_setting(&DATABASES).or_else(|| string_setting(&SWEEP_DATABASE)) else {
        return Vec::new();
    };
    let mut names: Vec<CString> = Vec::new();
    for name in list.to_string_lossy().split(',').map(str::trim) {
        if let Ok(name) = CString::new(name) {
            if !name.is_empty() && !names.contains(&name) && names.len() < RESERVED_DATABASES_MAX {
                names.push(name);
            }
        }
    }
    names
}
