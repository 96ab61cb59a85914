//! What the log redaction knows of a text (a statement, a PL/pgSQL expression, a prepared
//! statement): whether it calls the extension, and its masked forms. Decided with Postgres's
//! scanner and parser (`scan`), where they may raise (`analyze_caught`, in
//! `post_parse_analyze_hook` and on entry to a function of ours) or on text Postgres has just
//! parsed (`analyze_parsed`, in the log hook), and kept per backend so the log hook itself
//! only looks texts up.

use super::scan::{self, Kind, Token, SCHEMA};
use aho_corasick::AhoCorasick;
use pgrx::{pg_sys, PgTryBuilder};
use std::cell::RefCell;
use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::rc::Rc;
use std::sync::OnceLock;

pub const MASK: &str = "<redacted>";

/// What the redaction knows of one text.
#[derive(Debug, PartialEq, Eq)]
pub struct Verdict {
    /// It calls a function of ours (or runs a prepared statement that does, or is a statement
    /// on a Citus shard of one of our tables), or it does not parse.
    pub ours: bool,
    /// The text with the literals of each call of ours masked, and the rest as written.
    pub calls_masked: String,
    /// The text with every literal masked (once a function of ours ran in its statement).
    pub all_masked: String,
    /// The contents of the string literals `calls_masked` masks (3 bytes or more), looked for
    /// in messages that quote one.
    pub masked_values: Vec<String>,
    /// The same for every string literal (`all_masked`).
    pub all_values: Vec<String>,
}

/// Whether `text` may concern the extension at all: it names our schema or one of our
/// functions as a whole word, spells a name with Unicode escapes, or EXECUTEs a prepared
/// statement (which may be one of ours). A text that does not is never parsed a second time.
pub fn mentions_us(text: &str) -> bool {
    static NAMES: OnceLock<AhoCorasick> = OnceLock::new();
    let names = NAMES.get_or_init(|| {
        let patterns = scan::EXTENSION_FUNCTIONS
            .iter()
            .copied()
            .chain([SCHEMA, "u&\"", "execute"]);
        AhoCorasick::builder()
            .ascii_case_insensitive(true)
            .build(patterns)
            .expect("the extension's names are valid patterns")
    });
    let bytes = text.as_bytes();
    let word = |b: Option<&u8>| {
        b.is_some_and(|&b| b.is_ascii_alphanumeric() || b == b'_' || b == b'$' || b >= 0x80)
    };
    names.find_overlapping_iter(text).any(|m| {
        let spelled = bytes[m.start()] == b'u' || bytes[m.start()] == b'U';
        let escaped = spelled && bytes.get(m.start() + 1) == Some(&b'&');
        escaped
            || (!word(m.start().checked_sub(1).and_then(|i| bytes.get(i)))
                && !word(bytes.get(m.end())))
    })
}

/// Where analysis may read code (a DO block's body) with the scanner: only where an ERROR can
/// be caught.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Place {
    Caught,
    LogHook,
}

/// A text whose code mentions the extension and must be read where an ERROR can be caught.
pub struct NeedsCode;

/// Analyzes `text` where an ERROR can be caught: nothing it contains makes it raise. A text
/// that does not parse is masked as far as the scanner reads it, and the rest replaced.
pub fn analyze_caught(text: &str) -> Verdict {
    let Ok(c_text) = CString::new(text) else {
        return unreadable();
    };
    let _quiet = Quiet::new();
    // SAFETY: every call that may raise is inside a PgTryBuilder, in a backend context that is
    // not reporting an error.
    unsafe { analyze(text, &c_text, Place::Caught) }.unwrap_or_else(|NeedsCode| unreadable())
}

/// Analyzes a statement Postgres has just parsed under the current settings (a `statement:`
/// line of log_statement): parsing and scanning it again cannot raise. Code in it (a DO body)
/// was never scanned, so a text whose code mentions the extension is `NeedsCode`.
///
/// # Safety
/// Only on text Postgres parsed successfully since the last change of settings.
pub unsafe fn analyze_parsed(text: &str) -> Result<Verdict, NeedsCode> {
    let Ok(c_text) = CString::new(text) else {
        return Ok(unreadable());
    };
    let _quiet = Quiet::new();
    // The parse trees go into a context of their own, deleted right after: the hook runs in
    // ErrorContext, which a LOG line never resets.
    let scratch = pg_sys::AllocSetContextCreateInternal(
        pg_sys::TopMemoryContext,
        c"vetassist_auth log redaction".as_ptr(),
        pg_sys::ALLOCSET_DEFAULT_MINSIZE as _,
        pg_sys::ALLOCSET_DEFAULT_INITSIZE as _,
        pg_sys::ALLOCSET_DEFAULT_MAXSIZE as _,
    );
    let caller = pg_sys::MemoryContextSwitchTo(scratch);
    let analyzed = analyze(text, &c_text, Place::LogHook);
    pg_sys::MemoryContextSwitchTo(caller);
    pg_sys::MemoryContextDelete(scratch);
    analyzed
}

