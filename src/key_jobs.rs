//! The outbox's jobs for the keys (docs/ARCHITECTURE.md, "Layers"): a purpose's first key
//! created in the recorder's transaction, so no application transaction holds key creation, a
//! key at the warning mark of its budget rotated without the caller waiting, and the first use
//! of each master key load in a database put on record ("Key custody"). `keys` asks for them
//! through the delegates registered here.

use crate::error::{Failure, Kind, Result};
use crate::keys::{self, Purpose};
use crate::outbox::{self, Job, Reader, Writer};
use pgrx::prelude::*;
use std::cell::Cell;

/// Registers the jobs with the outbox and the delegates with `keys`; called from `_PG_init`.
pub fn register() {
    outbox::register(Job::CreateKey, run_create_key);
    outbox::register(Job::RotateWornKey, run_rotate_worn_key);
    outbox::register(Job::RecordKeyCustody, run_record_custody);
    keys::delegate(keys::Delegates {
        create_key,
        rotate_worn_key_soon,
        record_custody,
    });
}

/// Has the recorder create the first active key of a purpose in a transaction of its own, so
/// the caller holds no lock on key creation for the rest of its transaction. False when no
/// recorder can run it (the caller then creates the key itself).
fn create_key(purpose: Purpose) -> Result<bool> {
    crate::replica::require_primary();
    if !outbox::delegated(keys::keys_relid()) {
        return Ok(false);
    }
    match outbox::submit(Job::CreateKey, &[purpose.ordinal()]) {
        Ok(()) => Ok(true),
        Err(Some(_unavailable)) => Ok(false),
        Err(None) => Err(Failure::new(
            Kind::NotConfigured,
            "vetassist_auth: the data key could not be created",
        )
        .with_hint("The server log names the cause.")),
    }
}

/// Asks the recorder to rotate a key that reached the warning mark of its encryption budget,
/// without waiting: the caller goes on with its lease. Without a recorder, or when the outbox is
/// full, nothing happens (the caller's WARNING still says to rotate; the next lease asks again).
fn rotate_worn_key_soon(purpose: Purpose, key_id: u32) {
    if !outbox::delegated(keys::keys_relid()) || !crate::replica::is_primary() {
        return;
    }
    let mut body = vec![purpose.ordinal()];
    body.extend_from_slice(&key_id.to_le_bytes());
    outbox::queue_without_waiting(Job::RotateWornKey, &body);
}

fn run_create_key(body: &[u8]) {
    if let [ordinal] = body {
        if let Err(failure) = keys::create_active_key(Purpose::from_ordinal(*ordinal)) {
            failure.raise();
        }
    } else {
        pgrx::error!("vetassist_auth recorder: a malformed key job");
    }
}

fn run_rotate_worn_key(body: &[u8]) {
    if let [ordinal, id @ ..] = body {
        let id = u32::from_le_bytes(id.try_into().expect("a key id"));
        if let Err(failure) = keys::rotate_worn_key(Purpose::from_ordinal(*ordinal), id) {
            failure.raise();
        }
    } else {
        pgrx::error!("vetassist_auth recorder: a malformed key job");
    }
}

thread_local! {
    /// The last load this backend asked to put on record (a load is asked for once per backend).
    static CUSTODY_ASKED: Cell<Option<u64>> = const { Cell::new(None) };
}

