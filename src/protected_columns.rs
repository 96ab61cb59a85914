//! The one list of the extension's columns that depend on a data key (docs/ARCHITECTURE.md,
//! "Protected columns"). `key_usage` and `reencrypt` are generated from it, and the checks of
//! `encrypt`/`decrypt` on the extension's own contexts read it: a new encrypted column is one
//! entry here plus the SQL function that writes it.

use crate::error::OrRaise;
use crate::keys::Purpose;
use crate::sealing;
use pgrx::prelude::*;
use std::ffi::CString;

pub struct ProtectedColumn {
    pub table: &'static str,
    pub column: &'static str,
    /// The purpose of the key the column's values are under.
    pub purpose: Purpose,
    pub stored: Stored,
    /// The column `reencrypt` picks rows by.
    pub row_id: &'static str,
}

pub enum Stored {
    /// An envelope sealed under the context `<name>:<value of id_column>`.
    Envelope {
        name: &'static str,
        id_column: &'static str,
        id_names: IdNames,
    },
    /// A field hash. `of`: the envelope column in the same row holding the hashed value, so
    /// `reencrypt` can hash it again under the active key; None for one-way values (an IP
    /// address, a token), which move only as their rows are rewritten or expire.
    Hash {
        field: &'static str,
        of: Option<&'static str>,
    },
    /// A key id in a column of its own.
    KeyId,
}

/// What the id in an envelope's context is.
pub enum IdNames {
    /// The veteran the value is about: decrypting it is a disclosure about them.
    Veteran,
    /// Some other row.
    Row,
}

const fn envelope(
    table: &'static str,
    column: &'static str,
    purpose: Purpose,
    (name, id_column, id_names): (&'static str, &'static str, IdNames),
    row_id: &'static str,
) -> ProtectedColumn {
    ProtectedColumn {
        table,
        column,
        purpose,
        stored: Stored::Envelope {
            name,
            id_column,
            id_names,
        },
        row_id,
    }
}

const fn hash(
    table: &'static str,
    column: &'static str,
    field: &'static str,
    of: Option<&'static str>,
    row_id: &'static str,
) -> ProtectedColumn {
    ProtectedColumn {
        table,
        column,
        purpose: Purpose::Hash,
        stored: Stored::Hash { field, of },
        row_id,
    }
}

use IdNames::{Row, Veteran};

#[rustfmt::skip]
pub const PROTECTED_COLUMNS: &[ProtectedColumn] = &[
    //       table               column                          purpose          (context name,                 its id,    the id names)  row id
    envelope("users",            "va_icn_encrypted",             Purpose::Phi,    ("users.va_icn",               "id",      Veteran),      "id"),
    envelope("users",            "email_encrypted",              Purpose::Phi,    ("users.email",                "id",      Veteran),      "id"),
    envelope("users",            "first_name_encrypted",         Purpose::Phi,    ("users.first_name",           "id",      Veteran),      "id"),
    envelope("users",            "last_name_encrypted",          Purpose::Phi,    ("users.last_name",            "id",      Veteran),      "id"),
    //       table               column                          field                     hashed from                     row id
    hash(    "users",            "va_icn_hash",                  "va_icn",                 Some("va_icn_encrypted"),       "id"),
    hash(    "users",            "email_hash",                   "email",                  Some("email_encrypted"),        "id"),
    hash(    "users",            "first_name_hash",              "first_name",             Some("first_name_encrypted"),   "id"),
    hash(    "users",            "last_name_hash",               "last_name",              Some("last_name_encrypted"),    "id"),
    envelope("va_tokens",        "access_token_encrypted",       Purpose::Token,  ("va_tokens.access_token",     "user_id", Row),          "id"),
    envelope("va_tokens",        "refresh_token_encrypted",      Purpose::Token,  ("va_tokens.refresh_token",    "user_id", Row),          "id"),
    envelope("sessions",         "refresh_successor_encrypted",  Purpose::Token,  ("sessions.refresh_successor", "id",      Row),          "id"),
    hash(    "sessions",         "ip_hash",                      "ip",                     None,                           "id"),
    hash(    "sessions",         "device_fingerprint_hash",      "device_fingerprint",     None,                           "id"),
    hash(    "sessions",         "refresh_token_hash",           "session_refresh_token",  None,                           "id"),
    hash(    "sessions",         "previous_refresh_token_hash",  "session_refresh_token",  None,                           "id"),
    // Written under a phi key before 0.1.3: opened under either (sealing::open_stored).
    envelope("mfa_settings",     "totp_secret_encrypted",        Purpose::Mfa,    ("mfa_settings.totp_secret",   "user_id", Veteran),      "user_id"),
    hash(    "mfa_backup_codes", "code_hash",                    "mfa_backup_code",        None,                           "id"),
    hash(    "trusted_devices",  "device_fingerprint_hash",      "device_fingerprint",     None,                           "id"),
    ProtectedColumn { table: "audit_log", column: "ip_hash", purpose: Purpose::AuditIp, stored: Stored::Hash { field: "ip", of: None }, row_id: "id" },
    ProtectedColumn { table: "audit_seals", column: "key_id", purpose: Purpose::Audit, stored: Stored::KeyId, row_id: "seq" },
];