/// A text that cannot be read at all (it holds a NUL): replaced whole.
fn unreadable() -> Verdict {
    Verdict {
        ours: true,
        calls_masked: MASK.to_owned(),
        all_masked: MASK.to_owned(),
        masked_values: Vec::new(),
        all_values: Vec::new(),
    }
}

/// Keeps the scanner's and parser's own notices (an identifier truncated) out of the log and
/// the client while the redaction reads a text Postgres has already read, and restores the
/// settings when dropped (also when an ERROR unwinds through it).
struct Quiet {
    log: std::ffi::c_int,
    client: std::ffi::c_int,
}

impl Quiet {
    fn new() -> Self {
        // SAFETY: plain globals of this backend, restored on drop.
        unsafe {
            let quiet = Quiet {
                log: pg_sys::log_min_messages,
                client: pg_sys::client_min_messages,
            };
            pg_sys::log_min_messages = pg_sys::PGERROR as std::ffi::c_int;
            pg_sys::client_min_messages = pg_sys::PGERROR as std::ffi::c_int;
            quiet
        }
    }
}

impl Drop for Quiet {
    fn drop(&mut self) {
        // SAFETY: as in new.
        unsafe {
            pg_sys::log_min_messages = self.log;
            pg_sys::client_min_messages = self.client;
        }
    }
}

/// Runs `f`, catching an ERROR (in `Place::Caught`) as None.
fn caught<T>(place: Place, f: impl FnOnce() -> T) -> Option<T> {
    match place {
        Place::LogHook => Some(f()),
        Place::Caught => PgTryBuilder::new(std::panic::AssertUnwindSafe(|| Some(f())))
            .catch_others(|_| None)
            .execute(),
    }
}

unsafe fn analyze(text: &str, c_text: &CStr, place: Place) -> Result<Verdict, NeedsCode> {
    let statements = match place {
        Place::LogHook => Some(scan::statements(
            c_text,
            pg_sys::RawParseMode::RAW_PARSE_DEFAULT,
        )),
        Place::Caught => scan::PARSE_MODES
            .iter()
            .find_map(|&mode| caught(place, || scan::statements(c_text, mode))),
    };
    let mut tokens = Vec::new();
    let lexed = match place {
        Place::LogHook => {
            tokens = scan::tokens(c_text);
            true
        }
        Place::Caught => caught(place, || scan::tokens(c_text))
            .map(|t| tokens = t)
            .is_some(),
    };
    let Some(statements) = statements.filter(|_| lexed) else {
        return Ok(not_parsed(text, &tokens, lexed));
    };
    let mut masks = Masks::new(tokens.len());
    let mut ours = false;
    // Prepared statements of ours this text defines, for an EXECUTE later in it.
    let mut prepared_here: Vec<&String> = Vec::new();
    for statement in &statements {
        let range = token_range(&tokens, statement.start, statement.end);
        let shard = if statement.complete {
            statement.names_shard
        } else {
            shard_statement(&tokens[range.clone()])
        };
        let whole = shard
            || statement.sets_hidden
            || statement
                .executes
                .iter()
                .any(|name| prepared_here.contains(&name) || prepared_is_ours(name, place));
        if whole {
            ours = true;
            masks.all_in(range.clone());
            continue;
        }
        let calls = if statement.complete {
            statement
                .calls
                .iter()
                .filter_map(|&at| tokens.iter().position(|t| t.start == at))
                .filter_map(|first| call_arguments(&tokens, first))
                .collect()
        } else {
            token_calls(&tokens[range.clone()])
                .into_iter()
                .map(|r| r.start + range.start..r.end + range.start)
                .collect::<Vec<_>>()
        };
        if !calls.is_empty() {
            prepared_here.extend(statement.prepares.as_ref());
        }
        for args in calls {
            ours = true;
            masks.all_in(args);
        }
        for &at in &statement.code {
            for k in code_strings(&tokens, at) {
                masks.code.insert(k, read_code(text, &tokens[k], place)?);
                if masks.code[&k].ours {
                    ours = true;
                }
            }
        }
    }
    Ok(masks.verdict(text, &tokens, ours))
}

