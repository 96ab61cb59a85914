//! Keeps secrets out of the server log. Statements that call this extension carry tokens,
//! codes and PHI as literals or bind parameters; `log_statement`, `log_min_duration_statement`
//! and `log_min_error_statement` would otherwise write them to the log verbatim.
//!
//! The `emit_log_hook` rewrites a log entry when the statement being run mentions the
//! extension: the statement text inside the message is replaced, bind parameters in DETAIL and
//! CONTEXT are dropped, and the trailing STATEMENT line is suppressed. Other log entries pass
//! through untouched. The hook is active in every backend that has loaded the library before
//! the statement is logged, which `shared_preload_libraries` (or `session_preload_libraries`)
//! guarantees from the first statement on.

use pgrx::pg_sys;
use std::ffi::{CStr, CString};

static mut PREVIOUS_HOOK: pg_sys::emit_log_hook_type = None;

/// Words that mark a statement as one of ours, matched case-insensitively.
const MARKERS: [&str; 8] = [
    "vetassist_auth",
    "encrypt",
    "decrypt",
    "field_hash",
    "va_token",
    "va_user",
    "mfa_",
    "session",
];

const REDACTED: &str = "<redacted by vetassist_auth>";

pub fn install() {
    unsafe {
        PREVIOUS_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(redact_log_entry);
    }
}

fn mentions_extension(statement: &str) -> bool {
    let lower = statement.to_ascii_lowercase();
    MARKERS.iter().any(|m| lower.contains(m))
}

unsafe fn text_of(ptr: *const std::ffi::c_char) -> Option<String> {
    (!ptr.is_null()).then(|| CStr::from_ptr(ptr).to_string_lossy().into_owned())
}

/// Copies a string into the error context, where the rest of ErrorData lives.
unsafe fn error_cstring(text: &str) -> *mut std::ffi::c_char {
    let c = CString::new(text.replace('\0', "")).unwrap_or_default();
    pg_sys::MemoryContextStrdup(pg_sys::ErrorContext, c.as_ptr())
}

/// The message with the statement replaced, or the whole message replaced when a statement of
/// ours is logged in a form we do not recognise.
fn redact_message(message: &str, statement: &str) -> String {
    if !statement.is_empty() && message.contains(statement) {
        message.replace(statement, REDACTED)
    } else {
        REDACTED.to_owned()
    }
}

/// On reload Postgres logs `parameter "NAME" changed to "VALUE"`; for the inline master key
/// that would be the key itself.
fn redact_setting_change(message: &str) -> Option<String> {
    let prefix = "parameter \"vetassist_auth.master_key\" changed to";
    message
        .starts_with(prefix)
        .then(|| format!("{prefix} {REDACTED}"))
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn redact_log_entry(edata: *mut pg_sys::ErrorData) {
    if let Some(redacted) = text_of((*edata).message)
        .as_deref()
        .and_then(redact_setting_change)
    {
        (*edata).message = error_cstring(&redacted);
    }
    let statement = text_of(pg_sys::debug_query_string).unwrap_or_default();
    if !statement.is_empty() && mentions_extension(&statement) {
        let e = &mut *edata;
        e.hide_stmt = true;
        if let Some(message) = text_of(e.message) {
            if message.contains(&statement)
                || (mentions_extension(&message) && e.elevel == pg_sys::LOG as i32)
            {
                e.message = error_cstring(&redact_message(&message, &statement));
            }
        }
        if let Some(detail) = text_of(e.detail) {
            if detail.starts_with("parameters:") {
                e.detail = error_cstring("parameters: <redacted by vetassist_auth>");
            }
        }
        if let Some(context) = text_of(e.context) {
            if context.contains("with parameters") || context.contains(&statement) {
                e.context = error_cstring("<context redacted by vetassist_auth>");
            }
        }
    }
    if let Some(previous) = PREVIOUS_HOOK {
        previous(edata);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statements_of_ours_are_recognised() {
        assert!(mentions_extension(
            "SELECT VETASSIST_AUTH.encrypt_text($1, $2)"
        ));
        assert!(mentions_extension("select store_va_tokens('a','b')"));
        assert!(!mentions_extension("SELECT 1"));
    }

    #[test]
    fn the_statement_inside_a_message_is_replaced() {
        let stmt = "SELECT vetassist_auth.encrypt_text('tok', 'c')";
        assert_eq!(
            redact_message(&format!("duration: 0.1 ms  statement: {stmt}"), stmt),
            format!("duration: 0.1 ms  statement: {REDACTED}")
        );
        assert_eq!(redact_message("something else", stmt), REDACTED);
    }

    #[test]
    fn a_reloaded_inline_master_key_is_not_logged() {
        let logged =
            redact_setting_change("parameter \"vetassist_auth.master_key\" changed to \"00ff\"")
                .unwrap();
        assert!(!logged.contains("00ff"));
        assert_eq!(
            redact_setting_change("parameter \"vetassist_auth.master_key_file\" changed to \"/k\""),
            None
        );
    }
}
