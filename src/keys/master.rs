//! Where the master key comes from (a file, an inline setting, or a command the postmaster runs),
//! a cheap fingerprint of those sources to notice a change, and reading the key itself.

use super::published::{self, Published, Which};
use super::*;
use sha2::{Digest, Sha256};
use std::os::unix::fs::MetadataExt;

const FILE: &str = "vetassist_auth.master_key_file";
const INLINE: &str = "vetassist_auth.master_key";
const PREVIOUS_FILE: &str = "vetassist_auth.previous_master_key_file";

pub(super) fn no_master_key() -> Failure {
    Failure::new(Kind::NotConfigured, "vetassist_auth: no master key is configured").with_hint(
        "Set one of vetassist_auth.master_key_file, vetassist_auth.master_key_command or vetassist_auth.master_key in postgresql.conf and reload.",
    )
}

/// Where the master key comes from: exactly one of the three settings.
pub(super) enum MasterSource {
    File(&'static str),
    Inline(&'static std::ffi::CStr),
    Command(Box<Published>),
}

/// Where the master key being replaced comes from, during a change.
pub(super) enum PreviousSource {
    File(&'static str),
    Command(Box<Published>),
}

impl MasterSource {
    pub(super) fn setting(&self) -> &'static str {
        match self {
            MasterSource::File(_) => FILE,
            MasterSource::Inline(_) => INLINE,
            MasterSource::Command(_) => Which::Current.setting(),
        }
    }

    pub(super) fn kind(&self) -> &'static str {
        match self {
            MasterSource::File(_) => "file",
            MasterSource::Inline(_) => "inline",
            MasterSource::Command(_) => "command",
        }
    }

    pub(super) fn published(&self) -> Option<&Published> {
        match self {
            MasterSource::Command(p) => Some(p),
            _ => None,
        }
    }
}

impl PreviousSource {
    pub(super) fn setting(&self) -> &'static str {
        match self {
            PreviousSource::File(_) => PREVIOUS_FILE,
            PreviousSource::Command(_) => Which::Previous.setting(),
        }
    }

    pub(super) fn published(&self) -> Option<&Published> {
        match self {
            PreviousSource::Command(p) => Some(p),
            PreviousSource::File(_) => None,
        }
    }
}

/// 55000 naming the settings when more than one source of one key is set.
fn only_one(sources: &[(&str, bool)]) -> Result<()> {
    let named: Vec<&str> = sources
        .iter()
        .filter(|(_, on)| *on)
        .map(|(n, _)| *n)
        .collect();
    if named.len() > 1 {
        return Err(Failure::new(
            Kind::NotConfigured,
            "vetassist_auth: more than one source of the master key is set",
        )
        .with_hint(format!(
            "{} are set; keep exactly one of them and reload.",
            named.join(" and ")
        )));
    }
    Ok(())
}

fn text_of(value: &'static std::ffi::CStr) -> Result<&'static str> {
    value.to_str().map_err(|_| no_master_key())
}

/// A command setting: blank counts as unset, as the postmaster counts it.
fn command_set(
    setting: &pgrx::GucSetting<Option<std::ffi::CString>>,
) -> Option<&'static std::ffi::CStr> {
    gucs::string_setting(setting).filter(|value| !value.to_bytes().trim_ascii().is_empty())
}

pub(super) fn master_source() -> Result<MasterSource> {
    let (file, inline, command) = (
        gucs::string_setting(&gucs::MASTER_KEY_FILE),
        gucs::string_setting(&gucs::MASTER_KEY),
        command_set(&gucs::MASTER_KEY_COMMAND),
    );
    only_one(&[
        (FILE, file.is_some()),
        (Which::Current.setting(), command.is_some()),
        (INLINE, inline.is_some()),
    ])?;
    if let Some(path) = file {
        Ok(MasterSource::File(text_of(path)?))
    } else if command.is_some() {
        Ok(MasterSource::Command(Box::new(published_key(
            Which::Current,
        )?)))
    } else if let Some(hex) = inline {
        Ok(MasterSource::Inline(hex))
    } else {
        Err(no_master_key())
    }
}

