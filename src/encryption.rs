//! The SQL face of the crypto core: envelope encryption and searchable
//! field hashes (docs/ARCHITECTURE.md, "Formats"), using cached data keys from `keys`.
//!
//! These functions are SECURITY DEFINER without `SET search_path`: they run no SQL of their
//! own, and the key reads they cause pin the path themselves (`keys::search_path`).

use crate::audit::recorder;
use crate::audit::AuditRow;
use crate::bytea::Bytea;
use crate::crypto::{self, envelope};
use crate::error::{Failure, Kind, OrRaise, Result};
use crate::keys::{self, Purpose};
use crate::protected_columns;
use pgrx::prelude::*;

/// Postgres refuses values over 1 GB anyway; this keeps the envelope within a varlena.
const MAX_PLAINTEXT: usize = (1 << 30) - 1024;

pub fn seal(purpose: Purpose, plaintext: &[u8], context: &str) -> Result<Vec<u8>> {
    let mut sealed = vec![0; envelope::sealed_len(plaintext.len())];
    seal_into(purpose, plaintext, context, &mut sealed)?;
    Ok(sealed)
}

/// `seal` straight into the bytea returned to PostgreSQL.
fn seal_bytea(purpose: Purpose, plaintext: &[u8], context: &str) -> Result<Bytea> {
    let mut sealed = Bytea::zeroed(envelope::sealed_len(plaintext.len()));
    seal_into(purpose, plaintext, context, sealed.as_mut_slice())?;
    Ok(sealed)
}

fn seal_into(purpose: Purpose, plaintext: &[u8], context: &str, out: &mut [u8]) -> Result<()> {
    if plaintext.len() > MAX_PLAINTEXT {
        return Err(Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: plaintext is too large",
        ));
    }
    let key = keys::key_for_writing(purpose)?;
    keys::reserve_encryption(&key)?;
    Ok(envelope::seal_into(
        key.cipher(),
        key.id,
        plaintext,
        context,
        out,
    )?)
}

/// Decrypts, insisting that the envelope's key has the expected purpose: a token ciphertext
/// is not readable through the PHI functions, and the other way round.
pub fn open(purpose: Purpose, ciphertext: &[u8], context: &str) -> Result<Vec<u8>> {
    let key = key_to_open(purpose, ciphertext)?;
    Ok(envelope::open(key.cipher(), ciphertext, context)?)
}

/// `open` straight into the bytea returned to PostgreSQL.
fn open_bytea(purpose: Purpose, ciphertext: &[u8], context: &str) -> Result<Bytea> {
    let key = key_to_open(purpose, ciphertext)?;
    let mut plaintext = Bytea::zeroed(envelope::opening_len(ciphertext)?);
    let len = envelope::open_into(key.cipher(), ciphertext, context, plaintext.as_mut_slice())?;
    plaintext.truncate(len);
    Ok(plaintext)
}

fn key_to_open(purpose: Purpose, ciphertext: &[u8]) -> Result<std::rc::Rc<keys::DataKey>> {
    let key = keys::key_by_id(envelope::key_id(ciphertext)?)?;
    if key.purpose != purpose {
        return Err(crypto::Error::Authentication.into());
    }
    Ok(key)
}

/// `open` for a value stored in one of the extension's columns: a TOTP secret written before
/// 0.1.3 is under a `phi` key until `reencrypt` moves it.
pub fn open_stored(purpose: Purpose, ciphertext: &[u8], context: &str) -> Result<Vec<u8>> {
    match purpose {
        Purpose::Mfa => open(Purpose::Mfa, ciphertext, context)
            .or_else(|_| open(Purpose::Phi, ciphertext, context)),
        _ => open(purpose, ciphertext, context),
    }
}

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