/// A text the parser refused: every literal the scanner read is masked, and whatever follows
/// the point where the scanner stopped is replaced.
fn not_parsed(text: &str, tokens: &[Token], lexed: bool) -> Verdict {
    let mut masks = Masks::new(tokens.len());
    masks.all_in(0..tokens.len());
    let mut verdict = masks.verdict(text, tokens, true);
    if !lexed {
        let read_to = tokens.last().map_or(0, |t| t.end);
        for masked in [&mut verdict.calls_masked, &mut verdict.all_masked] {
            // The masked text ends with the text after the last token read, unmasked.
            let tail = &text[read_to..];
            if !tail.trim().is_empty() {
                masked.truncate(masked.len() - tail.len());
                masked.push(' ');
                masked.push_str(MASK);
            }
        }
    }
    verdict
}

/// The tokens within a byte span.
fn token_range(tokens: &[Token], start: usize, end: usize) -> std::ops::Range<usize> {
    let first = tokens
        .iter()
        .position(|t| t.start >= start)
        .unwrap_or(tokens.len());
    let last = tokens[first..]
        .iter()
        .position(|t| t.start >= end)
        .map_or(tokens.len(), |k| first + k);
    first..last
}

/// A statement Citus sends a worker for a shard of one of our tables
/// (`INSERT INTO vetassist_auth.session_events_102041 …`), read by its tokens where the walk
/// of its parse tree does not reach.
fn shard_statement(tokens: &[Token]) -> bool {
    tokens.windows(3).any(|w| {
        w[0].name() == Some(SCHEMA)
            && w[1].is(b'.')
            && w[2].name().is_some_and(scan::is_shard_of_ours)
    })
}

/// The argument list of the call whose name starts at token `first`: the tokens from its `(`
/// to the matching `)`.
fn call_arguments(tokens: &[Token], first: usize) -> Option<std::ops::Range<usize>> {
    let open = first + tokens[first..].iter().position(|t| t.is(b'('))?;
    let mut depth = 0usize;
    for (k, t) in tokens.iter().enumerate().skip(open) {
        if t.is(b'(') {
            depth += 1;
        } else if t.is(b')') {
            depth -= 1;
            if depth == 0 {
                return Some(open..k + 1);
            }
        }
    }
    Some(open..tokens.len())
}

/// Calls of ours found by their tokens (in code, and in statements the parse tree walk does
/// not know): `vetassist_auth . name (` or one of our names followed by `(` and not qualified
/// by another schema.
fn token_calls(tokens: &[Token]) -> Vec<std::ops::Range<usize>> {
    let mut found = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        let Some(name) = t.name() else { continue };
        let qualified = name == SCHEMA
            && tokens.get(i + 1).is_some_and(|t| t.is(b'.'))
            && tokens.get(i + 2).and_then(Token::name).is_some()
            && tokens.get(i + 3).is_some_and(|t| t.is(b'('));
        let unqualified = scan::names_ours(&[name])
            && tokens.get(i + 1).is_some_and(|t| t.is(b'('))
            && !i.checked_sub(1).is_some_and(|p| tokens[p].is(b'.'));
        if qualified || unqualified {
            found.extend(call_arguments(tokens, i));
        }
    }
    found
}

/// The string tokens that are code: a DO body (the token at `at`) or a function's body (the
/// strings after the `AS` at `at`).
fn code_strings(tokens: &[Token], at: usize) -> Vec<usize> {
    let Some(k) = tokens.iter().position(|t| t.start == at) else {
        return Vec::new();
    };
    if tokens[k].is_literal() {
        return vec![k];
    }
    let mut found = Vec::new();
    let mut next = k + 1;
    while tokens.get(next).is_some_and(Token::is_literal) {
        found.push(next);
        if !tokens.get(next + 1).is_some_and(|t| t.is(b',')) {
            break;
        }
        next += 2;
    }
    found
}