/// Whether a context belongs to one of the extension's tables that hold envelopes: only the
/// extension's own functions seal under those.
pub fn is_reserved_context(context: &str) -> bool {
    // Byte searches: this runs on every `encrypt`, where str's pattern machinery showed.
    let bytes = context.as_bytes();
    let Some(name_end) = bytes.iter().position(|&b| b == b':') else {
        return false;
    };
    let Some(table_end) = bytes[..name_end].iter().position(|&b| b == b'.') else {
        return false;
    };
    let table = &context[..table_end];
    PROTECTED_COLUMNS
        .iter()
        .any(|c| c.table == table && matches!(c.stored, Stored::Envelope { .. }))
}

/// For a context of an envelope column whose id is a veteran (`users.email:<id>`): the table,
/// the context's column name and the veteran.
pub fn disclosed_by(context: &str) -> Option<(&'static str, &'static str, pgrx::Uuid)> {
    let (name, id) = context.split_once(':')?;
    let (table, column) = PROTECTED_COLUMNS.iter().find_map(|c| match c.stored {
        Stored::Envelope {
            name: sealed_as,
            id_names: Veteran,
            ..
        } if sealed_as == name => Some((c.table, &sealed_as[c.table.len() + 1..])),
        _ => None,
    })?;
    let id = uuid::Uuid::parse_str(id).ok()?;
    Some((table, column, pgrx::Uuid::from_bytes(*id.as_bytes())))
}