pub fn utf8(bytes: Vec<u8>) -> String {
    // A NUL is valid UTF-8 but no Postgres text holds one: refused as text input is (22021).
    if bytes.contains(&0) {
        Failure::new(
            Kind::NotText,
            "vetassist_auth: the decrypted value contains a NUL byte and is not text",
        )
        .with_hint("Use decrypt() for binary values.")
        .raise();
    }
    // Only our own encrypt_text wrote these bytes, after authentication; anything else is damage.
    String::from_utf8(bytes)
        .map_err(|_| Failure::from(crypto::Error::Authentication))
        .or_raise()
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
fn record_disclosure(context: &str) {
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
    record_disclosure(context);
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
    record_disclosure(context);
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

/// The canonical text of an `inet` value, as Postgres itself prints it.
fn canonical_ip(value: &str) -> Result<String> {
    let bad = || {
        Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: value is not a valid IP address for field 'ip'",
        )
    };
    let trimmed = value.trim();
    let (addr, prefix) = trimmed.split_once('/').unwrap_or((trimmed, ""));
    let addr_ok = addr.parse::<std::net::IpAddr>().is_ok();
    let prefix_ok = prefix.is_empty() || prefix.parse::<u8>().is_ok_and(|p| p <= 128);
    if !addr_ok || !prefix_ok {
        return Err(bad());
    }
    let cstr = std::ffi::CString::new(trimmed).map_err(|_| bad())?;
    // SAFETY: inet_in and inet_out take and return datums as called here; an error they raise
    // is caught by the PgTryBuilder.
    let canonical = PgTryBuilder::new(|| unsafe {
        let inet = pgrx::direct_function_call_as_datum(
            pg_sys::inet_in,
            &[Some(pg_sys::Datum::from(cstr.as_ptr()))],
        );
        pgrx::direct_function_call::<&core::ffi::CStr>(pg_sys::inet_out, &[inet])
            .map(|c| c.to_string_lossy().into_owned())
    })
    .catch_others(|_| None)
    .execute();
    canonical.ok_or_else(bad)
}

fn normalized(value: &str, field: &str) -> Result<String> {
    if field.is_empty() {
        return Err(Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: field name must not be empty",
        ));
    }
    Ok(match field {
        IP_FIELD => canonical_ip(value)?,
        _ => crypto::normalize(field, value).into_owned(),
    })
}

pub fn hash_with(key: &keys::DataKey, normalized: &str, field: &str) -> Vec<u8> {
    keys::field_key(key, field).hash(normalized).to_vec()
}

/// `key_id || HMAC-SHA256(K_field, normalize(field, value))` under the active hash key, which
/// stays pinned to the end of the transaction: the hash may be stored.
pub fn field_hash_value(value: &str, field: &str) -> Result<Vec<u8>> {
    hash_for_storing(value, field, Purpose::Hash)
}

/// The hash of an end user's IP address an audit row keeps, under the active audit_ip key
/// (docs/ARCHITECTURE.md, "Retiring a key").
pub fn audit_ip_hash(ip: &str) -> Result<Vec<u8>> {
    hash_for_storing(ip, IP_FIELD, Purpose::AuditIp)
}

const IP_FIELD: &str = "ip";

fn hash_for_storing(value: &str, field: &str, purpose: Purpose) -> Result<Vec<u8>> {
    let normalized = normalized(value, field)?;
    let key = keys::key_for_writing(purpose)?;
    Ok(hash_with(&key, &normalized, field))
}

/// The purposes whose keys hash a field's stored values: IP addresses are in the audit log too.
pub fn purposes_hashing(field: &str) -> &'static [Purpose] {
    if field == IP_FIELD {
        &[Purpose::Hash, Purpose::AuditIp]
    } else {
        &[Purpose::Hash]
    }
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

pub fn field_hashes_value(value: &str, field: &str) -> Result<Vec<Vec<u8>>> {
    let normalized = normalized(value, field)?;
    let mut hashes = Vec::new();
    for &purpose in purposes_hashing(field) {
        for key in keys::usable_keys(purpose)? {
            hashes.push(hash_with(&key, &normalized, field));
        }
    }
    Ok(hashes)
}
