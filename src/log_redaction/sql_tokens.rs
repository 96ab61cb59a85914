//! A forgiving SQL tokenizer for deciding, from the statement itself, whether it calls the
//! extension, and for masking its literals. Pure Rust: it never raises an ERROR (it runs inside
//! the log hook, while Postgres reports another error), and reads a truncated or malformed
//! statement as far as it goes. Comments are skipped and string contents never count as names,
//! so `/* vetassist_auth */` or `'session'` decide nothing.

/// What a token is; identifiers are folded to lower case unless quoted.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    Ident(String),
    /// A string constant of any form ('…', E'…', $tag$…$tag$, B'…', X'…', U&'…'); the value is
    /// its content when it is a plain or dollar-quoted string.
    Str(Option<String>),
    Number,
    Param,
    Punct(char),
    Operator,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub kind: Kind,
    /// Byte span in the statement.
    pub start: usize,
    pub end: usize,
    /// For a dollar-quoted string: the length of its opening (and closing) delimiter.
    pub dollar_tag: Option<usize>,
}

fn ident_start(c: u8) -> bool {
    c.is_ascii_alphabetic() || c == b'_' || c >= 0x80
}

fn ident_char(c: u8) -> bool {
    ident_start(c) || c.is_ascii_digit() || c == b'$'
}

