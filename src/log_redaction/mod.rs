//! Keeps secrets out of the server log (docs/operations.md, "Logs: what is and is not redacted").
//! Statements that call this extension carry tokens, codes and PHI as literals or bind
//! parameters; `log_statement`, `log_min_duration_statement`, `log_min_error_statement` and
//! error reports would otherwise write them to the log verbatim.
//!
//! Whether a statement calls the extension is decided from its tokens (`sql_tokens`): a name of
//! the extension's schema or a call of one of its functions, qualified or not, through `EXECUTE`
//! of a prepared statement, or inside a DO block and the strings it EXECUTEs. Comments and
//! string contents decide nothing, so no one can hide an unrelated statement by mentioning the
//! extension in a comment. A statement of ours is logged with every literal replaced by
//! `<redacted>` and the rest as written; its bind parameters, and values an error message quotes,
//! are dropped. Every other statement is logged exactly as Postgres logs it.
//!
//! The same hook gives the errors Postgres raises about a call of ours a hint that teaches
//! (`hints`): the expected format of a malformed argument, the role to grant.
//!
//! Channels that cannot be redacted this way (auto_explain's plans, utility statements kept by
//! pg_stat_statements) are detected instead: `unsafe_log_channels`.

mod hints;
mod sql_tokens;

use pgrx::pg_sys;
use sql_tokens::{classify, literal_values, mask, CODE_DEPTH};
use std::cell::RefCell;
use std::ffi::{CStr, CString};

static mut PREVIOUS_HOOK: pg_sys::emit_log_hook_type = None;

const REDACTED: &str = "<redacted by vetassist_auth>";
/// Literal values of a statement looked for in its messages, and the longest message searched:
/// the hook runs inside error reporting, where no cancel is served, so its work is bounded.
const MAX_VALUES: usize = 64;
const MAX_SEARCHED: usize = 16 * 1024;

pub fn install() {
    // SAFETY: _PG_init runs once per process before any log entry; the previous hook is called
    // from ours.
    unsafe {
        PREVIOUS_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(redact_log_entry);
    }
}

fn standard_strings() -> bool {
    // SAFETY: a plain global setting of this backend.
    unsafe { pg_sys::standard_conforming_strings }
}

/// The text of a prepared statement of this session, if there is one by that name.
fn prepared_statement_text(name: &str) -> Option<String> {
    let name = CString::new(name).ok()?;
    // SAFETY: a look-up in this backend's hash of prepared statements that raises nothing
    // (throwError false); the query string lives as long as the statement.
    unsafe {
        let statement = pg_sys::FetchPreparedStatement(name.as_ptr(), false);
        if statement.is_null() || (*statement).plansource.is_null() {
            return None;
        }
        text_of((*(*statement).plansource).query_string)
    }
}

/// Whether `sql` calls the extension, itself or through the prepared statement it executes.
fn calls_extension(sql: &str) -> bool {
    let classified = classify(sql, standard_strings(), CODE_DEPTH);
    classified.calls_extension
        || classified.executes.iter().any(|name| {
            prepared_statement_text(name)
                .is_some_and(|text| classify(&text, standard_strings(), CODE_DEPTH).calls_extension)
        })
}

/// The statement this backend is running, as decided once per statement.
struct Current {
    /// `debug_query_string` when decided, and the masked copy it was pointed to afterwards.
    original_ptr: usize,
    masked_ptr: usize,
    original: String,
    masked: CString,
    /// String contents of its literals, to be found in error messages that quote one.
    values: Vec<String>,
}

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
}

