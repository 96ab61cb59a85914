//! Keeps secrets out of the server log (docs/operations.md, "Logs: what is and is not redacted").
//! Statements that call this extension carry tokens, codes and PHI as literals or bind
//! parameters; `log_statement`, `log_min_duration_statement`, `log_min_error_statement` and
//! error reports would otherwise write them to the log verbatim.
//!
//! Whether a text calls the extension is decided by Postgres's own parser and scanner
//! (`scan`, `verdict`): a function call naming one of our functions, live or in a dead branch,
//! has its argument literals masked, and every other byte stays as Postgres wrote it, so no one
//! can hide a statement by mentioning the extension. Texts are read where an ERROR can be
//! caught (`post_parse_analyze_hook`, entry into a function of ours); the log hook runs inside
//! error reporting, where an ERROR would corrupt the error stack, so it only looks them up, and
//! parses nothing but the statement of a `statement:` line, which Postgres has just parsed.
//!
//! Once a function of ours has started in a statement (`frames`), every line logged about it
//! has all its literals masked, in every field.
//!
//! The same hook gives the errors Postgres raises about a call of ours a hint that teaches
//! (`hints`): the expected format of a malformed argument, the role to grant.
//!
//! Channels that cannot be redacted this way (auto_explain's plans, utility statements kept by
//! pg_stat_statements) are detected instead: `unsafe_log_channels`.

mod frames;
mod hints;
mod scan;
mod verdict;

use pgrx::pg_sys;
use std::borrow::Cow;
use std::cell::{Cell, RefCell};
use std::ffi::{CStr, CString};
use verdict::{mentions_us, MASK};

static mut PREVIOUS_HOOK: pg_sys::emit_log_hook_type = None;
static mut PREVIOUS_ANALYZE_HOOK: pg_sys::post_parse_analyze_hook_type = None;

const REDACTED: &str = "<redacted by vetassist_auth>";
/// The longest message searched for literal values: the hook runs inside error reporting,
/// where no cancel is served, so its work is bounded.
const MAX_SEARCHED: usize = 16 * 1024;