/// Splits `sql` into tokens. `standard_strings` is `standard_conforming_strings`: when off, a
/// backslash escapes inside '…' too.
pub fn tokens(sql: &str, standard_strings: bool) -> Vec<Token> {
    let b = sql.as_bytes();
    let n = b.len();
    let mut out = Vec::new();
    let mut i = 0;
    // The end of a quoted run starting after `open` (at the closing quote, or n), and whether
    // backslashes escape.
    let quoted_end = |mut j: usize, quote: u8, backslash: bool| -> usize {
        while j < n {
            if backslash && b[j] == b'\\' {
                j += 2;
            } else if b[j] == quote {
                if j + 1 < n && b[j + 1] == quote {
                    j += 2;
                } else {
                    return j + 1;
                }
            } else {
                j += 1;
            }
        }
        n
    };
    while i < n {
        let c = b[i];
        let start = i;
        if c.is_ascii_whitespace() {
            i += 1;
            continue;
        }
        if c == b'-' && b.get(i + 1) == Some(&b'-') {
            while i < n && b[i] != b'\n' {
                i += 1;
            }
            continue;
        }
        if c == b'/' && b.get(i + 1) == Some(&b'*') {
            // Comments nest in Postgres.
            let mut depth = 0;
            while i < n {
                if b[i] == b'/' && b.get(i + 1) == Some(&b'*') {
                    depth += 1;
                    i += 2;
                } else if b[i] == b'*' && b.get(i + 1) == Some(&b'/') {
                    depth -= 1;
                    i += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    i += 1;
                }
            }
            continue;
        }
        // Prefixed strings: E'…', B'…', X'…', N'…', U&'…'.
        let prefixed = match (c.to_ascii_lowercase(), b.get(i + 1), b.get(i + 2)) {
            (b'e', Some(b'\''), _) => Some((2, true)),
            (b'b' | b'x' | b'n', Some(b'\''), _) => Some((2, !standard_strings)),
            (b'u', Some(b'&'), Some(b'\'')) => Some((3, false)),
            _ => None,
        };
        if let Some((skip, backslash)) = prefixed {
            i = quoted_end(i + skip, b'\'', backslash);
            let plain = matches!(c.to_ascii_lowercase(), b'e' | b'n');
            let content = plain.then(|| unquote(&sql[start + skip..i], b'\''));
            out.push(token(Kind::Str(content), start, i));
            continue;
        }
        if c == b'\'' {
            i = quoted_end(i + 1, b'\'', !standard_strings);
            out.push(token(
                Kind::Str(Some(unquote(&sql[start + 1..i], b'\''))),
                start,
                i,
            ));
            continue;
        }
        if c == b'"' {
            i = quoted_end(i + 1, b'"', false);
            out.push(token(
                Kind::Ident(unquote(&sql[start + 1..i], b'"')),
                start,
                i,
            ));
            continue;
        }
        if c.eq_ignore_ascii_case(&b'u')
            && b.get(i + 1) == Some(&b'&')
            && b.get(i + 2) == Some(&b'"')
        {
            // U&"vetassist\005fauth": a name spelled with Unicode escapes.
            i = quoted_end(i + 3, b'"', false);
            let name = unescape_unicode(&unquote(&sql[start + 3..i], b'"'), '\\');
            out.push(token(Kind::Ident(name), start, i));
            continue;
        }
        if c == b'$' {
            // $1 is a parameter; $tag$ or $$ opens a dollar-quoted string.
            if b.get(i + 1).is_some_and(u8::is_ascii_digit) {
                i += 1;
                while i < n && b[i].is_ascii_digit() {
                    i += 1;
                }
                out.push(token(Kind::Param, start, i));
                continue;
            }
            let mut j = i + 1;
            while j < n && ident_char(b[j]) && b[j] != b'$' {
                j += 1;
            }
            if j < n && b[j] == b'$' {
                let tag = &sql[i..=j];
                let body = j + 1;
                let close = sql[body..].find(tag).map(|k| body + k);
                let (content_end, end) = match close {
                    Some(k) => (k, k + tag.len()),
                    None => (n, n),
                };
                i = end;
                out.push(Token {
                    kind: Kind::Str(Some(sql[body..content_end].to_owned())),
                    start,
                    end,
                    dollar_tag: Some(tag.len()),
                });
                continue;
            }
            i += 1;
            out.push(token(Kind::Operator, start, i));
            continue;
        }
        if ident_start(c) {
            while i < n && ident_char(b[i]) {
                i += 1;
            }
            out.push(token(
                Kind::Ident(sql[start..i].to_ascii_lowercase()),
                start,
                i,
            ));
            continue;
        }
        if c.is_ascii_digit() || (c == b'.' && b.get(i + 1).is_some_and(u8::is_ascii_digit)) {
            while i < n && (b[i].is_ascii_alphanumeric() || b[i] == b'.' || b[i] == b'_') {
                // 1e-5: a sign right after the exponent belongs to the number.
                if (b[i] == b'e' || b[i] == b'E') && matches!(b.get(i + 1), Some(b'+' | b'-')) {
                    i += 1;
                }
                i += 1;
            }
            out.push(token(Kind::Number, start, i));
            continue;
        }
        if matches!(c, b'(' | b')' | b',' | b';' | b'.' | b'[' | b']') {
            i += 1;
            out.push(token(Kind::Punct(c as char), start, i));
            continue;
        }
        // Operators and anything else: one character at a time is enough here. A multi-byte
        // character never reaches this point (ident_start takes bytes >= 0x80).
        i += 1;
        out.push(token(Kind::Operator, start, i));
    }
    apply_uescape(sql, &mut out);
    out
}

/// `U&"d!0061ta" UESCAPE '!'`: the name is spelled with another escape character. The name is
/// decoded with it, and the clause becomes part of the name's token.
fn apply_uescape(sql: &str, tokens: &mut Vec<Token>) {
    let mut k = 0;
    while k + 2 < tokens.len() {
        let unicode_name = sql.as_bytes()[tokens[k].start..].starts_with(b"U&\"")
            || sql.as_bytes()[tokens[k].start..].starts_with(b"u&\"");
        let escape = match (&tokens[k + 1].kind, &tokens[k + 2].kind) {
            (Kind::Ident(keyword), Kind::Str(Some(escape))) if keyword == "uescape" => {
                let mut chars = escape.chars();
                chars.next().filter(|_| chars.next().is_none())
            }
            _ => None,
        };
        if let (true, Some(escape)) = (unicode_name, escape) {
            let raw = &sql[tokens[k].start + 3..tokens[k].end];
            tokens[k].kind = Kind::Ident(unescape_unicode(&unquote(raw, b'"'), escape));
            tokens[k].end = tokens[k + 2].end;
            tokens.drain(k + 1..k + 3);
        }
        k += 1;
    }
}

