//! Where the master key comes from (a file or an inline setting), a cheap fingerprint of that
//! source to notice a change, and reading the key itself.

use super::*;
use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;

pub(super) fn no_master_key() -> Failure {
    Failure::new(Kind::NotConfigured, "vetassist_auth: no master key is configured").with_hint(
        "Set vetassist_auth.master_key_file (preferred) or vetassist_auth.master_key in postgresql.conf and reload.",
    )
}

/// Where the master key comes from: the file setting wins over the inline one.
pub(super) enum MasterSource {
    File(&'static str),
    Inline(&'static std::ffi::CStr),
}

pub(super) fn previous_master_file<'a>() -> Option<&'a str> {
    gucs::string_setting(&gucs::PREVIOUS_MASTER_KEY_FILE).and_then(|path| path.to_str().ok())
}

pub(super) fn master_source() -> Result<MasterSource> {
    if let Some(path) = gucs::string_setting(&gucs::MASTER_KEY_FILE) {
        Ok(MasterSource::File(
            path.to_str().map_err(|_| no_master_key())?,
        ))
    } else if let Some(hex) = gucs::string_setting(&gucs::MASTER_KEY) {
        Ok(MasterSource::Inline(hex))
    } else {
        Err(no_master_key())
    }
}

/// Identifies the master key source cheaply, without reading the key file.
pub(super) fn master_fingerprint(source: &MasterSource) -> Result<[u8; 32]> {
    let mut digest = Sha256::new();
    match source {
        MasterSource::File(path) => {
            let meta = std::fs::metadata(path).map_err(|_| {
                Failure::new(
                    Kind::NotConfigured,
                    "vetassist_auth: the master key file cannot be read",
                )
                .with_hint(
                    "Check that vetassist_auth.master_key_file names a file readable by the server.",
                )
            })?;
            digest.update(b"file\0");
            file_identity(&mut digest, path, &meta);
        }
        MasterSource::Inline(hex) => {
            digest.update(b"inline\0");
            digest.update(hex.to_bytes());
        }
    }
    if let Some(path) = previous_master_file() {
        digest.update(b"previous\0");
        match std::fs::metadata(path) {
            Ok(meta) => file_identity(&mut digest, path, &meta),
            Err(_) => digest.update(b"unreadable"),
        }
    }
    Ok(digest.finalize().into())
}

pub(super) fn file_identity(digest: &mut Sha256, path: &str, meta: &std::fs::Metadata) {
    digest.update(path.as_bytes());
    for n in [
        meta.dev(),
        meta.ino(),
        meta.size(),
        meta.mtime() as u64,
        meta.mtime_nsec() as u64,
    ] {
        digest.update(n.to_be_bytes());
    }
}

/// Reads a master key file and parses it; used for the configured key and by `rewrap_keys`.
pub fn read_master_key_file(path: &str) -> Result<SecretKey> {
    let text = std::fs::read_to_string(path).map_err(|_| {
        Failure::new(
            Kind::NotConfigured,
            "vetassist_auth: a master key file cannot be read",
        )
        .with_hint("The file must exist, be readable by the server, and hold 64 hex characters.")
    })?;
    Ok(crypto::parse_master_key_hex(&text)?)
}

pub(super) fn load_master_key(source: &MasterSource) -> Result<SecretKey> {
    match source {
        MasterSource::File(path) => read_master_key_file(path),
        MasterSource::Inline(hex) => Ok(crypto::parse_master_key_hex(
            hex.to_str().map_err(|_| crypto::Error::BadMasterKey)?,
        )?),
    }
}