/// Whether the prepared statement `name` of this session calls the extension.
fn prepared_is_ours(name: &str, place: Place) -> bool {
    let Some(text) = super::prepared_statement_text(name) else {
        return false;
    };
    if !mentions_us(&text) {
        return false;
    }
    match (lookup(&text), place) {
        (Some(verdict), _) => verdict.ours,
        (None, Place::Caught) => remember(&text, analyze_caught(&text)).ours,
        // Not known and not to be parsed here: taken to be ours.
        (None, Place::LogHook) => true,
    }
}

/// A code string, read token by token, and its masked forms.
struct Code {
    ours: bool,
    calls_masked: String,
    all_masked: String,
}

/// How deep strings in code are read as code: a DO body, a string it EXECUTEs, and one more.
const CODE_DEPTH: u8 = 3;

unsafe fn read_code(text: &str, token: &Token, place: Place) -> Result<Code, NeedsCode> {
    let Kind::Literal { value: Some(body) } = &token.kind else {
        return Ok(whole_code(false));
    };
    if !mentions_us(body) {
        return Ok(Code {
            ours: false,
            calls_masked: text[token.start..token.end].to_owned(),
            // Once a function of ours ran, code that does not name us is masked whole.
            all_masked: MASK.to_owned(),
        });
    }
    if place == Place::LogHook {
        return Err(NeedsCode);
    }
    Ok(written_back(text, token, code_masks(body, CODE_DEPTH)))
}

/// Masked code put back into the string token it came from (`requote`), or masked whole where
/// it cannot be written as Postgres read it.
fn written_back(text: &str, token: &Token, code: Code) -> Code {
    let requoted = |masked: &str| requote(text, token, masked).unwrap_or_else(|| MASK.to_owned());
    Code {
        ours: code.ours,
        calls_masked: requoted(&code.calls_masked),
        all_masked: requoted(&code.all_masked),
    }
}

/// A code string that could not be read: masked whole.
fn whole_code(ours: bool) -> Code {
    Code {
        ours,
        calls_masked: MASK.to_owned(),
        all_masked: MASK.to_owned(),
    }
}

/// The string token with its content replaced, written as it was quoted (dollar quotes, or
/// plain quotes with doubled quotes). None when the content cannot be written back exactly
/// as Postgres read it (an escape string, a continuation): the caller masks it whole.
fn requote(text: &str, token: &Token, rewritten: &str) -> Option<String> {
    let Kind::Literal { value: Some(value) } = &token.kind else {
        return None;
    };
    let raw = &text[token.start..token.end];
    if let Some(after) = raw.strip_prefix('$') {
        let tag = &raw[..after.find('$')? + 2];
        (raw.len() == 2 * tag.len() + value.len()
            && raw[tag.len()..raw.len() - tag.len()] == **value)
            .then(|| format!("{tag}{rewritten}{tag}"))
    } else {
        (raw == format!("'{}'", value.replace('\'', "''")))
            .then(|| format!("'{}'", rewritten.replace('\'', "''")))
    }
}

/// The calls of ours in code. A string inside code (what it EXECUTEs) is SQL: where it parses,
/// its calls are the parse tree's (an alias named like one of ours is none); a PL/pgSQL body,
/// or SQL that does not parse, is read token by token.
fn code_calls(body: &CStr, tokens: &[Token], depth: u8) -> Vec<std::ops::Range<usize>> {
    if depth < CODE_DEPTH {
        // SAFETY: the parser may raise on text that is no SQL; it is caught.
        let parsed = caught(Place::Caught, || unsafe {
            scan::statements(body, pg_sys::RawParseMode::RAW_PARSE_DEFAULT)
        });
        if let Some(statements) = parsed.filter(|s| s.iter().all(|s| s.complete)) {
            return statements
                .iter()
                .flat_map(|s| s.calls.iter())
                .filter_map(|&at| tokens.iter().position(|t| t.start == at))
                .filter_map(|first| call_arguments(tokens, first))
                .collect();
        }
    }
    token_calls(tokens)
}