/// The previous master key's source, if one is set. A key the postmaster published from
/// `previous_master_key_command` counts even before this backend has taken in the reload that
/// set it: the postmaster publishes both keys of a change at once, before it signals the
/// backends, and a statement running across the reload already unwraps with the new key.
pub(super) fn previous_source() -> Result<Option<PreviousSource>> {
    let (file, command) = (
        gucs::string_setting(&gucs::PREVIOUS_MASTER_KEY_FILE),
        command_set(&gucs::PREVIOUS_MASTER_KEY_COMMAND),
    );
    only_one(&[
        (PREVIOUS_FILE, file.is_some()),
        (Which::Previous.setting(), command.is_some()),
    ])?;
    Ok(match (file, command) {
        (Some(path), _) => Some(PreviousSource::File(text_of(path)?)),
        (None, Some(_)) => Some(PreviousSource::Command(Box::new(
            published::read(Which::Previous).unwrap_or(Published::NOTHING),
        ))),
        (None, None) => published::read(Which::Previous)
            .filter(Published::has_key)
            .map(|p| PreviousSource::Command(Box::new(p))),
    })
}

/// The key the postmaster published for a command setting, or 55000 saying why there is none.
fn published_key(which: Which) -> Result<Published> {
    let setting = which.setting();
    let Some(p) = published::read(which) else {
        return Err(Failure::new(
            Kind::NotConfigured,
            format!("vetassist_auth: {setting} needs the library preloaded"),
        )
        .with_hint("Only the postmaster runs the command: add vetassist_auth to shared_preload_libraries and restart the server."));
    };
    if p.has_key() {
        return Ok(p);
    }
    Err(match p.failure {
        Some((why, at)) => Failure::new(
            Kind::NotConfigured,
            format!("vetassist_auth: no master key: {setting} {why}"),
        )
        .with_hint(format!(
            "It ran at {}; the server log has the details. Fix the command or the KMS, then reload the configuration (SELECT pg_reload_conf()).",
            crate::pg::timestamp_text(at)
        )),
        None => Failure::new(
            Kind::NotConfigured,
            format!("vetassist_auth: {setting} has not loaded a master key yet"),
        )
        .with_hint("The postmaster runs it at server start and at every reload: reload the configuration."),
    })
}

/// Identifies the master key sources cheaply, without reading a key file.
pub(super) fn master_fingerprint(
    source: &MasterSource,
    previous: Option<&PreviousSource>,
) -> Result<[u8; 32]> {
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
        MasterSource::Command(p) => {
            digest.update(b"command\0");
            digest.update(p.load.to_be_bytes());
        }
    }
    match previous {
        Some(PreviousSource::File(path)) => {
            digest.update(b"previous file\0");
            match std::fs::metadata(path) {
                Ok(meta) => file_identity(&mut digest, path, &meta),
                Err(_) => digest.update(b"unreadable"),
            }
        }
        Some(PreviousSource::Command(p)) => {
            digest.update(b"previous command\0");
            digest.update(p.load.to_be_bytes());
        }
        None => {}
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
        MasterSource::Command(p) => Ok(SecretKey(p.key)),
    }
}

pub(super) fn load_previous_key(source: &PreviousSource) -> Result<SecretKey> {
    match source {
        PreviousSource::File(path) => read_master_key_file(path),
        PreviousSource::Command(p) if p.has_key() => Ok(SecretKey(p.key)),
        PreviousSource::Command(_) => published_key(Which::Previous).map(|p| SecretKey(p.key)),
    }
}

/// The master key in force, for the audit of its custody: what a backend records when it first
/// uses a key (docs/ARCHITECTURE.md, "Key custody").
pub struct Custody {
    /// Tells loads apart: the postmaster's load ids for commands; for a file or inline key, a
    /// hash of the server's start time, the setting and the key check.
    pub load: u64,
    pub source: &'static str,
    pub setting: &'static str,
    pub key_check: String,
    pub kms_key_id: Option<String>,
    pub kms_key_version: Option<String>,
    pub loaded_at: Option<i64>,
    pub previous_setting: Option<&'static str>,
    pub previous_key_check: Option<String>,
    pub previous_kms_key_id: Option<String>,
    pub previous_kms_key_version: Option<String>,
}

