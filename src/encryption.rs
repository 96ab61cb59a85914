//! The SQL face of the crypto core: envelope encryption and searchable field hashes
//! (docs/ARCHITECTURE.md, "Formats"), sealed and opened by `sealing`; a decryption that
//! discloses a veteran's PHI is recorded here.
//!
//! These functions are SECURITY DEFINER without `SET search_path`: they run no SQL of their
//! own, and the key reads they cause pin the path themselves (`keys::search_path`).

use crate::audit::recorder;
use crate::audit::AuditRow;
use crate::bytea::Bytea;
use crate::crypto::{self, envelope};
use crate::error::{Failure, Kind, OrRaise};
use crate::keys::Purpose;
use crate::protected_columns;
use crate::sealing::{
    field_hash_value, field_hashes_value, open, open_bytea, open_stored, seal, seal_bytea, utf8,
};
use pgrx::prelude::*;

/// Whether a stored ciphertext opens under a usable key of `purpose` (NULL: nothing to open).
/// reencrypt moves only values that open, so a damaged or foreign one never fails or stalls it.
#[pg_extern(stable, security_definer)]
fn opens(ciphertext: Option<&[u8]>, context: &str, purpose: &str) -> bool {
    let Some(ciphertext) = ciphertext else {
        return true;
    };
    match open_stored(Purpose::parse(purpose).or_raise(), ciphertext, context) {
        Ok(_) => true,
        Err(failure) if matches!(failure.kind, Kind::DataCorrupted) => false,
        Err(failure) => failure.raise(),
    }
}

/// Contexts of the extension's own columns (`users.email:<id>`, …) are sealed only by its own
/// functions: a value the application sealed under one would pass, once decrypted, for a
/// disclosure of the veteran's stored PHI.
fn check_context_is_not_reserved(context: &str) {
    if protected_columns::is_reserved_context(context) {
        Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: this context is reserved for the extension's own columns",
        )
        .with_hint("Use a context of the application's own, such as notes.body:<id>.")
        .raise();
    }
}

/// Encrypts with the active `phi` key; `context` is bound into the ciphertext and must be
/// given again to decrypt.
#[pg_extern(strict, security_definer, name = "encrypt")]
fn encrypt_for_application(plaintext: &[u8], context: &str) -> Bytea {
    check_context_is_not_reserved(context);
    seal_bytea(Purpose::Phi, plaintext, context).or_raise()
}

/// The C symbol releases before 0.1.3 bind `encrypt` to: their own SQL seals the extension's
/// columns through it, so it keeps working for them until `ALTER EXTENSION UPDATE` rebinds
/// `encrypt` to `encrypt_for_application`.
#[pg_extern(strict, sql = false)]
fn encrypt(plaintext: &[u8], context: &str) -> Vec<u8> {
    seal(Purpose::Phi, plaintext, context).or_raise()
}