pub fn install() {
    // SAFETY: _PG_init runs once per process before any statement; the previous hooks are
    // called from ours.
    unsafe {
        PREVIOUS_HOOK = pg_sys::emit_log_hook;
        pg_sys::emit_log_hook = Some(redact_log_entry);
        PREVIOUS_ANALYZE_HOOK = pg_sys::post_parse_analyze_hook;
        pg_sys::post_parse_analyze_hook = Some(read_analyzed_text);
    }
    frames::install();
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

/// The statement this backend is running, with `debug_query_string` pointed at a masked copy
/// while it is one of ours.
struct Current {
    original_ptr: usize,
    masked_ptr: usize,
    original: String,
    masked: String,
}

/// A message's query string: its address, length and hash.
type Message = (usize, usize, u64);

thread_local! {
    static CURRENT: RefCell<Option<Current>> = const { RefCell::new(None) };
    /// The message last analyzed (its address, length and hash) and the
    /// standard_conforming_strings it was parsed under: a statement of the message may change
    /// the setting before a later one runs a function of ours.
    static PARSED_WITH: Cell<Option<(Message, bool)>> = const { Cell::new(None) };
    /// A `statement:` line held back until its code is read (`post_parse_analyze_hook`).
    static HELD: RefCell<Option<Held>> = const { RefCell::new(None) };
    /// Set while the hook emits a held line, and while it runs (it is not re-entered).
    static EMITTING_HELD: Cell<bool> = const { Cell::new(false) };
    static IN_HOOK: Cell<bool> = const { Cell::new(false) };
}

/// The original text of the statement this backend is running (`debug_query_string`, or
/// what it was before the hook pointed it at a masked copy).
fn current_statement_text() -> Option<String> {
    // SAFETY: debug_query_string is this backend's NUL-terminated statement or NULL.
    let ptr = unsafe { pg_sys::debug_query_string } as usize;
    if ptr == 0 {
        return None;
    }
    let masked = CURRENT.with_borrow(|current| {
        current
            .as_ref()
            .filter(|c| c.masked_ptr == ptr)
            .map(|c| c.original.clone())
    });
    // SAFETY: as above.
    masked.or_else(|| unsafe { text_of(pg_sys::debug_query_string) })
}

/// A message's identity: the address of its query string, its length and hash (the next
/// message may sit at the same address).
fn message_of(ptr: usize, text: &str) -> Message {
    (ptr, text.len(), verdict::text_hash(text.as_bytes()))
}

/// The standard_conforming_strings the running statement's message was parsed under: the one
/// in force at its first analysis (`PARSED_WITH`), or now if none was analyzed yet.
fn message_strings(statement: &str) -> bool {
    // SAFETY: debug_query_string and standard_conforming_strings are this backend's.
    let (ptr, now) = unsafe {
        (
            pg_sys::debug_query_string as usize,
            pg_sys::standard_conforming_strings,
        )
    };
    // The address Postgres gave the message, before the hook pointed at a masked copy.
    let ptr = CURRENT.with_borrow(|c| {
        c.as_ref()
            .filter(|c| c.masked_ptr == ptr)
            .map_or(ptr, |c| c.original_ptr)
    });
    let message = message_of(ptr, statement);
    PARSED_WITH
        .get()
        .filter(|(known, _)| *known == message)
        .map_or(now, |(_, strings)| strings)
}

/// Runs `f` with standard_conforming_strings as it was when the statement was parsed.
fn with_parse_settings<T>(statement: &str, f: impl FnOnce() -> T) -> T {
    verdict::with_standard_strings(message_strings(statement), f)
}

/// After Postgres parsed and analyzed a statement: where reading a text may raise, the text is
/// read once, and a `statement:` line held back for it is written.
#[pgrx::pg_guard]
unsafe extern "C-unwind" fn read_analyzed_text(
    pstate: *mut pg_sys::ParseState,
    query: *mut pg_sys::Query,
    jstate: *mut pg_sys::JumbleState,
) {
    if let Some(previous) = PREVIOUS_ANALYZE_HOOK {
        previous(pstate, query, jstate);
    }
    let source = (*pstate).p_sourcetext;
    if source.is_null() {
        return;
    }
    // The log hook reads texts the same way (a server encoding other than UTF-8).
    let text = CStr::from_ptr(source).to_string_lossy();
    let text = text.as_ref();
    let now = pg_sys::standard_conforming_strings;
    // The first statement of a message is analyzed before any of them runs: the setting then
    // is the one Postgres parsed the message under.
    let parsed_with = if source == pg_sys::debug_query_string {
        let message = message_of(source as usize, text);
        match PARSED_WITH.get() {
            Some((known, strings)) if known == message => strings,
            _ => {
                PARSED_WITH.set(Some((message, now)));
                now
            }
        }
    } else {
        now
    };
    // A DO block or a function whose body is read when it runs (`reread_code`).
    let code = !(*query).utilityStmt.is_null()
        && matches!(
            (*(*query).utilityStmt).type_,
            pg_sys::NodeTag::T_DoStmt | pg_sys::NodeTag::T_CreateFunctionStmt
        );
    if mentions_us(text) {
        if verdict::read_under(text) != Some(parsed_with) {
            verdict::with_standard_strings(parsed_with, || {
                verdict::remember(text, verdict::analyze_caught(text))
            });
        }
        if code {
            verdict::reread_code(text);
        }
    }
    // A held `statement:` line waits for its code to be read.
    let held = HELD.with_borrow_mut(|held| held.take_if(|h| code && h.statement == text));
    if let Some(held) = held {
        emit_held(held);
    }
}

/// A `statement:` line whose code could not be read in the log hook.
struct Held {
    statement: String,
    detail: Option<String>,
}

/// Writes a held `statement:` line, masked now that its text is read.
fn emit_held(held: Held) {
    let statement = shown(&held.statement, false);
    let message = format!("statement: {}", statement.text);
    let detail = held.detail.map(|d| mask_prepared_detail(&d, false));
    EMITTING_HELD.set(true);
    match detail {
        Some(detail) => pgrx::ereport!(
            pgrx::PgLogLevel::LOG,
            pgrx::PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            message,
            detail
        ),
        None => pgrx::ereport!(
            pgrx::PgLogLevel::LOG,
            pgrx::PgSqlErrorCode::ERRCODE_SUCCESSFUL_COMPLETION,
            message
        ),
    }
    EMITTING_HELD.set(false);
}

/// How a text is shown in the log.
struct Shown<'a> {
    text: Cow<'a, str>,
    /// It calls the extension, a function of ours ran in it, or it is not known: its messages
    /// are masked too.
    tainted: bool,
    values: Vec<String>,
}