/// Masks code (a DO body, a function body, a string EXECUTEd in one) token by token: the
/// arguments of each call of ours, and every literal of a statement that runs a string
/// holding a call of ours (`EXECUTE format('… vetassist_auth.f(%L)', x) USING …`). Must run
/// where an ERROR can be caught.
fn code_masks(body: &str, depth: u8) -> Code {
    let Ok(c_body) = CString::new(body) else {
        return whole_code(true);
    };
    // SAFETY: the scanner may raise on code it cannot read; it is caught.
    let strings = CODE_STRINGS.get().unwrap_or_else(standard_strings);
    let lexed = with_standard_strings(strings, || {
        caught(Place::Caught, || unsafe { scan::tokens(&c_body) })
    });
    let Some(tokens) = lexed else {
        return whole_code(true);
    };
    let mut masks = Masks::new(tokens.len());
    let mut ours = false;
    for args in code_calls(&c_body, &tokens, depth) {
        ours = true;
        masks.all_in(args);
    }
    if depth > 1 {
        let mut segment_start = 0;
        for (k, t) in tokens.iter().enumerate() {
            let end = t.is(b';') || k + 1 == tokens.len();
            if !end {
                continue;
            }
            let segment = segment_start..k + 1;
            let mut runs_ours = false;
            for s in segment.clone() {
                if let Kind::Literal { value: Some(inner) } = &tokens[s].kind {
                    if mentions_us(inner) {
                        let code = code_masks(inner, depth - 1);
                        if code.ours {
                            runs_ours = true;
                            masks.code.insert(s, written_back(body, &tokens[s], code));
                        }
                    }
                }
            }
            if runs_ours {
                ours = true;
                masks.all_in(segment);
            }
            segment_start = k + 1;
        }
    }
    let verdict = masks.verdict(body, &tokens, ours);
    Code {
        ours,
        calls_masked: verdict.calls_masked,
        all_masked: verdict.all_masked,
    }
}

/// Which literals of a text are masked, and the code strings in it.
struct Masks {
    masked: Vec<bool>,
    code: HashMap<usize, Code>,
}

impl Masks {
    fn new(n: usize) -> Self {
        Masks {
            masked: vec![false; n],
            code: HashMap::new(),
        }
    }

    fn all_in(&mut self, range: std::ops::Range<usize>) {
        for m in &mut self.masked[range] {
            *m = true;
        }
    }

    /// The text written twice: with the chosen literals masked, and with every literal masked.
    /// A code string is rewritten with its own masks, unless a call's arguments hold it.
    fn verdict(self, text: &str, tokens: &[Token], ours: bool) -> Verdict {
        let mut calls_masked = String::with_capacity(text.len());
        let mut all_masked = String::with_capacity(text.len());
        let mut at = 0;
        for (k, t) in tokens.iter().enumerate() {
            if !t.is_literal() {
                continue;
            }
            let between = &text[at..t.start];
            calls_masked.push_str(between);
            all_masked.push_str(between);
            match self.code.get(&k) {
                Some(code) if !self.masked[k] || code.ours => {
                    calls_masked.push_str(&code.calls_masked);
                    all_masked.push_str(&code.all_masked);
                }
                _ => {
                    calls_masked.push_str(if self.masked[k] {
                        MASK
                    } else {
                        &text[t.start..t.end]
                    });
                    all_masked.push_str(MASK);
                }
            }
            at = t.end;
        }
        calls_masked.push_str(&text[at..]);
        all_masked.push_str(&text[at..]);
        // The contents of masked literals, code excepted (its own literals are masked in it).
        let values = |masked: &dyn Fn(usize) -> bool| {
            let mut values: Vec<String> = tokens
                .iter()
                .enumerate()
                .filter(|(k, _)| masked(*k) && !self.code.contains_key(k))
                .filter_map(|(_, t)| match &t.kind {
                    Kind::Literal { value: Some(v) } if v.len() >= 3 => Some(v.clone()),
                    _ => None,
                })
                .collect();
            values.sort_unstable();
            values.dedup();
            values.truncate(MAX_VALUES);
            values
        };
        Verdict {
            ours,
            calls_masked,
            all_masked,
            masked_values: values(&|k| self.masked[k]),
            all_values: values(&|_| true),
        }
    }
}

/// Literal values of a statement looked for in its messages: the hook runs inside error
/// reporting, where no cancel is served, so its work is bounded.
const MAX_VALUES: usize = 64;

/// Texts analyzed by this backend, most recently used last. A backend's calls of the
/// extension are few distinct texts (bind parameters); the bound keeps the memory small.
const CACHED_TEXTS: usize = 256;

thread_local! {
    static VERDICTS: RefCell<Cache> = RefCell::new(Cache::default());
}