/// Asks this database's recorder to put a master key load on record, unless it already has:
/// only from an application's backend (never a background process of ours or a replication
/// worker), on a primary that is not a Citus worker, with the recorder in place. Never raises.
fn record_custody(custody: &keys::Custody) {
    // SAFETY: reads process-wide state set at connection start.
    let backend = unsafe { pg_sys::MyBackendType == pg_sys::BackendType::B_BACKEND };
    // SAFETY: reads shared state on the recovery status.
    let in_recovery = unsafe { pg_sys::RecoveryInProgress() };
    if !backend
        || in_recovery
        || CUSTODY_ASKED.get() == Some(custody.load)
        || keys::custody_recorded(crate::pg::database(), custody.load)
        || !outbox::delegated(keys::keys_relid())
        || !crate::replica::is_primary()
        || crate::citus::on_worker().unwrap_or(true)
    {
        return;
    }
    CUSTODY_ASKED.set(Some(custody.load));
    let mut w = Writer(Vec::new());
    // SAFETY: the session user of a connected backend always has a name.
    let role = unsafe {
        std::ffi::CStr::from_ptr(pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), false))
    };
    let loaded_at = custody.loaded_at.map(|at| at.to_le_bytes());
    // The audit row names the load by 16 hex digits (its target_id).
    let load = format!("{:016x}", custody.load);
    for field in [
        Some(load.as_bytes()),
        Some(custody.source.as_bytes()),
        Some(custody.setting.as_bytes()),
        Some(custody.key_check.as_bytes()),
        custody.kms_key_id.as_deref().map(str::as_bytes),
        custody.kms_key_version.as_deref().map(str::as_bytes),
        loaded_at.as_ref().map(|b| b.as_slice()),
        custody.previous_setting.map(str::as_bytes),
        custody.previous_key_check.as_deref().map(str::as_bytes),
        custody.previous_kms_key_id.as_deref().map(str::as_bytes),
        custody
            .previous_kms_key_version
            .as_deref()
            .map(str::as_bytes),
        Some(role.to_bytes()),
    ] {
        w.field(field);
    }
    outbox::queue_without_waiting(Job::RecordKeyCustody, &w.0);
}

/// Writes a `master_key_loaded` audit row unless the database has one for this load, a restore
/// is connected, or the database holds no data key (the row would collide with the ones a
/// restore brings; a later backend asks again).
fn run_record_custody(body: &[u8]) {
    let mut r = Reader(body);
    let load = r.text().unwrap_or_default().to_owned();
    let mut texts = Vec::new();
    for _ in 0..5 {
        texts.push(r.text().map(str::to_owned));
    }
    let loaded_at = r
        .field()
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")));
    for _ in 0..5 {
        texts.push(r.text().map(str::to_owned));
    }
    if crate::replica::restore_session()
        .unwrap_or_else(|e| pgrx::error!("vetassist_auth recorder: {e}"))
        .is_some()
    {
        return;
    }
    // No data key yet: a fresh install, or a schema-only restore waiting for its data (an audit
    // row now would collide with the ones the data brings). Nothing was used; a later backend
    // asks again.
    let keys =
        crate::pg::read_one::<bool>("SELECT EXISTS (SELECT 1 FROM vetassist_auth.keys)", &[])
            .unwrap_or_else(|e| pgrx::error!("vetassist_auth recorder: {e}"));
    if keys != Some(true) {
        return;
    }
    let [source, setting, key_check, kms_key_id, kms_key_version, previous_setting, previous_key_check, previous_kms_key_id, previous_kms_key_version, first_used_by] =
        texts.try_into().unwrap_or_else(|_| {
            pgrx::error!("vetassist_auth recorder: a malformed key custody job")
        });
    let loaded_at = loaded_at.map(crate::pg::timestamp_text);
    Spi::run_with_args(
        "SELECT vetassist_auth.write_audit('key', 'master_key_loaded', 'success', NULL, 'master_key', $1, \
                pg_catalog.jsonb_strip_nulls(pg_catalog.jsonb_build_object( \
                    'source', $2, 'setting', $3, 'key_check', $4, 'kms_key_id', $5, 'kms_key_version', $6, \
                    'loaded_at', $7::timestamptz, 'first_used_by', $8, \
                    'previous', CASE WHEN $9 IS NOT NULL THEN pg_catalog.jsonb_build_object( \
                        'setting', $9, 'key_check', $10, 'kms_key_id', $11, 'kms_key_version', $12) END))) \
         WHERE NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_log \
                           WHERE event_type = 'master_key_loaded' AND target_id = $1)",
        &[
            load.clone().into(),
            source.into(),
            setting.into(),
            key_check.into(),
            kms_key_id.into(),
            kms_key_version.into(),
            loaded_at.into(),
            first_used_by.into(),
            previous_setting.into(),
            previous_key_check.into(),
            previous_kms_key_id.into(),
            previous_kms_key_version.into(),
        ],
    )
    .unwrap_or_else(|e| pgrx::error!("vetassist_auth recorder: the key custody row: {e}"));
    if let Ok(load) = u64::from_str_radix(&load, 16) {
        keys::note_custody_recorded(crate::pg::database(), load);
    }
}