/// A text as the log shows it: with the arguments of its calls of ours masked, every literal
/// masked once a function of ours ran in it (`ran`), and replaced whole when it mentions the
/// extension but was never read (it did not parse, or failed before Postgres analyzed it).
fn shown(text: &str, ran: bool) -> Shown<'_> {
    match verdict::lookup(text) {
        Some(v) if ran => Shown {
            text: Cow::Owned(v.all_masked.clone()),
            tainted: true,
            values: v.all_values.clone(),
        },
        Some(v) if v.ours => Shown {
            text: Cow::Owned(v.calls_masked.clone()),
            tainted: true,
            values: v.masked_values.clone(),
        },
        Some(_) => Shown {
            text: Cow::Borrowed(text),
            tainted: false,
            values: Vec::new(),
        },
        None if !ran && !mentions_us(text) => Shown {
            text: Cow::Borrowed(text),
            tainted: false,
            values: Vec::new(),
        },
        None => Shown {
            text: Cow::Borrowed(MASK),
            tainted: true,
            values: Vec::new(),
        },
    }
}

/// Points `debug_query_string` at the masked text, which Postgres prints as `STATEMENT:` and
/// as the csvlog/jsonlog query. The copy lives in TopMemoryContext until the next statement
/// of ours replaces it, so debug_query_string never dangles.
unsafe fn show_statement_as(original: &str, masked: &str) {
    let ptr = pg_sys::debug_query_string as usize;
    let same = CURRENT.with_borrow(|current| {
        current
            .as_ref()
            .is_some_and(|c| c.masked_ptr == ptr && c.masked == masked)
    });
    if same {
        return;
    }
    let original_ptr = CURRENT.with_borrow(|current| {
        current
            .as_ref()
            .filter(|c| c.masked_ptr == ptr)
            .map_or(ptr, |c| c.original_ptr)
    });
    let masked_c = CString::new(masked.replace('\0', "")).unwrap_or_default();
    let copy = pg_sys::MemoryContextStrdup(pg_sys::TopMemoryContext, masked_c.as_ptr());
    CURRENT.with_borrow_mut(|current| {
        if let Some(previous) = current.take() {
            pg_sys::pfree(previous.masked_ptr as *mut std::ffi::c_void);
        }
        *current = Some(Current {
            original_ptr,
            masked_ptr: copy as usize,
            original: original.to_owned(),
            masked: masked.to_owned(),
        });
    });
    pg_sys::debug_query_string = copy;
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

/// The settings whose values no log line may show: the inline master key, and the master key
/// commands (which may hold a KMS credential).
const HIDDEN_SETTINGS: [&str; 3] = [
    "vetassist_auth.master_key",
    "vetassist_auth.master_key_command",
    "vetassist_auth.previous_master_key_command",
];

/// Whether `name` is one of HIDDEN_SETTINGS (setting names are case-insensitive).
pub(crate) fn is_hidden_setting(name: &str) -> bool {
    HIDDEN_SETTINGS
        .iter()
        .any(|hidden| hidden.eq_ignore_ascii_case(name.trim()))
}

/// On reload Postgres logs `parameter "NAME" changed to "VALUE"`; for the inline master key
/// that would be the key itself, and a master key command may hold a KMS credential.
fn redact_setting_change(message: &str) -> Option<String> {
    HIDDEN_SETTINGS
        .iter()
        .map(|name| format!("parameter \"{name}\" changed to"))
        .find(|prefix| message.starts_with(prefix.as_str()))
        .map(|prefix| format!("{prefix} {REDACTED}"))
}

/// The context lines that quote a statement or expression (SPI's error context).
const QUOTING_CONTEXT: [&str; 3] = [
    "SQL statement \"",
    "SQL expression \"",
    "PL/pgSQL assignment \"",
];

/// Masks each statement quoted in an error context (a nested call in a DO block or function,
/// an expression of PL/pgSQL) as `shown` does; other statements stay as they are. `ran`: a
/// function of ours ran in the statement being reported. Also says whether one of them is
/// ours.
fn mask_context_statements(context: &str, ran: bool) -> (String, bool) {
    // What Postgres puts after a quoted statement: the next context line (the statement may
    // hold quotes and line breaks itself).
    const NEXT: [&str; 6] = [
        "\"\nPL/pgSQL function",
        "\"\nSQL function",
        "\"\nSQL statement \"",
        "\"\nSQL expression \"",
        "\"\nPL/pgSQL assignment \"",
        "\"\nJSON data",
    ];
    let mut out = String::with_capacity(context.len());
    let mut ours = false;
    let mut rest = context;
    while let Some((at, open)) = QUOTING_CONTEXT
        .iter()
        .filter_map(|open| rest.find(open).map(|at| (at, open)))
        .min()
    {
        let body_start = at + open.len();
        out.push_str(&rest[..body_start]);
        let body_end = NEXT
            .iter()
            .filter_map(|next| rest[body_start..].find(next))
            .min()
            .map(|k| body_start + k)
            .unwrap_or_else(|| rest.len() - usize::from(rest.ends_with('"')));
        let statement = shown(&rest[body_start..body_end], ran);
        ours |= statement.tainted;
        out.push_str(&statement.text);
        rest = &rest[body_end..];
    }
    out.push_str(rest);
    (out, ours)
}

/// Deadlock reports list each process's statement in the log-only detail (`Process N: …`):
/// one session's log line would carry another's tokens. Statements of another backend are not
/// known here: one that mentions the extension is replaced whole (it may be cut short by
/// track_activity_query_size, past the call that makes it ours).
fn mask_process_statements(detail: &str) -> String {
    let mut out = Vec::new();
    let mut statement: Option<(String, Vec<&str>)> = None;
    let flush = |statement: &mut Option<(String, Vec<&str>)>, out: &mut Vec<String>| {
        if let Some((head, lines)) = statement.take() {
            let text = lines.join("\n");
            out.push(format!("{head}{}", shown(&text, false).text));
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
        text.replace(value.as_str(), MASK)
    })
}

/// An error about a statement of ours quotes the offending input in double quotes (`invalid
/// input syntax for type uuid: "…"`, `Token "…" is invalid`), whether it came from a literal
/// or a bind parameter, and row values in parentheses (`Key (icn)=(…)`, `Failing row contains
/// (…)`): all of them are masked.
fn without_quoted(text: &str) -> String {
    // A syntax error quotes the rest of the statement from where it stopped (`at or near
    // "…"`), double quotes and all.
    const NEAR: &str = "at or near \"";
    if let Some(at) = text.find(NEAR) {
        let quoted = at + NEAR.len();
        if let Some(close) = text.rfind('"').filter(|&close| close >= quoted) {
            return format!(
                "{}{NEAR}{MASK}{}",
                without_quoted(&text[..at]),
                &text[close..]
            );
        }
    }
    let mut out = String::with_capacity(text.len());
    let mut parts = text.split('"');
    if let Some(first) = parts.next() {
        out.push_str(first);
    }
    for (i, part) in parts.enumerate() {
        out.push('"');
        out.push_str(if i % 2 == 0 { MASK } else { part });
    }
    for opening in ["=(", "contains ("] {
        if let Some(at) = out.find(opening) {
            let values = at + opening.len();
            if let Some(close) = out.rfind(')').filter(|&close| close >= values) {
                out.replace_range(values..close, MASK);
            }
        }
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
            } else if let Some(at) = line.find("with parameters:") {
                format!("{}with parameters: {REDACTED}", &line[..at])
            } else {
                line.to_owned()
            }
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// `DETAIL: prepare: PREPARE st AS …`, which Postgres adds to an EXECUTE's lines: the
/// prepared statement, shown as its own text is, with every literal masked once a function of
/// ours ran in the EXECUTE (`ran`) or in it (PREPARE and EXECUTE may share one message).
fn mask_prepared_detail(detail: &str, ran: bool) -> String {
    match detail.strip_prefix("prepare: ") {
        Some(prepared) => format!(
            "prepare: {}",
            shown(prepared, ran || frames::ran_in(prepared)).text
        ),
        None => detail.to_owned(),
    }
}

/// Whether the verdict on the running statement was read under another
/// standard_conforming_strings than this message was parsed with (the same text sent again
/// after the setting changed, and failing before Postgres analyzed it).
fn read_under_other_settings(statement: &str) -> bool {
    verdict::read_under(statement).is_some_and(|read| read != message_strings(statement))
}

/// What the hook decided for one report.
enum Decision {
    Emit,
    /// A `statement:` line held back until its code is read.
    Held,
}

#[pgrx::pg_guard]
unsafe extern "C-unwind" fn redact_log_entry(edata: *mut pg_sys::ErrorData) {
    if EMITTING_HELD.get() {
        // The held `statement:` line, already masked: shown as Postgres shows its own.
        (*edata).hide_stmt = true;
        (*edata).hide_ctx = true;
    } else if !IN_HOOK.replace(true) {
        // A panic here would become an ERROR inside error reporting: the report is cut to a
        // placeholder instead.
        let decision =
            std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| redact(&mut *edata)))
                .unwrap_or_else(|_| {
                    cut_report(&mut *edata);
                    Decision::Emit
                });
        IN_HOOK.set(false);
        if let Decision::Held = decision {
            return;
        }
    }
    if let Some(previous) = PREVIOUS_HOOK {
        previous(edata);
    }
}