/// The registry as rows, for the SQL generated from it and for administrators and auditors.
/// `decrypt_is_disclosure`: `decrypt` of such a value is recorded as a PHI disclosure about the
/// veteran its context names. Only the columns the schema has: an upgrade from an older release
/// runs its scripts with this library, and an older script that generates `key_usage` must not
/// name a column a later script adds (that one calls define_key_usage again).
#[allow(clippy::type_complexity)]
#[pg_extern(stable, parallel_safe)]
fn protected_columns() -> TableIterator<
    'static,
    (
        name!(table_name, &'static str),
        name!(column_name, &'static str),
        name!(purpose, &'static str),
        name!(row_id, &'static str),
        name!(context_name, Option<&'static str>),
        name!(context_id, Option<&'static str>),
        name!(hash_field, Option<&'static str>),
        name!(hash_of, Option<&'static str>),
        name!(decrypt_is_disclosure, bool),
    ),
> {
    let present: Vec<&ProtectedColumn> = PROTECTED_COLUMNS
        .iter()
        .filter(|c| column_exists(c.table, c.column))
        .collect();
    TableIterator::new(present.into_iter().map(|c| {
        let (context_name, context_id, hash_field, hash_of, disclosure) = match c.stored {
            Stored::Envelope {
                name,
                id_column,
                ref id_names,
            } => (
                Some(name),
                Some(id_column),
                None,
                None,
                matches!(id_names, Veteran),
            ),
            Stored::Hash { field, of } => (None, None, Some(field), of, false),
            Stored::KeyId => (None, None, None, None, false),
        };
        (
            c.table,
            c.column,
            c.purpose.as_str(),
            c.row_id,
            context_name,
            context_id,
            hash_field,
            hash_of,
            disclosure,
        )
    }))
}

/// Whether the extension's schema has this column now (syscache look-ups).
fn column_exists(table: &str, column: &str) -> bool {
    let (Ok(table), Ok(column)) = (CString::new(table), CString::new(column)) else {
        return false;
    };
    // SAFETY: syscache look-ups by name inside a transaction (a SQL function call); each
    // returns InvalidOid or InvalidAttrNumber when the object is missing.
    unsafe {
        let schema = pg_sys::get_namespace_oid(c"vetassist_auth".as_ptr(), true);
        let relid = pg_sys::get_relname_relid(table.as_ptr(), schema);
        relid != pg_sys::InvalidOid && pg_sys::get_attnum(relid, column.as_ptr()) > 0
    }
}

/// A stored envelope opened and sealed again under the active key of its purpose, inside this
/// function: `reencrypt` never holds the plaintext. Internal: not granted to any role.
#[pg_extern(strict, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn reseal(ciphertext: &[u8], context: &str, purpose: &str) -> Vec<u8> {
    let purpose = Purpose::parse(purpose).or_raise();
    let plaintext = sealing::open_stored(purpose, ciphertext, context).or_raise();
    sealing::seal(purpose, &plaintext, context).or_raise()
}

/// The field hash, under the active hash key, of the text a stored envelope holds. Internal.
#[pg_extern(strict, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn rehash(ciphertext: &[u8], context: &str, purpose: &str, field: &str) -> Vec<u8> {
    let purpose = Purpose::parse(purpose).or_raise();
    let plaintext = sealing::open_stored(purpose, ciphertext, context).or_raise();
    let text = sealing::utf8(plaintext);
    sealing::field_hash_value(&text, field).or_raise()
}

// Who may call the functions above (any other function of the extension: no role,
// sql/grants.sql).
extension_sql!(
    r#"
GRANT EXECUTE ON FUNCTION vetassist_auth.protected_columns() TO vetassist_admin, vetassist_auditor;
"#,
    name = "protected_columns_grants",
    requires = [protected_columns],
);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_hash_of_names_an_envelope_of_its_table() {
        for c in PROTECTED_COLUMNS {
            if let Stored::Hash { of: Some(of), .. } = c.stored {
                assert!(
                    PROTECTED_COLUMNS.iter().any(|e| e.table == c.table
                        && e.column == of
                        && matches!(e.stored, Stored::Envelope { .. })),
                    "{}.{} is hashed from {of}, which is not an envelope column of its table",
                    c.table,
                    c.column
                );
            }
        }
    }

    #[test]
    fn field_hashes_search_under_the_purpose_of_every_column_of_the_field() {
        for c in PROTECTED_COLUMNS {
            if let Stored::Hash { field, .. } = c.stored {
                assert!(
                    sealing::purposes_hashing(field).contains(&c.purpose),
                    "{}.{} is under {} keys, which field_hashes(_, '{field}') does not try",
                    c.table,
                    c.column,
                    c.purpose.as_str()
                );
            }
        }
    }

    #[test]
    fn context_names_start_with_their_table() {
        for c in PROTECTED_COLUMNS {
            if let Stored::Envelope { name, .. } = c.stored {
                assert!(name.starts_with(&format!("{}.", c.table)), "{name}");
            }
        }
    }

    #[test]
    fn reserved_contexts_are_the_envelope_tables() {
        assert!(is_reserved_context("users.email:1"));
        assert!(is_reserved_context("sessions.anything:1"));
        assert!(!is_reserved_context("notes.body:1"));
        assert!(!is_reserved_context("audit_log.ip:1"));
        assert!(!is_reserved_context("users"));
    }
}