/// After decrypting for a caller outside the extension: a value of one of the extension's own
/// columns is recorded as a PHI disclosure (durably, before it is returned).
fn record_value_disclosed(context: &str) {
    if let Some((table, column, subject)) = protected_columns::disclosed_by(context) {
        // Fixed names only: no JSON escaping needed.
        let details =
            std::ffi::CString::new(format!(r#"{{"field": "{column}", "through": "decrypt"}}"#))
                .expect("no NUL");
        // SAFETY: jsonb_in parses a NUL-terminated string into a new jsonb datum.
        let details = unsafe {
            pgrx::direct_function_call_as_datum(
                pg_sys::jsonb_in,
                &[Some(pg_sys::Datum::from(details.as_ptr()))],
            )
        };
        let id = subject.to_string();
        let row = AuditRow {
            category: "phi_access",
            event_type: "value_decrypted",
            outcome: "success",
            subject_user_id: Some(subject),
            target_table: Some(table),
            target_id: Some(&id),
            changed_columns: None,
            details: details.into_datum(),
        };
        recorder::record(&row).or_raise();
    }
}

#[pg_extern(strict, security_definer)]
fn decrypt(ciphertext: &[u8], context: &str) -> Bytea {
    let plaintext = open_bytea(Purpose::Phi, ciphertext, context).or_raise();
    record_value_disclosed(context);
    plaintext
}

/// `decrypt` for the extension's own SQL functions, which audit what they disclose themselves.
/// Internal: not granted to any role.
#[pg_extern(strict, stable, security_definer)]
fn open_phi(ciphertext: &[u8], context: &str) -> Bytea {
    open_bytea(Purpose::Phi, ciphertext, context).or_raise()
}

#[pg_extern(strict, security_definer, name = "encrypt_text")]
fn encrypt_text_for_application(plaintext: &str, context: &str) -> Bytea {
    check_context_is_not_reserved(context);
    seal_bytea(Purpose::Phi, plaintext.as_bytes(), context).or_raise()
}

/// The C symbol releases before 0.1.3 bind `encrypt_text` to (see `encrypt`).
#[pg_extern(strict, sql = false)]
fn encrypt_text(plaintext: &str, context: &str) -> Vec<u8> {
    seal(Purpose::Phi, plaintext.as_bytes(), context).or_raise()
}

/// `encrypt_text` for the extension's own columns. Internal: not granted to any role.
#[pg_extern(strict, security_definer)]
fn seal_phi_text(plaintext: &str, context: &str) -> Bytea {
    seal_bytea(Purpose::Phi, plaintext.as_bytes(), context).or_raise()
}

#[pg_extern(strict, security_definer)]
fn decrypt_text(ciphertext: &[u8], context: &str) -> String {
    let plaintext = utf8(open(Purpose::Phi, ciphertext, context).or_raise());
    record_value_disclosed(context);
    plaintext
}

/// `decrypt_text` for the extension's own SQL functions. Internal: not granted to any role.
#[pg_extern(strict, stable, security_definer)]
fn open_phi_text(ciphertext: &[u8], context: &str) -> String {
    utf8(open(Purpose::Phi, ciphertext, context).or_raise())
}

/// Token-purpose encryption for the token vault's SQL functions; not granted to any role.
#[pg_extern(strict, security_definer)]
fn encrypt_token(plaintext: &str, context: &str) -> Bytea {
    seal_bytea(Purpose::Token, plaintext.as_bytes(), context).or_raise()
}

#[pg_extern(strict, stable, security_definer)]
fn decrypt_token(ciphertext: &[u8], context: &str) -> String {
    utf8(open(Purpose::Token, ciphertext, context).or_raise())
}

/// TOTP secrets have a purpose of their own, so no public function opens one. Internal: not
/// granted to any role.
#[pg_extern(strict, security_definer)]
fn encrypt_mfa_secret(secret: &[u8], context: &str) -> Bytea {
    seal_bytea(Purpose::Mfa, secret, context).or_raise()
}

/// Opens a TOTP secret: under an `mfa` key, or (written before 0.1.3, until `reencrypt` moves
/// it) under a `phi` key. Internal: not granted to any role.
#[pg_extern(strict, stable, security_definer)]
fn open_mfa_secret(ciphertext: &[u8], context: &str) -> Vec<u8> {
    open_stored(Purpose::Mfa, ciphertext, context).or_raise()
}

/// The key id inside an envelope, or NULL for something that is not an envelope.
#[pg_extern(strict, immutable, parallel_safe)]
fn envelope_key_id(ciphertext: &[u8]) -> Option<i32> {
    envelope::key_id(ciphertext).ok().map(|id| id as i32)
}

/// The key id at the front of a field hash, or NULL for something that is not one.
#[pg_extern(strict, immutable, parallel_safe)]
fn hash_key_id(hash: &[u8]) -> Option<i32> {
    crypto::field_hash::key_id(hash).map(|id| id as i32)
}

/// A searchable hash of a value. STABLE so `WHERE col = field_hash(..)` uses an index; the very
/// first call may create the hash key.
#[pg_extern(strict, stable, security_definer)]
fn field_hash(value: &str, field: &str) -> Vec<u8> {
    field_hash_value(value, field).or_raise()
}

/// One hash per usable key that hashes the field (active first), for look-ups that keep working
/// while a rotation is under way: `WHERE email_hash = ANY(field_hashes($1, 'email'))`.
#[pg_extern(strict, stable, security_definer)]
fn field_hashes(value: &str, field: &str) -> Vec<Vec<u8>> {
    field_hashes_value(value, field).or_raise()
}

// Who may call the functions above (any other function of the extension: no role,
// sql/grants.sql).
extension_sql!(
    r#"
GRANT EXECUTE ON FUNCTION vetassist_auth.encrypt(bytea, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.decrypt(bytea, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.encrypt_text(text, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.decrypt_text(bytea, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.field_hash(text, text) TO vetassist_app;
GRANT EXECUTE ON FUNCTION vetassist_auth.field_hashes(text, text) TO vetassist_app;
"#,
    name = "encryption_grants",
    requires = [
        encrypt_for_application,
        decrypt,
        encrypt_text_for_application,
        decrypt_text,
        field_hash,
        field_hashes
    ],
);