/// Drops every field that could quote a statement or a value.
unsafe fn cut_report(e: &mut pg_sys::ErrorData) {
    e.message = error_cstring(REDACTED);
    for field in [
        &mut e.detail,
        &mut e.detail_log,
        &mut e.context,
        &mut e.internalquery,
    ] {
        *field = std::ptr::null_mut();
    }
    e.hide_stmt = true;
}

unsafe fn redact(e: &mut pg_sys::ErrorData) -> Decision {
    if let Some(redacted) = text_of(e.message)
        .as_deref()
        .and_then(redact_setting_change)
    {
        e.message = error_cstring(&redacted);
    }
    rewrite(&mut e.detail_log, mask_process_statements);
    let statement = current_statement_text();
    let message_id = text_of(e.message_id);
    if let Some(statement) = statement.as_deref() {
        let statement_line =
            e.elevel == pg_sys::LOG as i32 && message_id.as_deref() == Some("statement: %s");
        if statement_line {
            HELD.set(None);
            let now = pg_sys::standard_conforming_strings;
            if mentions_us(statement) && verdict::read_under(statement) != Some(now) {
                // Postgres has just parsed it under these settings: parsing it again cannot
                // raise. Its code (a DO body) was never scanned, and a text that is not UTF-8
                // is not the text Postgres parsed once converted, so such a line waits for
                // post_parse_analyze_hook.
                let exact = CStr::from_ptr(pg_sys::debug_query_string).to_str().is_ok();
                let analyzed = if exact {
                    verdict::analyze_parsed(statement)
                } else {
                    Err(verdict::NeedsCode)
                };
                match analyzed {
                    Ok(v) => {
                        verdict::remember(statement, v);
                    }
                    Err(verdict::NeedsCode) => {
                        HELD.set(Some(Held {
                            statement: statement.to_owned(),
                            detail: text_of(e.detail),
                        }));
                        e.output_to_server = false;
                        e.output_to_client = false;
                        return Decision::Held;
                    }
                }
            }
        } else if e.elevel >= pg_sys::PGERROR as i32 {
            // The statement failed before it was analyzed: its held line is not written (the
            // error's STATEMENT line shows it).
            HELD.set(None);
        }
    }
    let ran = statement.as_deref().is_some_and(frames::ran_in);
    let shown_statement = statement.as_deref().map(|s| {
        if read_under_other_settings(s) {
            // Its verdict was made for another reading of the same text.
            return Shown {
                text: Cow::Borrowed(MASK),
                tainted: true,
                values: Vec::new(),
            };
        }
        shown(s, ran)
    });
    let tainted = shown_statement.as_ref().is_some_and(|s| s.tainted);
    // Statements and expressions run inside one of ours (a DO block's, a function's) are
    // read as pieces of it: with every literal masked, and replaced whole if never read.
    let inside_ours = ran || tainted;
    let mut nested_ours = false;
    rewrite(&mut e.context, |context| {
        let (masked, ours) = mask_context_statements(context, inside_ours);
        nested_ours |= ours;
        masked
    });
    rewrite(&mut e.internalquery, |query| {
        let query = shown(query, inside_ours);
        nested_ours |= query.tainted;
        query.text.into_owned()
    });
    rewrite(&mut e.detail, |detail| mask_prepared_detail(detail, ran));
    add_hint(e, tainted || nested_ours);
    if !tainted && !nested_ours {
        return Decision::Emit;
    }
    // The statement itself, if it is ours; an error about a nested call of ours (an
    // application's function that calls us) masks what it quotes either way.
    let statement = statement
        .as_deref()
        .zip(shown_statement)
        .filter(|(_, shown)| shown.tainted);
    let values = statement
        .as_ref()
        .map(|(_, shown)| shown.values.clone())
        .unwrap_or_default();
    if let Some((original, shown)) = &statement {
        show_statement_as(original, &shown.text);
    }
    // Postgres's own errors about a statement of ours may quote an argument (a literal or a
    // bind parameter); the extension's own messages never do.
    let ours_raised = text_of(e.filename).is_some_and(|f| f.ends_with(".rs"));
    // (ERROR only: a FATAL names a process or a connection, never an argument.)
    let error = e.elevel == pg_sys::PGERROR as i32 && !ours_raised;
    let mask_quoted = |text: String| if error { without_quoted(&text) } else { text };
    rewrite(&mut e.message, |message| {
        let message = match &statement {
            Some((original, shown)) => message.replace(original, &shown.text),
            None => message.to_owned(),
        };
        mask_quoted(without_values(&message, &values))
    });
    rewrite(&mut e.detail, |detail| {
        // "parameters: …" until 16, "Parameters: …" since 17.
        match ["parameters:", "Parameters:"]
            .into_iter()
            .find(|label| detail.starts_with(label))
        {
            Some(label) => format!("{label} {REDACTED}"),
            None => mask_quoted(without_values(detail, &values)),
        }
    });
    rewrite(&mut e.hint, |hint| without_values(hint, &values));
    rewrite(&mut e.context, |context| {
        without_values(&mask_argument_context(context), &values)
    });
    Decision::Emit
}