/// Resolves `escape`hhhh and `escape`+hhhhhh escapes, h a hex digit (`\` unless a UESCAPE
/// clause names another character); an undecodable escape is kept as written.
fn unescape_unicode(text: &str, escape: char) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(at) = rest.find(escape) {
        out.push_str(&rest[..at]);
        let after = &rest[at + escape.len_utf8()..];
        let (digits, skip) = match after.strip_prefix('+') {
            Some(six) => (six.get(..6), 7),
            None => (after.get(..4), 4),
        };
        match digits
            .and_then(|d| u32::from_str_radix(d, 16).ok())
            .and_then(char::from_u32)
        {
            Some(ch) => {
                out.push(ch);
                rest = &after[skip..];
            }
            None if after.starts_with(escape) => {
                out.push(escape);
                rest = &after[escape.len_utf8()..];
            }
            None => {
                out.push(escape);
                rest = after;
            }
        }
    }
    out.push_str(rest);
    out
}

fn token(kind: Kind, start: usize, end: usize) -> Token {
    Token {
        kind,
        start,
        end,
        dollar_tag: None,
    }
}

/// The content between a pair of quotes, doubled quotes undone (a missing closing quote is
/// tolerated).
fn unquote(inner_and_close: &str, quote: u8) -> String {
    let q = quote as char;
    let inner = inner_and_close.strip_suffix(q).unwrap_or(inner_and_close);
    inner.replace(&format!("{q}{q}"), &q.to_string())
}

// EXTENSION_FUNCTIONS, every SQL function of the extension, for unqualified calls
// (`SET search_path = vetassist_auth` and then `store_va_tokens(…)`), and EXTENSION_TABLES, for
// the names of Citus shards: generated by build.rs from the code that defines them, so a new
// one is never missing.
include!(concat!(env!("OUT_DIR"), "/extension_objects.rs"));

pub const SCHEMA: &str = "vetassist_auth";

/// Whether `name` is a Citus shard of one of EXTENSION_TABLES.
fn is_shard_of_ours(name: &str) -> bool {
    name.rsplit_once('_').is_some_and(|(table, shard)| {
        !shard.is_empty()
            && shard.bytes().all(|b| b.is_ascii_digit())
            && EXTENSION_TABLES.contains(&table)
    })
}

/// Keywords after which `name (` can only be a relation and its column list, not a call. (Not
/// `ON`: `JOIN … ON vetassist_auth.field_hash('…', 'email') = …` is a call.)
const RELATION_KEYWORDS: &[&str] = &["analyze", "copy", "into", "references", "table", "view"];

/// How a statement relates to the extension.
pub struct Classified {
    /// It calls a function of the extension's schema (qualified) or one of its API functions,
    /// or it is a statement Citus sends a worker for a shard of the extension's tables.
    pub calls_extension: bool,
    /// The names of the prepared statements it runs (`EXECUTE name`), to be looked up.
    pub executes: Vec<String>,
}

