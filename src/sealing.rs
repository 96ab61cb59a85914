//! Sealing, opening and hashing values under the data keys (docs/ARCHITECTURE.md, "Formats"):
//! the envelope and field-hash core that every SQL-facing function uses. No SQL function lives
//! here and nothing is audited: what a call discloses is recorded by the function the caller
//! called (`encryption`, `identity`, …).

use crate::bytea::Bytea;
use crate::crypto::{self, envelope};
use crate::error::{Failure, Kind, OrRaise, Result};
use crate::keys::{self, Purpose};
use pgrx::prelude::*;

/// Postgres refuses values over 1 GB anyway; this keeps the envelope within a varlena.
const MAX_PLAINTEXT: usize = (1 << 30) - 1024;

pub fn seal(purpose: Purpose, plaintext: &[u8], context: &str) -> Result<Vec<u8>> {
    let mut sealed = vec![0; envelope::sealed_len(plaintext.len())];
    seal_into(purpose, plaintext, context, &mut sealed)?;
    Ok(sealed)
}

/// `seal` straight into the bytea returned to PostgreSQL.
pub fn seal_bytea(purpose: Purpose, plaintext: &[u8], context: &str) -> Result<Bytea> {
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
pub fn open_bytea(purpose: Purpose, ciphertext: &[u8], context: &str) -> Result<Bytea> {
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

/// The canonical text of an `inet` value, as Postgres itself prints it.
fn canonical_ip(value: &str) -> Result<String> {
    let bad = || {
        Failure::new(
            Kind::Malformed,
            "vetassist_auth: value must be an IPv4 or IPv6 address for field 'ip', as 203.0.113.7 or 2001:db8::1",
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
    // Until the extension is updated to 0.2.0 its keys table has no audit_ip purpose: the hash
    // key then, as before (field_hashes(…, 'ip') searches both).
    let purpose = if keys::purpose_accepted(Purpose::AuditIp)? {
        Purpose::AuditIp
    } else {
        Purpose::Hash
    };
    hash_for_storing(ip, IP_FIELD, purpose)
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