/// A hint that teaches, where Postgres gives none: the expected format of an argument of a
/// call of ours, or whom a function named like one of ours is granted to (a denial names no
/// schema, so any statement may be about ours).
unsafe fn add_hint(e: &mut pg_sys::ErrorData, about_our_call: bool) {
    let denied = e.sqlerrcode == pgrx::PgSqlErrorCode::ERRCODE_INSUFFICIENT_PRIVILEGE as i32;
    if !e.hint.is_null() || !(about_our_call || denied) {
        return;
    }
    if let Some(hint) = text_of(e.message).and_then(|m| hints::hint_for(e.sqlerrcode, &m)) {
        e.hint = error_cstring(&hint);
    }
}

/// Log channels in force in this session that cannot be redacted: auto_explain (its plans show
/// constants and, with log_verbose, a call's arguments) and pg_stat_statements with
/// track_utility (utility statements such as DO, EXPLAIN ANALYZE, DECLARE CURSOR and CREATE
/// TABLE AS are kept with their literals, readable by pg_read_all_stats), one sentence each.
pub fn unsafe_log_channels() -> Vec<&'static str> {
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
    // Since 18 a cursor's query, tracked as a nested statement, is kept as the DECLARE's text,
    // literals and all.
    #[cfg(feature = "pg18")]
    if setting(c"pg_stat_statements.track").as_deref() == Some("all") {
        found.push("pg_stat_statements keeps a cursor's query with its literals (pg_stat_statements.track is all)");
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
    found
}