/// Decides from the tokens alone whether `sql` calls the extension. In code (a DO block's body,
/// where strings are often SQL run by EXECUTE) string contents are searched too, `depth` levels
/// deep.
pub fn classify(sql: &str, standard_strings: bool, depth: u8) -> Classified {
    let tokens = tokens(sql, standard_strings);
    let names = |i: usize| match tokens.get(i).map(|t| &t.kind) {
        Some(Kind::Ident(name)) => Some(name.as_str()),
        _ => None,
    };
    let first = names(0);
    let punct = |i: usize| match tokens.get(i).map(|t| &t.kind) {
        Some(Kind::Punct(c)) => Some(*c),
        _ => None,
    };
    let mut calls_extension = false;
    let mut executes = Vec::new();
    for (i, t) in tokens.iter().enumerate() {
        match &t.kind {
            // vetassist_auth.anything(: a call (a column or parameter named so is not), unless
            // it is a table with a column list (COPY vetassist_auth.audit_log (id, …)).
            Kind::Ident(name)
                if name == SCHEMA
                    && punct(i + 1) == Some('.')
                    && names(i + 2).is_some()
                    && punct(i + 3) == Some('(')
                    && !i
                        .checked_sub(1)
                        .and_then(names)
                        .is_some_and(|keyword| RELATION_KEYWORDS.contains(&keyword)) =>
            {
                calls_extension = true
            }
            Kind::Ident(name)
                if name == SCHEMA
                    && punct(i + 1) == Some('.')
                    && names(i + 2).is_some_and(is_shard_of_ours) =>
            {
                calls_extension = true
            }
            Kind::Ident(name)
                if EXTENSION_FUNCTIONS.binary_search(&name.as_str()).is_ok()
                    && punct(i + 1) == Some('(') =>
            {
                calls_extension = true
            }
            Kind::Ident(name) if name == "execute" => {
                executes.extend(names(i + 1).map(str::to_owned));
            }
            // At the top only a DO block's strings are code; inside code, every string may be.
            Kind::Str(Some(content))
                if depth > 0
                    && (first == Some("do") || depth < CODE_DEPTH)
                    && classify(content, standard_strings, depth - 1).calls_extension =>
            {
                calls_extension = true
            }
            _ => {}
        }
    }
    Classified {
        calls_extension,
        executes,
    }
}

/// How deep code is searched: a DO body (1), a string EXECUTEd in it (2), and one more.
pub const CODE_DEPTH: u8 = 3;

pub const MASK: &str = "<redacted>";

/// The statement with every literal replaced by `<redacted>`; comments, names and structure
/// stay. A dollar-quoted body that calls the extension (a DO block) is masked inside instead,
/// so the code stays readable.
pub fn mask(sql: &str, standard_strings: bool) -> String {
    mask_tokens(
        sql,
        &tokens(sql, standard_strings),
        standard_strings,
        CODE_DEPTH,
    )
}

fn mask_tokens(sql: &str, found: &[Token], standard_strings: bool, depth: u8) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut at = 0;
    for t in found {
        let literal = matches!(t.kind, Kind::Str(_) | Kind::Number);
        if !literal {
            continue;
        }
        out.push_str(&sql[at..t.start]);
        match (&t.kind, t.dollar_tag) {
            (Kind::Str(Some(body)), Some(tag))
                if depth > 0 && classify(body, standard_strings, depth - 1).calls_extension =>
            {
                let delimiter = &sql[t.start..t.start + tag];
                out.push_str(delimiter);
                out.push_str(&mask_tokens(
                    body,
                    &tokens(body, standard_strings),
                    standard_strings,
                    depth - 1,
                ));
                out.push_str(delimiter);
            }
            _ => out.push_str(MASK),
        }
        at = t.end;
    }
    out.push_str(&sql[at..]);
    out
}