/// The current statement if it calls the extension. Decided once per statement, and from then
/// on `debug_query_string` points to the masked text, so the STATEMENT line of an error (and
/// the csvlog/jsonlog query field) shows it.
unsafe fn current_statement_of_ours() -> Option<(String, String, Vec<String>)> {
    let ptr = pg_sys::debug_query_string as usize;
    if ptr == 0 {
        return None;
    }
    // The next statement's text may sit at the address of the last one's: compare the text too.
    let text = CStr::from_ptr(pg_sys::debug_query_string).to_bytes();
    let known = CURRENT.with_borrow(|current| {
        current
            .as_ref()
            .filter(|c| {
                c.masked_ptr == ptr || (c.original_ptr == ptr && c.original.as_bytes() == text)
            })
            .map(|c| {
                (
                    c.masked_ptr,
                    (
                        c.original.clone(),
                        c.masked.to_string_lossy().into_owned(),
                        c.values.clone(),
                    ),
                )
            })
    });
    if let Some((masked_ptr, statement)) = known {
        // The same statement run again: debug_query_string points at its original text once
        // more, and must point at the masked copy again.
        pg_sys::debug_query_string = masked_ptr as *const std::ffi::c_char;
        return Some(statement);
    }
    let original = text_of(pg_sys::debug_query_string)?;
    if !calls_extension(&original) {
        return None;
    }
    let masked = mask(&original, standard_strings());
    let tokens = sql_tokens::tokens(&original, standard_strings());
    // Bounded work: the hook runs inside error reporting, where no cancel is served.
    let mut values: Vec<String> = literal_values(&tokens)
        .into_iter()
        .map(str::to_owned)
        .collect();
    values.sort_unstable();
    values.dedup();
    values.truncate(MAX_VALUES);
    let masked_c = CString::new(masked.replace('\0', "")).unwrap_or_default();
    // The copy lives in TopMemoryContext until the next statement of ours replaces it, so
    // debug_query_string never dangles.
    let copy = pg_sys::MemoryContextStrdup(pg_sys::TopMemoryContext, masked_c.as_ptr());
    CURRENT.with_borrow_mut(|current| {
        if let Some(previous) = current.take() {
            pg_sys::pfree(previous.masked_ptr as *mut std::ffi::c_void);
        }
        *current = Some(Current {
            original_ptr: ptr,
            masked_ptr: copy as usize,
            original: original.clone(),
            masked: masked_c,
            values: values.clone(),
        });
    });
    pg_sys::debug_query_string = copy;
    Some((original, masked, values))
}

unsafe fn text_of(ptr: *const std::ffi::c_char) -> Option<String> {
    (!ptr.is_null()).then(|| CStr::from_ptr(ptr).to_string_lossy().into_owned())
}

/// Copies a string into the error context, where the rest of ErrorData lives.
unsafe fn error_cstring(text: &str) -> *mut std::ffi::c_char {
    let c = CString::new(text.replace('\0', "")).unwrap_or_default();
    pg_sys::MemoryContextStrdup(pg_sys::ErrorContext, c.as_ptr())
}