/// The unsafe log channels in force as one sentence; None when there is none.
fn unsafe_log_channels_text() -> Option<String> {
    let found = unsafe_log_channels();
    (!found.is_empty()).then(|| found.join("; "))
}

thread_local! {
    /// The last unsafe-channel report this backend warned about, so it warns once per change.
    static WARNED: RefCell<Option<String>> = const { RefCell::new(None) };
}

/// A WARNING, once per backend and change of settings, while an unredactable log channel is in
/// force; called when the extension is used.
pub fn warn_about_unsafe_channels() {
    let problem = unsafe_log_channels_text();
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
    unsafe_log_channels_text()
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
        let logged = redact_setting_change(
            "parameter \"vetassist_auth.master_key_command\" changed to \"VAULT_TOKEN=s.1 unwrap\"",
        )
        .unwrap();
        assert!(!logged.contains("s.1"));
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
        assert_eq!(
            without_quoted(
                r#"unterminated quoted string at or near "'{"n": "SECRET"}" at character 9"#
            ),
            r#"unterminated quoted string at or near "<redacted>" at character 9"#
        );
        assert_eq!(
            without_quoted("Key (icn)=(1012667985V123456) already exists."),
            "Key (icn)=(<redacted>) already exists."
        );
        assert_eq!(
            without_quoted("Failing row contains (1, PTSD, null)."),
            "Failing row contains (<redacted>)."
        );
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