/// The literal values of a statement worth looking for in an error message that may quote one
/// (`invalid input syntax for type uuid: "…"`): string contents of three bytes or more.
pub fn literal_values(tokens: &[Token]) -> Vec<&str> {
    tokens
        .iter()
        .filter_map(|t| match &t.kind {
            Kind::Str(Some(content)) if content.len() >= 3 => Some(content.as_str()),
            _ => None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn calls(sql: &str) -> bool {
        classify(sql, true, CODE_DEPTH).calls_extension
    }

    #[test]
    fn the_function_list_is_sorted_for_binary_search() {
        let mut sorted = EXTENSION_FUNCTIONS.to_vec();
        sorted.sort_unstable();
        assert_eq!(sorted, EXTENSION_FUNCTIONS);
    }

    #[test]
    fn calls_are_found_qualified_quoted_or_not() {
        assert!(calls(
            "SELECT vetassist_auth.store_va_tokens($1, $2, $3, now())"
        ));
        assert!(calls("select VETASSIST_AUTH.encrypt_text('a', 'b')"));
        assert!(calls("SELECT \"vetassist_auth\".\"touch_session\"('j')"));
        assert!(calls("SELECT find_user_by_icn('1012667985V123456')"));
        assert!(calls("SELECT set_actor (NULL, '198.51.100.77')"));
        assert!(calls(
            "SELECT * FROM user_profile('00000000-0000-0000-0000-000000000000')"
        ));
    }

    #[test]
    fn escaped_and_commented_names_are_still_calls() {
        assert!(calls(
            r#"SELECT U&"vetassist\005fauth".U&"encrypt\005ftext"('a', 'b')"#
        ));
        assert!(calls(
            "SELECT vetassist_auth . /* x */ store_va_tokens('a')"
        ));
        assert!(calls(
            r#"SELECT U&"vetassist!005fauth" UESCAPE '!' . U&"encrypt!005ftext" /* c */ UESCAPE '!' ('a', 'b')"#
        ));
        assert!(calls(
            r#"SELECT u&"encrypt#005ftext" uescape '#'('a', 'b')"#
        ));
        assert_eq!(
            mask(
                r#"SELECT u&"encrypt#005ftext" uescape '#'('LEAK', 'b')"#,
                true
            ),
            r#"SELECT u&"encrypt#005ftext" uescape '#'(<redacted>, <redacted>)"#
        );
    }

    #[test]
    fn a_name_that_is_no_call_decides_nothing() {
        assert!(!calls(
            "CREATE FUNCTION h(vetassist_auth int) RETURNS int LANGUAGE sql AS 'SELECT 1'"
        ));
        assert!(!calls("SELECT 1 AS vetassist_auth, 'x'"));
        assert!(!calls("SELECT * FROM vetassist_auth.users WHERE id = '1'"));
        assert!(!calls(
            "COPY vetassist_auth.audit_log (id, details) FROM stdin"
        ));
        assert!(!calls(
            "INSERT INTO vetassist_auth.keys (key_id) VALUES (1)"
        ));
        assert!(!calls(
            "CREATE TABLE notes (user_id uuid REFERENCES vetassist_auth.users (id))"
        ));
        assert!(calls("SELECT * FROM vetassist_auth.user_profile('u')"));
        assert!(calls(
            "SELECT 1 FROM t JOIN u ON vetassist_auth.field_hash('m@x.org', 'email') = u.h"
        ));
    }

    #[test]
    fn statements_on_shards_of_our_tables_are_ours() {
        assert!(calls(
            "INSERT INTO vetassist_auth.session_events_102041 AS citus_table_alias (details) VALUES ('{}')"
        ));
        assert!(calls(
            "UPDATE vetassist_auth.sessions_102008 t SET end_reason = 'x' WHERE (user_id = 'u')"
        ));
        assert!(calls(
            "SELECT user_id FROM \"vetassist_auth\".\"session_routes_102080\" WHERE jwt_id = 'j'"
        ));
        assert!(!calls("SELECT * FROM vetassist_auth.users_ WHERE id = '1'"));
        assert!(!calls(
            "SELECT * FROM vetassist_auth.users_archive WHERE id = '1'"
        ));
        assert!(!calls("SELECT * FROM app.sessions_102008 WHERE id = '1'"));
        // Any table of ours counts (the list is generated from sql/), sharded today or not.
        assert!(calls(
            "SELECT * FROM vetassist_auth.audit_log_1 WHERE id = '1'"
        ));
        assert!(!calls(
            "SELECT * FROM vetassist_auth.not_a_table_of_ours_1 WHERE id = '1'"
        ));
    }

    #[test]
    fn every_prepared_statement_executed_is_named() {
        let c = classify("EXECUTE harmless; EXECUTE st('TOKEN')", true, CODE_DEPTH);
        assert_eq!(c.executes, vec!["harmless".to_owned(), "st".to_owned()]);
    }

    #[test]
    fn comments_strings_and_column_names_decide_nothing() {
        assert!(!calls("ALTER ROLE x CREATEDB /* vetassist_auth */"));
        assert!(!calls("SELECT 1 -- session vetassist_auth.encrypt"));
        assert!(!calls("SELECT 'vetassist_auth.store_va_tokens(1)'"));
        assert!(!calls("SELECT $q$ vetassist_auth $q$"));
        assert!(!calls("SELECT touch_session FROM t"));
        assert!(!calls("/* a /* nested */ vetassist_auth */ SELECT 1"));
        assert!(!calls("SELECT \"vetassist_auth.x\" FROM t"));
    }

    #[test]
    fn do_blocks_and_strings_run_by_execute_are_code() {
        assert!(calls(
            "DO $$BEGIN PERFORM vetassist_auth.store_va_tokens('u','TOKEN','RT',now()); END$$"
        ));
        assert!(calls(
            "DO $d$BEGIN EXECUTE format('SELECT vetassist_auth.store_va_tokens(%L, %L)', 'u', 'T'); END$d$"
        ));
        assert!(!calls("DO $$BEGIN RAISE NOTICE 'hi'; END$$"));
    }

    #[test]
    fn execute_names_the_prepared_statement() {
        let c = classify("EXECUTE st('u', 'TOKEN', 'RT')", true, CODE_DEPTH);
        assert!(!c.calls_extension);
        assert_eq!(c.executes, vec!["st".to_owned()]);
    }

    #[test]
    fn masking_keeps_the_statement_and_drops_every_literal() {
        assert_eq!(
            mask("SELECT vetassist_auth.store_va_tokens('u', 'TOK''EN', 1.5e-3, now() + '1h'); ALTER ROLE me SUPERUSER /* why */", true),
            "SELECT vetassist_auth.store_va_tokens(<redacted>, <redacted>, <redacted>, now() + <redacted>); ALTER ROLE me SUPERUSER /* why */"
        );
        assert_eq!(
            mask("EXECUTE st(E'a\\'b', x'1f', 42)", true),
            "EXECUTE st(<redacted>, <redacted>, <redacted>)"
        );
        assert_eq!(
            mask(
                "DO $$BEGIN PERFORM vetassist_auth.store_va_tokens('u','TOKEN'); END$$",
                true
            ),
            "DO $$BEGIN PERFORM vetassist_auth.store_va_tokens(<redacted>,<redacted>); END$$"
        );
    }

    #[test]
    fn nonstandard_strings_escape_with_backslashes() {
        let masked = mask(r"SELECT vetassist_auth.encrypt_text('a\'b', 'c')", false);
        assert_eq!(
            masked,
            "SELECT vetassist_auth.encrypt_text(<redacted>, <redacted>)"
        );
    }

    #[test]
    fn truncated_or_malformed_statements_never_panic() {
        for sql in [
            "SELECT vetassist_auth.store_va_tokens('unterminated",
            "SELECT $tag$ never closed",
            "SELECT \"open",
            "/* open comment",
            "SELECT E'\\",
            "$",
            "U&",
            "é vetassist_auth ü",
        ] {
            let _ = classify(sql, true, CODE_DEPTH);
            let masked = mask(sql, true);
            assert!(!masked.contains("unterminated") && !masked.contains("never closed"));
        }
    }

    #[test]
    fn literal_values_are_the_string_contents() {
        let t = tokens("SELECT f('TOKEN', 'ab', 7, $$dollar body$$)", true);
        assert_eq!(literal_values(&t), vec!["TOKEN", "dollar body"]);
    }
}