/// Rewrites one field of the error report in place when `rewrite` changes it.
unsafe fn rewrite(field: &mut *mut std::ffi::c_char, rewrite: impl FnOnce(&str) -> String) {
    if let Some(text) = text_of(*field) {
        let rewritten = rewrite(&text);
        if rewritten != text {
            *field = error_cstring(&rewritten);
        }
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

/// Masks each statement of ours quoted in an error context (`SQL statement "…"`, a nested call
/// in a DO block or function); other statements stay as they are.
fn mask_context_statements(context: &str) -> String {
    const OPEN: &str = "SQL statement \"";
    // What Postgres puts after a quoted statement: the next context line (the statement may
    // hold quotes and line breaks itself).
    const NEXT: [&str; 4] = [
        "\"\nPL/pgSQL function",
        "\"\nSQL function",
        "\"\nSQL statement \"",
        "\"\nJSON data",
    ];
    let mut out = String::with_capacity(context.len());
    let mut rest = context;
    while let Some(at) = rest.find(OPEN) {
        let body_start = at + OPEN.len();
        out.push_str(&rest[..body_start]);
        let body_end = NEXT
            .iter()
            .filter_map(|next| rest[body_start..].find(next))
            .min()
            .map(|k| body_start + k)
            .unwrap_or_else(|| rest.len() - usize::from(rest.ends_with('"')));
        let statement = &rest[body_start..body_end];
        if calls_extension(statement) {
            out.push_str(&mask(statement, standard_strings()));
        } else {
            out.push_str(statement);
        }
        rest = &rest[body_end..];
    }
    out.push_str(rest);
    out
}

/// Deadlock reports list each process's statement in the log-only detail (`Process N: …`):
/// one session's log line would carry another's tokens. Their literals are masked, whichever
/// statements they are.
fn mask_process_statements(detail: &str) -> String {
    let mut out = Vec::new();
    let mut statement: Option<(String, Vec<&str>)> = None;
    let flush = |statement: &mut Option<(String, Vec<&str>)>, out: &mut Vec<String>| {
        if let Some((head, lines)) = statement.take() {
            // A statement cut short (track_activity_query_size) may no longer show the call
            // that makes it ours: every statement in the report is masked.
            let text = mask(&lines.join("\n"), standard_strings());
            out.push(format!("{head}{text}"));
        }
    };
    for line in detail.split('\n') {
        let head = line
            .strip_prefix("Process ")
            .and_then(|r| r.split_once(": "))
            .filter(|(pid, _)| !pid.is_empty() && pid.bytes().all(|b| b.is_ascii_digit()));
        match head {
            Some((pid, text)) => {
                flush(&mut statement, &mut out);
                statement = Some((format!("Process {pid}: "), vec![text]));
            }
            None => match statement.as_mut() {
                Some((_, lines)) => lines.push(line),
                None => out.push(line.to_owned()),
            },
        }
    }
    flush(&mut statement, &mut out);
    out.join("\n")
}

/// Replaces every literal value of the statement that a message quotes. A message too long to
/// search in bounded time is replaced whole.
fn without_values(text: &str, values: &[String]) -> String {
    if text.len() > MAX_SEARCHED {
        return REDACTED.to_owned();
    }
    values.iter().fold(text.to_owned(), |text, value| {
        text.replace(value.as_str(), sql_tokens::MASK)
    })
}

/// An error about a statement of ours quotes the offending input in double quotes (`invalid
/// input syntax for type uuid: "…"`, `Token "…" is invalid`), whether it came from a literal
/// or a bind parameter: every quoted part is masked.
fn without_quoted(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut parts = text.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, part) in parts.enumerate() {
        out.push('"');
        out.push_str(if i % 2 == 0 { sql_tokens::MASK } else { part });
    }
    out
}

/// Context lines that show an argument's text (a malformed jsonb literal) or bind parameters.
fn mask_argument_context(context: &str) -> String {
    context
        .split('\n')
        .map(|line| {
            if line.starts_with("JSON data") {
                format!("JSON data: {REDACTED}")
            } else if let Some(at) = line.find(" parameter $") {
                // `unnamed portal parameter $1 = '…'`: a bind parameter that failed to parse.
                format!("{} parameter {REDACTED}", &line[..at])
            } else if line.contains("with parameters:") {
                format!(
                    "{}with parameters: {REDACTED}",
                    &line[..line.find("with parameters:").unwrap_or(0)]
                )
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn redact_log_entry(edata: *mut pg_sys::ErrorData) {
    let e = &mut *edata;
    if let Some(redacted) = text_of(e.message)
        .as_deref()
        .and_then(redact_setting_change)
    {
        e.message = error_cstring(&redacted);
    }
    rewrite(&mut e.detail_log, mask_process_statements);
    rewrite(&mut e.context, mask_context_statements);
    rewrite(&mut e.internalquery, |query| {
        if calls_extension(query) {
            mask(query, standard_strings())
        } else {
            query.to_owned()
        }
    });
    if let Some((original, masked, values)) = current_statement_of_ours() {
        // An error about a statement of ours may quote an argument (a literal or a bind
        // parameter) in double quotes.
        let error = e.elevel >= pg_sys::PGERROR as i32; // ERROR, as elog.h names it
        let mask_quoted = |text: String| if error { without_quoted(&text) } else { text };
        rewrite(&mut e.message, |message| {
            mask_quoted(without_values(
                &message.replace(&original, &masked),
                &values,
            ))
        });
        rewrite(&mut e.detail, |detail| {
            // "parameters: …" until 16, "Parameters: …" since 17.
            if let Some(label) = ["parameters:", "Parameters:"]
                .into_iter()
                .find(|label| detail.starts_with(label))
            {
                format!("{label} {REDACTED}")
            } else {
                mask_quoted(without_values(detail, &values))
            }
        });
        rewrite(&mut e.hint, |hint| without_values(hint, &values));
        if e.hint.is_null() {
            let hint =
                text_of(e.message).and_then(|message| hints::hint_for(e.sqlerrcode, &message));
            if let Some(hint) = hint {
                e.hint = error_cstring(&hint);
            }
        }
        rewrite(&mut e.context, |context| {
            without_values(&mask_argument_context(context), &values)
        });
    }
    if let Some(previous) = PREVIOUS_HOOK {
        previous(edata);
    }
}

/// Log channels in force in this session that cannot be redacted: auto_explain (its plans show
/// constants and, with log_verbose, a call's arguments) and pg_stat_statements with
/// track_utility (utility statements such as DO, EXPLAIN ANALYZE, DECLARE CURSOR and CREATE
/// TABLE AS are kept with their literals, readable by pg_read_all_stats). None when none is.
pub fn unsafe_log_channels() -> Option<String> {
    let setting = |name: &CStr| {
        // SAFETY: a look-up of a setting by name that raises nothing (missing_ok).
        unsafe { text_of(pg_sys::GetConfigOption(name.as_ptr(), true, false)) }
    };
    let mut found = Vec::new();
    if setting(c"auto_explain.log_min_duration").is_some_and(|v| v != "-1") {
        found.push("auto_explain is logging plans (auto_explain.log_min_duration is not -1)");
    }
    if setting(c"pg_stat_statements.track_utility").as_deref() == Some("on") {
        found.push("pg_stat_statements keeps utility statements with their literals (pg_stat_statements.track_utility is on)");
    }
    let debug_print = [
        c"debug_print_parse",
        c"debug_print_rewritten",
        c"debug_print_plan",
    ];
    if debug_print
        .iter()
        .any(|name| setting(name).as_deref() == Some("on"))
    {
        found.push("debug_print_parse, debug_print_rewritten or debug_print_plan prints query trees with their constants");
    }
    (!found.is_empty()).then(|| found.join("; "))
}

thread_local! {
    /// The last unsafe-channel report this backend warned about, so it warns once per change.
    static WARNED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A WARNING, once per backend and change of settings, while an unredactable log channel is in
/// force; called when the extension is used.
pub fn warn_about_unsafe_channels() {
    let problem = unsafe_log_channels();
    let changed = WARNED.with_borrow(|warned| *warned != problem);
    if !changed {
        return;
    }
    WARNED.with_borrow_mut(|warned| warned.clone_from(&problem));
    if let Some(problem) = problem {
        pgrx::ereport!(
            WARNING,
            pgrx::PgSqlErrorCode::ERRCODE_WARNING,
            format!("vetassist_auth: secrets may reach a log or statistics channel that cannot be redacted: {problem}"),
            "Turn it off for databases that use vetassist_auth (docs/operations.md, \"Logs\"); verify_installation() reports it."
        );
    }
}

/// For verify_installation: NULL when every log channel in force can be redacted. Internal.
#[pgrx::pg_extern]
fn unredactable_log_channels() -> Option<String> {
    unsafe_log_channels()
}

#[cfg(test)]
mod tests {
    use super::*;

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

    #[test]
    fn values_quoted_by_a_message_are_dropped() {
        assert_eq!(
            without_values(
                "invalid input syntax for type uuid: \"TOKEN-1\"",
                &["TOKEN-1".to_owned()]
            ),
            "invalid input syntax for type uuid: \"<redacted>\""
        );
    }

    #[test]
    fn quoted_input_in_an_error_is_masked() {
        assert_eq!(
            without_quoted("invalid input syntax for type uuid: \"LEAK-BIND\""),
            "invalid input syntax for type uuid: \"<redacted>\""
        );
        assert_eq!(without_quoted("no quotes"), "no quotes");
    }

    #[test]
    fn a_message_too_long_to_search_is_replaced_whole() {
        let long = "x".repeat(MAX_SEARCHED + 1);
        assert_eq!(without_values(&long, &["abc".to_owned()]), REDACTED);
    }

    #[test]
    fn json_and_parameter_context_lines_are_dropped() {
        assert_eq!(
            mask_argument_context("JSON data, line 1: {\"dx\": \"PTSD\", }\nSQL function x"),
            format!("JSON data: {REDACTED}\nSQL function x")
        );
        assert_eq!(
            mask_argument_context("unnamed portal with parameters: $1 = 'TOKEN'"),
            format!("unnamed portal with parameters: {REDACTED}")
        );
        assert_eq!(
            mask_argument_context("unnamed portal parameter $1 = '...'"),
            format!("unnamed portal parameter {REDACTED}")
        );
    }
}