/// A text's hash, to know it again without keeping it.
pub fn text_hash(text: &[u8]) -> u64 {
    use std::hash::BuildHasher;
    foldhash::fast::FixedState::with_seed(0).hash_one(text)
}

/// Verdicts by text, each with the standard_conforming_strings it was read under.
#[derive(Default)]
struct Cache {
    entries: HashMap<String, Entry>,
    clock: u64,
}

struct Entry {
    verdict: Rc<Verdict>,
    /// standard_conforming_strings the text, and the code in it, were read under.
    standard_strings: bool,
    code_strings: bool,
    used: u64,
}

fn standard_strings() -> bool {
    // SAFETY: a plain global setting of this backend.
    unsafe { pg_sys::standard_conforming_strings }
}

/// Runs `f` with standard_conforming_strings set to `value`, restored afterwards (also when an
/// ERROR unwinds through).
pub fn with_standard_strings<T>(value: bool, f: impl FnOnce() -> T) -> T {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            // SAFETY: a plain global setting of this backend.
            unsafe { pg_sys::standard_conforming_strings = self.0 };
        }
    }
    let _restore = Restore(standard_strings());
    // SAFETY: as above.
    unsafe { pg_sys::standard_conforming_strings = value };
    f()
}

thread_local! {
    /// How code (a DO body) is read when it differs from the text around it.
    static CODE_STRINGS: std::cell::Cell<Option<bool>> = const { std::cell::Cell::new(None) };
}

/// Reads the code in `text` again under the setting in force now, if the text was read under
/// another: Postgres compiles a DO block's or a function's body when that statement runs, and
/// a statement before it in the same message may have changed standard_conforming_strings.
pub fn reread_code(text: &str) {
    let now = standard_strings();
    let Some(outer) = VERDICTS.with_borrow(|cache| {
        cache
            .entries
            .get(text)
            .filter(|entry| entry.code_strings != now)
            .map(|entry| entry.standard_strings)
    }) else {
        return;
    };
    CODE_STRINGS.set(Some(now));
    let verdict = with_standard_strings(outer, || analyze_caught(text));
    CODE_STRINGS.set(None);
    remember(text, verdict);
    VERDICTS.with_borrow_mut(|cache| {
        if let Some(entry) = cache.entries.get_mut(text) {
            entry.standard_strings = outer;
            entry.code_strings = now;
        }
    });
}

/// The verdict on `text`, if this backend has one: as it was read when Postgres parsed it,
/// even if a later statement changed how strings are read.
pub fn lookup(text: &str) -> Option<Rc<Verdict>> {
    VERDICTS.with_borrow_mut(|cache| {
        cache.clock += 1;
        let clock = cache.clock;
        cache.entries.get_mut(text).map(|entry| {
            entry.used = clock;
            entry.verdict.clone()
        })
    })
}

/// The standard_conforming_strings this backend's verdict on `text` was read under, if it has
/// one.
pub fn read_under(text: &str) -> Option<bool> {
    VERDICTS.with_borrow(|cache| cache.entries.get(text).map(|entry| entry.standard_strings))
}

/// Keeps a verdict, dropping the least recently used beyond the bound (never the running
/// statement's, which its later lines need).
pub fn remember(text: &str, verdict: Verdict) -> Rc<Verdict> {
    let verdict = Rc::new(verdict);
    let running = super::current_statement_text();
    VERDICTS.with_borrow_mut(|cache| {
        if cache.entries.len() >= CACHED_TEXTS && !cache.entries.contains_key(text) {
            if let Some(oldest) = cache
                .entries
                .iter()
                .filter(|(text, _)| Some(text.as_str()) != running.as_deref())
                .min_by_key(|(_, entry)| entry.used)
                .map(|(text, _)| text.clone())
            {
                cache.entries.remove(&oldest);
            }
        }
        cache.clock += 1;
        let entry = Entry {
            verdict: verdict.clone(),
            standard_strings: standard_strings(),
            code_strings: standard_strings(),
            used: cache.clock,
        };
        cache.entries.insert(text.to_owned(), entry);
    });
    verdict
}

/// Without a backend.
#[cfg(test)]
mod pure {
    use super::*;