pub(super) fn custody(
    source: &MasterSource,
    master: &SecretKey,
    previous: Option<(&PreviousSource, &SecretKey)>,
) -> Custody {
    let key_check = hex::encode(crypto::key_check(master));
    let previous_key_check = previous.map(|(_, key)| hex::encode(crypto::key_check(key)));
    let published = source.published();
    let previous_published = previous.and_then(|(s, _)| s.published());
    let mut digest = Sha256::new();
    for part in [source.setting(), &key_check] {
        digest.update(part.as_bytes());
        digest.update([0]);
    }
    if let Some((previous_source, _)) = previous {
        digest.update(previous_source.setting().as_bytes());
        digest.update(previous_key_check.as_deref().unwrap_or_default());
    }
    match published {
        Some(p) => digest.update(p.load.to_be_bytes()),
        // SAFETY: reads the server's start time, set before any backend starts.
        None => digest.update(unsafe { pg_sys::PgStartTime }.to_be_bytes()),
    }
    if let Some(p) = previous_published {
        digest.update(p.load.to_be_bytes());
    }
    let label =
        |p: Option<&Published>, f: fn(&Published) -> Option<&str>| p.and_then(f).map(str::to_owned);
    Custody {
        load: u64::from_be_bytes(digest.finalize()[..8].try_into().expect("8 bytes")),
        source: source.kind(),
        setting: source.setting(),
        key_check,
        kms_key_id: label(published, |p| p.kms_key_id.get()),
        kms_key_version: label(published, |p| p.kms_key_version.get()),
        loaded_at: published.map(|p| p.loaded_at),
        previous_setting: previous.map(|(s, _)| s.setting()),
        previous_key_check,
        previous_kms_key_id: label(previous_published, |p| p.kms_key_id.get()),
        previous_kms_key_version: label(previous_published, |p| p.kms_key_version.get()),
    }
}

/// For verify_installation: whether a master key is in force, and its source.
pub(super) fn describe_sources() -> (bool, String) {
    let source = match master_source() {
        Ok(source) => source,
        Err(failure) => {
            return (
                false,
                format!(
                    "{}{}",
                    failure.message.trim_start_matches("vetassist_auth: "),
                    failure.hint.map(|h| format!(" ({h})")).unwrap_or_default()
                ),
            )
        }
    };
    let mut detail = source.setting().to_owned();
    let key = load_master_key(&source);
    match (&key, source.published()) {
        (Ok(key), Some(p)) => {
            detail.push_str(&format!(
                ", loaded {}{}, key check {}",
                crate::pg::timestamp_text(p.loaded_at),
                published::kms_label(p),
                hex::encode(crypto::key_check(key))
            ));
            if let Some((why, at)) = p.failure {
                detail.push_str(&format!(
                    "; its last run at {} {why}, the key loaded before stays in force",
                    crate::pg::timestamp_text(at)
                ));
            }
        }
        (Ok(key), None) => {
            detail.push_str(&format!(
                ", key check {}",
                hex::encode(crypto::key_check(key))
            ));
        }
        (Err(failure), _) => return (false, format!("{detail}: {}", failure.message)),
    }
    if matches!(source, MasterSource::Inline(_)) {
        detail.push_str(" (inline: a key file or a KMS command keeps it out of the configuration)");
    }
    match previous_source() {
        Ok(Some(previous)) => {
            detail.push_str(&format!("; previous: {}", previous.setting()));
            if let Err(failure) = load_previous_key(&previous) {
                return (false, format!("{detail}: {}", failure.message));
            }
        }
        Ok(None) => {}
        Err(failure) => return (false, failure.message),
    }
    (true, detail)
}