    #[test]
    fn only_whole_names_of_ours_count_as_a_mention() {
        assert!(mentions_us("SELECT vetassist_auth.store_va_tokens($1)"));
        assert!(mentions_us("select TOUCH_SESSION('j')"));
        assert!(mentions_us(r#"SELECT U&"vetassist\005fauth".x()"#));
        assert!(!mentions_us("UPDATE t SET touched_at = now()"));
        assert!(!mentions_us("SELECT retouch(1), encrypted FROM t"));
        assert!(!mentions_us("SELECT 1"));
        assert!(mentions_us("EXECUTE st('x')"));
    }

    #[test]
    fn requoting_keeps_the_quotes_or_refuses() {
        let token = |text: &str, value: &str| Token {
            start: 0,
            end: text.len(),
            kind: Kind::Literal {
                value: Some(value.to_owned()),
            },
        };
        let dollar = "$q$ body $q$";
        assert_eq!(
            requote(dollar, &token(dollar, " body "), "<m>").as_deref(),
            Some("$q$<m>$q$")
        );
        let plain = "'it''s'";
        assert_eq!(
            requote(plain, &token(plain, "it's"), "x'y").as_deref(),
            Some("'x''y'")
        );
        let escaped = r"E'a\nb'";
        assert_eq!(requote(escaped, &token(escaped, "a\nb"), "z"), None);
    }

    #[test]
    fn calls_are_found_by_their_tokens() {
        let name = |s: &str, at: usize| Token {
            start: at,
            end: at + s.len(),
            kind: Kind::Name(s.into()),
        };
        let punct = |c: u8, at: usize| Token {
            start: at,
            end: at + 1,
            kind: Kind::Punct(c),
        };
        let literal = |at: usize| Token {
            start: at,
            end: at + 3,
            kind: Kind::Literal { value: None },
        };
        // vetassist_auth . f ( 'x' ) , other . touch_session ( 'y' )
        let tokens = vec![
            name(SCHEMA, 0),
            punct(b'.', 1),
            name("f", 2),
            punct(b'(', 3),
            literal(4),
            punct(b')', 7),
            name("other", 9),
            punct(b'.', 10),
            name("touch_session", 11),
            punct(b'(', 12),
            literal(13),
            punct(b')', 16),
        ];
        assert_eq!(token_calls(&tokens), vec![3..6]);
    }
}

/// The analysis on Postgres's own scanner and parser, in a backend (`cargo pgrx test`).
#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::analyze_caught;
    use pgrx::prelude::*;

    fn masked(text: &str) -> String {
        analyze_caught(text).calls_masked
    }

    #[pg_test]
    fn each_call_of_ours_has_its_arguments_masked_and_nothing_else() {
        for (sent, logged) in [
            (
                "SELECT -- note\rvetassist_auth.store_va_tokens('u', 'TOKEN'), 'kept'",
                "SELECT -- note\rvetassist_auth.store_va_tokens(<redacted>, <redacted>), 'kept'",
            ),
            (
                r#"SELECT U&"vetassist\005fauth".U&"encrypt\005ftext"('a', 'b')"#,
                r#"SELECT U&"vetassist\005fauth".U&"encrypt\005ftext"(<redacted>, <redacted>)"#,
            ),
            (
                r"WITH t AS (SELECT touch_session(E'j\\x')) SELECT * FROM t, LATERAL (SELECT 1) l",
                "WITH t AS (SELECT touch_session(<redacted>)) SELECT * FROM t, LATERAL (SELECT 1) l",
            ),
            (
                "EXPLAIN ANALYZE SELECT vetassist_auth.encrypt_text($q$A$q$, 'b'), 'c'",
                "EXPLAIN ANALYZE SELECT vetassist_auth.encrypt_text(<redacted>, <redacted>), 'c'",
            ),
            (
                "COPY (SELECT vetassist_auth.field_hash('m@x.org', 'email')) TO STDOUT",
                "COPY (SELECT vetassist_auth.field_hash(<redacted>, <redacted>)) TO STDOUT",
            ),
            (
                r"DECLARE c CURSOR FOR SELECT vetassist_auth.encrypt_text(1.5e3::text, U&'\0041')",
                "DECLARE c CURSOR FOR SELECT vetassist_auth.encrypt_text(<redacted>::text, <redacted>)",
            ),
            (
                "(SELECT vetassist_auth.mfa_verify('jti', '654321'))",
                "(SELECT vetassist_auth.mfa_verify(<redacted>, <redacted>))",
            ),
            (
                "g := (SELECT vetassist_auth.store_va_tokens('u', 'T'))",
                "g := (SELECT vetassist_auth.store_va_tokens(<redacted>, <redacted>))",
            ),
            (
                "INSERT INTO vetassist_auth.sessions_102008 VALUES ('x', 1)",
                "INSERT INTO vetassist_auth.sessions_102008 VALUES (<redacted>, <redacted>)",
            ),
        ] {
            assert_eq!(masked(sent), logged, "{sent}");
        }
    }

    #[pg_test]
    fn code_is_read_token_by_token() {
        for (sent, logged) in [
            (
                "DO $$BEGIN PERFORM vetassist_auth.store_va_tokens('u', 'T'); RAISE NOTICE 'kept'; END$$",
                "DO $$BEGIN PERFORM vetassist_auth.store_va_tokens(<redacted>, <redacted>); RAISE NOTICE 'kept'; END$$",
            ),
            (
                "DO $d$BEGIN EXECUTE format('SELECT vetassist_auth.encrypt_text(%L, %L)', 'u', 'T'); PERFORM 'kept'; END$d$",
                "DO $d$BEGIN EXECUTE format('SELECT vetassist_auth.encrypt_text(%L, %L)', <redacted>, <redacted>); PERFORM 'kept'; END$d$",
            ),
            (
                "DO $$BEGIN EXECUTE 'SELECT vetassist_auth.encrypt_text(''T'', ''c'')'; END$$",
                "DO $$BEGIN EXECUTE 'SELECT vetassist_auth.encrypt_text(<redacted>, <redacted>)'; END$$",
            ),
            (
                "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS 'SELECT vetassist_auth.encrypt_text(''T'', ''c'')'",
                "CREATE FUNCTION f() RETURNS text LANGUAGE sql AS 'SELECT vetassist_auth.encrypt_text(<redacted>, <redacted>)'",
            ),
        ] {
            assert_eq!(masked(sent), logged, "{sent}");
        }
    }

    #[pg_test]
    fn a_mention_that_is_no_call_changes_nothing() {
        for sent in [
            "UPDATE t SET d = 'X' FROM (VALUES (1)) AS touch_session(x) WHERE t.id = touch_session.x",
            "SELECT 'vetassist_auth.store_va_tokens(1)' /* vetassist_auth.x('y') */ -- touch_session('z')",
            r#"SELECT touch_session FROM t WHERE "TOUCH_SESSION"('q') IS NULL OR other.touch_session('w')"#,
            "DO $$BEGIN IF false THEN PERFORM touch_session(NULL); END IF; EXECUTE 'ALTER ROLE r SET application_name = ''visible'''; END$$",
            "CREATE FUNCTION touch_session(t text) RETURNS text LANGUAGE sql AS 'SELECT ''kept'''",
            "CREATE FUNCTION f(x text) RETURNS text LANGUAGE plpgsql AS $$BEGIN IF false THEN RETURN vetassist_auth.touch_session(x); END IF; RETURN 'kept'; END$$",
            "DO $d$BEGIN EXECUTE 'SELECT x FROM (VALUES (''kept'')) AS field_hash(x)'; END$d$",
        ] {
            assert_eq!(masked(sent), sent);
        }
        assert!(!analyze_caught("SELECT 'vetassist_auth.x(1)'").ours);
        // SQL that code EXECUTEs is read by the parser: an alias is no call.
        assert!(
            !analyze_caught(
                "DO $$BEGIN EXECUTE 'SELECT x FROM (VALUES (1)) AS field_hash(x)'; END$$"
            )
            .ours
        );
    }

    #[pg_test]
    fn a_text_that_does_not_parse_keeps_no_literal() {
        assert_eq!(
            masked("SELECT vetassist_auth.store_va_tokens('u', 'TOKEN' ,"),
            "SELECT vetassist_auth.store_va_tokens(<redacted>, <redacted> ,"
        );
        let cut = masked("SELECT vetassist_auth.store_va_tokens('u', 'TOKEN");
        assert!(!cut.contains("TOKEN"), "{cut}");
        assert!(analyze_caught("SELECT 'x' FROM WHERE").ours);
    }

    #[pg_test]
    fn strings_are_read_as_the_setting_reads_them() {
        Spi::run("SET LOCAL standard_conforming_strings = off").unwrap();
        assert_eq!(
            masked(r"SELECT vetassist_auth.encrypt_text('a\' b', 'c')"),
            "SELECT vetassist_auth.encrypt_text(<redacted>, <redacted>)"
        );
    }
}
