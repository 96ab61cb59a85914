//! Key management (DESIGN section 2): the master key from the server configuration, data keys
//! wrapped in `vetassist_auth.keys`, and a per-backend cache so encrypting a row does not touch
//! the keys table.
//!
//! Cache invalidation:
//! - the master key source is re-checked once per transaction (a `stat` of the key file, or a
//!   hash of the inline setting); any change drops every cached key;
//! - `rotate_key`, key creation, retirement and `rewrap_keys` send a relcache invalidation for
//!   the keys table, which every backend receives and answers by dropping its cache;
//! - an aborted (sub)transaction drops the cache too, since a key it created is gone.
//!
//! Counting encryptions (NIST SP 800-38D limit): each purpose that encrypts has a sequence, and
//! one `nextval` reserves a lease of 128 encryptions. Sequences never roll back and never wait
//! on a row lock, so the count cannot be lost by an abort and counting cannot deadlock with the
//! caller's own locks. A key's count is `(lease number - counter_base) * 128`, where
//! `counter_base` is the sequence position when the key became active; `keys.encrypt_count`
//! mirrors it every 1,024 encryptions (exactly at rotation). The limits are enforced on the
//! sequence, not the mirror. A lease over-counts by at most 127 per backend, never under-counts.

use crate::crypto::{self, FieldKey, SecretKey};
use crate::error::{Failure, Kind, OrRaise, Result};
use crate::gucs;
use aes_gcm::Aes256Gcm;
use pgrx::prelude::*;
use pgrx::spi::Spi;
use sha2::{Digest, Sha256};
use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::os::unix::fs::MetadataExt;
use std::rc::Rc;

/// What a data key is for; each purpose has exactly one active key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    Token,
    Phi,
    Hash,
    Audit,
}

impl Purpose {
    pub const ALL: [Purpose; 4] = [Purpose::Token, Purpose::Phi, Purpose::Hash, Purpose::Audit];

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Token => "token",
            Purpose::Phi => "phi",
            Purpose::Hash => "hash",
            Purpose::Audit => "audit",
        }
    }

    /// The sequence that counts this purpose's encryptions; None for the purposes that only MAC.
    fn counter(self) -> Option<&'static str> {
        match self {
            Purpose::Token => Some("vetassist_auth.token_encryptions_seq"),
            Purpose::Phi => Some("vetassist_auth.phi_encryptions_seq"),
            Purpose::Hash | Purpose::Audit => None,
        }
    }

    pub fn parse(text: &str) -> Result<Purpose> {
        Purpose::ALL
            .into_iter()
            .find(|p| p.as_str() == text)
            .ok_or_else(|| {
                Failure::new(Kind::InvalidArgument, "vetassist_auth: unknown key purpose")
                    .with_hint("The purposes are token, phi, hash and audit.")
            })
    }
}

/// NIST SP 800-38D: with random 96-bit nonces a key must stay far below 2^32 encryptions.
const ENCRYPT_WARN_AT: i64 = 1 << 30;
const ENCRYPT_REFUSE_AT: i64 = 1 << 31;
const LEASE: i64 = 128;
/// keys.encrypt_count is refreshed every this many leases (1,024 encryptions).
const MIRROR_EVERY: i64 = 8;

/// Advisory-lock class that serialises key creation and rotation per purpose.
const KEY_LOCK_CLASS: i32 = 0x7661_6b31; // "vak1"

pub struct DataKey {
    pub id: u32,
    pub purpose: Purpose,
    counter_base: i64,
    secret: SecretKey,
    cipher: Aes256Gcm,
}

impl DataKey {
    pub fn cipher(&self) -> &Aes256Gcm {
        &self.cipher
    }

    /// The raw key, for MACs computed by the crypto core (the audit chain).
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret.0
    }
}

#[derive(Default)]
struct Ring {
    master_fingerprint: Option<[u8; 32]>,
    kek: Option<Rc<SecretKey>>,
    keys: HashMap<u32, Rc<DataKey>>,
    active: HashMap<Purpose, u32>,
    /// Encryptions left in this backend's current lease, per key.
    leases: HashMap<u32, i64>,
    field_keys: HashMap<(u32, String), Rc<FieldKey>>,
}

impl Ring {
    fn drop_data_keys(&mut self) {
        self.keys.clear();
        self.active.clear();
        self.leases.clear();
        self.field_keys.clear();
    }
}

thread_local! {
    static RING: RefCell<Ring> = RefCell::new(Ring::default());
    /// Set by invalidation callbacks, which may run in the middle of our own SPI calls and
    /// so must not borrow RING; the next entry point drops the cached data keys.
    static STALE: Cell<bool> = const { Cell::new(false) };
    static CHECKED_THIS_XACT: Cell<bool> = const { Cell::new(false) };
    static KEYS_RELID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
}

fn no_master_key() -> Failure {
    Failure::new(Kind::NotConfigured, "vetassist_auth: no master key is configured").with_hint(
        "Set vetassist_auth.master_key_file (preferred) or vetassist_auth.master_key in postgresql.conf and reload.",
    )
}

/// Where the master key comes from: the file setting wins over the inline one.
enum MasterSource {
    File(&'static str),
    Inline(&'static std::ffi::CStr),
}

fn master_source() -> Result<MasterSource> {
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
fn master_fingerprint(source: &MasterSource) -> Result<[u8; 32]> {
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
        MasterSource::Inline(hex) => {
            digest.update(b"inline\0");
            digest.update(hex.to_bytes());
        }
    }
    Ok(digest.finalize().into())
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

fn load_master_key(source: &MasterSource) -> Result<SecretKey> {
    match source {
        MasterSource::File(path) => read_master_key_file(path),
        MasterSource::Inline(hex) => Ok(crypto::parse_master_key_hex(
            hex.to_str().map_err(|_| crypto::Error::BadMasterKey)?,
        )?),
    }
}

/// Brings the cache up to date; called at every entry point before any lookup.
fn refresh() -> Result<()> {
    if STALE.replace(false) {
        RING.with_borrow_mut(Ring::drop_data_keys);
    }
    if CHECKED_THIS_XACT.get() {
        return Ok(());
    }
    let checked = master_source().and_then(|source| Ok((master_fingerprint(&source)?, source)));
    let (fingerprint, source) = match checked {
        Ok(checked) => checked,
        Err(e) => {
            // A removed key disables the cached keys too, not just new ones.
            RING.with_borrow_mut(|ring| {
                ring.drop_data_keys();
                ring.kek = None;
                ring.master_fingerprint = None;
            });
            return Err(e);
        }
    };
    let changed = RING.with_borrow(|ring| ring.master_fingerprint != Some(fingerprint));
    if changed {
        let master = load_master_key(&source)?;
        let kek = Rc::new(crypto::derive_kek(&master));
        RING.with_borrow_mut(|ring| {
            ring.drop_data_keys();
            ring.kek = Some(kek);
            ring.master_fingerprint = Some(fingerprint);
        });
    }
    CHECKED_THIS_XACT.set(true);
    keys_relid(); // so this backend recognises invalidations of the keys table
    Ok(())
}

fn kek() -> Result<Rc<SecretKey>> {
    RING.with_borrow(|ring| ring.kek.clone())
        .ok_or_else(no_master_key)
}

fn keys_relid() -> pg_sys::Oid {
    let cached = KEYS_RELID.get();
    if cached != pg_sys::InvalidOid {
        return cached;
    }
    let oid = Spi::get_one::<pg_sys::Oid>("SELECT 'vetassist_auth.keys'::regclass::oid")
        .ok()
        .flatten()
        .unwrap_or(pg_sys::InvalidOid);
    KEYS_RELID.set(oid);
    oid
}

/// Tells every backend (at its next statement) and this one to drop cached keys.
fn invalidate_all_backends() {
    let relid = keys_relid();
    if relid != pg_sys::InvalidOid {
        unsafe { pg_sys::CacheInvalidateRelcacheByRelid(relid) };
    }
    STALE.set(true);
}

fn unwrap_row(id: i32, purpose: &str, wrapped: &[u8], counter_base: i64) -> Result<Rc<DataKey>> {
    let purpose = Purpose::parse(purpose)?;
    let kek = kek()?;
    let secret = crypto::unwrap_dek(&kek, id as u32, purpose.as_str(), wrapped).map_err(|_| {
        Failure::new(Kind::DataCorrupted, format!("vetassist_auth: data key {id} cannot be unwrapped"))
            .with_hint("The master key differs from the one that wrapped the data keys; see rewrap_keys in the README.")
    })?;
    let cipher = secret.cipher();
    let key = Rc::new(DataKey {
        id: id as u32,
        purpose,
        counter_base,
        secret,
        cipher,
    });
    RING.with_borrow_mut(|ring| ring.keys.insert(key.id, key.clone()));
    Ok(key)
}

fn spi_failure(_: pgrx::spi::SpiError) -> Failure {
    Failure::new(
        Kind::NotConfigured,
        "vetassist_auth: the keys table cannot be read",
    )
    .with_hint("Run SELECT * FROM vetassist_auth.verify_installation().")
}

/// How many leases a purpose's counter has handed out so far (0 for purposes that only MAC).
const COUNTER_POSITION: &str =
    "SELECT CASE WHEN is_called THEN last_value ELSE last_value - 1 END FROM ";

fn counter_position(client: &pgrx::spi::SpiClient<'_>, purpose: Purpose) -> Result<i64> {
    let Some(counter) = purpose.counter() else {
        return Ok(0);
    };
    client
        .select(&format!("{COUNTER_POSITION}{counter}"), None, &[])
        .map_err(spi_failure)?
        .first()
        .get_one::<i64>()
        .map_err(spi_failure)
        .map(Option::unwrap_or_default)
}

/// Serialises key creation and rotation of one purpose until the end of the transaction.
fn lock_purpose(client: &mut pgrx::spi::SpiClient<'_>, purpose: Purpose) -> Result<()> {
    client
        .update(
            "SELECT pg_catalog.pg_advisory_xact_lock($1, pg_catalog.hashtext($2))",
            None,
            &[KEY_LOCK_CLASS.into(), purpose.as_str().into()],
        )
        .map(|_| ())
        .map_err(spi_failure)
}

/// Creates the active key of a purpose unless another transaction already did.
fn create_active_key(purpose: Purpose) -> Result<()> {
    let kek = kek()?;
    Spi::connect_mut(|client| -> Result<()> {
        lock_purpose(client, purpose)?;
        let exists = !client
            .select(
                "SELECT 1 FROM vetassist_auth.keys WHERE purpose = $1 AND status = 'active'",
                None,
                &[purpose.as_str().into()],
            )
            .map_err(spi_failure)?
            .is_empty();
        if exists {
            return Ok(());
        }
        let id: i32 = client
            .update(
                "SELECT pg_catalog.nextval('vetassist_auth.keys_key_id_seq')::integer",
                None,
                &[],
            )
            .map_err(spi_failure)?
            .first()
            .get_one()
            .map_err(spi_failure)?
            .ok_or_else(|| spi_failure(pgrx::spi::SpiError::NoTupleTable))?;
        let dek = SecretKey::random()?;
        let wrapped = crypto::wrap_dek(&kek, id as u32, purpose.as_str(), &dek)?;
        let base = counter_position(client, purpose)?;
        client
            .update(
                "INSERT INTO vetassist_auth.keys (key_id, purpose, status, wrapped_key, counter_base) \
                 VALUES ($1, $2, 'active', $3, $4)",
                None,
                &[id.into(), purpose.as_str().into(), wrapped.into(), base.into()],
            )
            .map_err(spi_failure)?;
        Ok(())
    })?;
    invalidate_all_backends();
    Ok(())
}

fn load_active_key(purpose: Purpose) -> Result<Option<Rc<DataKey>>> {
    let row = Spi::get_three_with_args::<i32, Vec<u8>, i64>(
        "SELECT key_id, wrapped_key, counter_base FROM vetassist_auth.keys WHERE purpose = $1 AND status = 'active'",
        &[purpose.as_str().into()],
    );
    match row {
        Ok((Some(id), Some(wrapped), Some(base))) => {
            Ok(Some(unwrap_row(id, purpose.as_str(), &wrapped, base)?))
        }
        Ok(_) | Err(pgrx::spi::SpiError::InvalidPosition) => Ok(None),
        Err(e) => Err(spi_failure(e)),
    }
}

/// The active key of a purpose, created on first use.
pub fn active_key(purpose: Purpose) -> Result<Rc<DataKey>> {
    refresh()?;
    let cached = RING.with_borrow(|ring| {
        ring.active
            .get(&purpose)
            .and_then(|id| ring.keys.get(id))
            .cloned()
    });
    if let Some(key) = cached {
        return Ok(key);
    }
    let key = match load_active_key(purpose)? {
        Some(key) => key,
        None => {
            create_active_key(purpose)?;
            load_active_key(purpose)?
                .ok_or_else(|| spi_failure(pgrx::spi::SpiError::InvalidPosition))?
        }
    };
    RING.with_borrow_mut(|ring| ring.active.insert(purpose, key.id));
    Ok(key)
}

/// Any key that may still decrypt (`active` or `decrypt_only`) by id. Retired and unknown
/// keys are reported exactly like a failed authentication.
pub fn key_by_id(id: u32) -> Result<Rc<DataKey>> {
    refresh()?;
    if let Some(key) = RING.with_borrow(|ring| ring.keys.get(&id).cloned()) {
        return Ok(key);
    }
    let id = i32::try_from(id).map_err(|_| Failure::from(crypto::Error::Authentication))?;
    let row = Spi::get_three_with_args::<String, Vec<u8>, i64>(
        "SELECT purpose, wrapped_key, counter_base FROM vetassist_auth.keys WHERE key_id = $1 AND status <> 'retired'",
        &[id.into()],
    );
    match row {
        Ok((Some(purpose), Some(wrapped), Some(base))) => unwrap_row(id, &purpose, &wrapped, base),
        Ok(_) | Err(pgrx::spi::SpiError::InvalidPosition) => {
            Err(crypto::Error::Authentication.into())
        }
        Err(e) => Err(spi_failure(e)),
    }
}

/// Counts one encryption against a key, taking a new lease when the current one is used up.
pub fn reserve_encryption(key: &DataKey) -> Result<()> {
    let taken = RING.with_borrow_mut(|ring| match ring.leases.get_mut(&key.id) {
        Some(remaining) if *remaining > 0 => {
            *remaining -= 1;
            true
        }
        _ => false,
    });
    if taken {
        return Ok(());
    }
    let counter = key.purpose.counter().ok_or_else(|| {
        Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: this key purpose does not encrypt",
        )
    })?;
    let lease = Spi::get_one::<i64>(&format!("SELECT pg_catalog.nextval('{counter}')"))
        .map_err(spi_failure)?
        .unwrap_or_default();
    let count = (lease - key.counter_base) * LEASE;
    let purpose = key.purpose.as_str();
    if count >= ENCRYPT_REFUSE_AT {
        return Err(Failure::new(
            Kind::NotConfigured,
            format!(
                "vetassist_auth: data key {} ({purpose}) has reached its encryption limit",
                key.id
            ),
        )
        .with_hint(format!(
            "Rotate it: SELECT vetassist_auth.rotate_key('{purpose}');"
        )));
    }
    if count >= ENCRYPT_WARN_AT {
        pgrx::ereport!(
            WARNING,
            PgSqlErrorCode::ERRCODE_WARNING,
            format!(
                "vetassist_auth: data key {} ({purpose}) has been used {count} times; rotate it soon with rotate_key('{purpose}')",
                key.id
            )
        );
    }
    // Mirror the count into the keys table every MIRROR_EVERY leases (and past the warning
    // mark), never waiting for the row: whoever holds it writes a count at least as fresh.
    if lease % MIRROR_EVERY == 0 || count >= ENCRYPT_WARN_AT {
        mirror_count(key, count)?;
    }
    RING.with_borrow_mut(|ring| ring.leases.insert(key.id, LEASE - 1));
    Ok(())
}

fn mirror_count(key: &DataKey, count: i64) -> Result<()> {
    Spi::run_with_args(
        "UPDATE vetassist_auth.keys SET encrypt_count = $2 WHERE key_id = \
         (SELECT key_id FROM vetassist_auth.keys WHERE key_id = $1 AND encrypt_count < $2 FOR UPDATE SKIP LOCKED)",
        &[(key.id as i32).into(), count.into()],
    )
    .map_err(spi_failure)?;
    Ok(())
}

/// The per-field HMAC key for a hash data key, derived once per backend.
pub fn field_key(key: &DataKey, field: &str) -> Rc<FieldKey> {
    RING.with_borrow_mut(|ring| {
        ring.field_keys
            .entry((key.id, field.to_owned()))
            .or_insert_with(|| Rc::new(FieldKey::new(key.id, &key.secret.0, field)))
            .clone()
    })
}

/// Every key of a purpose that may still be found in stored data (active first).
pub fn usable_keys(purpose: Purpose) -> Result<Vec<Rc<DataKey>>> {
    let active = active_key(purpose)?;
    let ids: Vec<i32> = Spi::connect(|client| {
        client
            .select(
                "SELECT key_id FROM vetassist_auth.keys WHERE purpose = $1 AND status = 'decrypt_only' ORDER BY key_id DESC",
                None,
                &[purpose.as_str().into()],
            )?
            .map(|row| row.get::<i32>(1).map(|id| id.unwrap_or_default()))
            .collect::<std::result::Result<Vec<_>, _>>()
    })
    .map_err(spi_failure)?;
    let mut keys = vec![active];
    for id in ids {
        keys.push(key_by_id(id as u32)?);
    }
    Ok(keys)
}

// ---------------------------------------------------------------------------------------------
// Transaction and invalidation callbacks (registered once per backend from _PG_init)

#[pg_guard]
unsafe extern "C-unwind" fn on_xact_event(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    match event {
        XACT_EVENT_COMMIT | XACT_EVENT_PARALLEL_COMMIT | XACT_EVENT_PREPARE => {
            CHECKED_THIS_XACT.set(false)
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            CHECKED_THIS_XACT.set(false);
            STALE.set(true);
        }
        _ => {}
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_subxact_event(
    event: pg_sys::SubXactEvent::Type,
    _my: pg_sys::SubTransactionId,
    _parent: pg_sys::SubTransactionId,
    _arg: *mut std::ffi::c_void,
) {
    if event == pg_sys::SubXactEvent::SUBXACT_EVENT_ABORT_SUB {
        STALE.set(true);
    }
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let ours = KEYS_RELID.get();
    if relid == pg_sys::InvalidOid || relid == ours {
        STALE.set(true);
        // The extension may have been dropped and recreated: look the oid up again.
        KEYS_RELID.set(pg_sys::InvalidOid);
    }
}

pub fn register_callbacks() {
    unsafe {
        pg_sys::RegisterXactCallback(Some(on_xact_event), std::ptr::null_mut());
        pg_sys::RegisterSubXactCallback(Some(on_subxact_event), std::ptr::null_mut());
        pg_sys::CacheRegisterRelcacheCallback(
            Some(on_relcache_invalidation),
            pg_sys::Datum::from(0),
        );
    }
}

// ---------------------------------------------------------------------------------------------
// Administration functions (granted to vetassist_admin)

#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn rotate_key(purpose: &str) -> i32 {
    let purpose = Purpose::parse(purpose).or_raise();
    refresh().or_raise();
    kek().or_raise();
    // The retiring key's final count comes from the counter before the new key takes it over.
    let position = Spi::connect_mut(|client| {
        lock_purpose(client, purpose)?;
        counter_position(client, purpose)
    })
    .or_raise();
    Spi::run_with_args(
        "UPDATE vetassist_auth.keys \
         SET status = 'decrypt_only', encrypt_count = greatest(encrypt_count, ($2 - counter_base) * $3) \
         WHERE purpose = $1 AND status = 'active'",
        &[purpose.as_str().into(), position.into(), LEASE.into()],
    )
    .map_err(spi_failure)
    .or_raise();
    // create_active_key tells every backend, this one included, to drop its cached keys.
    create_active_key(purpose).or_raise();
    let key = load_active_key(purpose)
        .or_raise()
        .expect("the key was just created");
    key.id as i32
}

/// Re-wraps every data key under the current master key after the master key was changed.
/// Keys already wrapped under the current master key are left alone, so a rerun is harmless.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn rewrap_keys(old_master_key_file: &str) -> i32 {
    let allowed = Spi::get_one::<bool>(
        "SELECT pg_catalog.pg_has_role(session_user, 'pg_read_server_files', 'USAGE')",
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !allowed {
        Failure::new(
            Kind::InsufficientPrivilege,
            "vetassist_auth: rewrap_keys reads a server file",
        )
        .with_hint("The session user needs the privileges of pg_read_server_files.")
        .raise();
    }
    let old_kek = crypto::derive_kek(&read_master_key_file(old_master_key_file).or_raise());
    refresh().or_raise();
    let new_kek = kek().or_raise();
    let rows: Vec<(i32, String, Vec<u8>)> = Spi::connect(|client| {
        client
            .select("SELECT key_id, purpose, wrapped_key FROM vetassist_auth.keys ORDER BY key_id FOR UPDATE", None, &[])?
            .map(|row| Ok((row.get::<i32>(1)?.unwrap_or_default(), row.get(2)?.unwrap_or_default(), row.get(3)?.unwrap_or_default())))
            .collect::<std::result::Result<Vec<_>, pgrx::spi::SpiError>>()
    })
    .map_err(spi_failure)
    .or_raise();
    let mut rewrapped = 0;
    for (id, purpose, wrapped) in rows {
        if crypto::unwrap_dek(&new_kek, id as u32, &purpose, &wrapped).is_ok() {
            continue;
        }
        let dek = crypto::unwrap_dek(&old_kek, id as u32, &purpose, &wrapped)
            .map_err(|_| {
                Failure::new(
                    Kind::DataCorrupted,
                    format!("vetassist_auth: data key {id} opens with neither master key"),
                )
                .with_hint(
                    "Pass the file of the master key that wrapped the keys before the change.",
                )
            })
            .or_raise();
        let new_wrapped = crypto::wrap_dek(&new_kek, id as u32, &purpose, &dek).or_raise();
        Spi::run_with_args(
            "UPDATE vetassist_auth.keys SET wrapped_key = $2 WHERE key_id = $1",
            &[id.into(), new_wrapped.into()],
        )
        .map_err(spi_failure)
        .or_raise();
        rewrapped += 1;
    }
    invalidate_all_backends();
    rewrapped
}

/// The active key id of a purpose (creating it on first use), for reencrypt and health checks.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn active_key_id(purpose: &str) -> i32 {
    active_key(Purpose::parse(purpose).or_raise()).or_raise().id as i32
}

/// Marks `decrypt_only` keys that no stored value uses any more as `retired`.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn retire_unused_keys() -> i32 {
    let retired = Spi::get_one::<i64>(
        "WITH r AS (UPDATE vetassist_auth.keys k SET status = 'retired', retired_at = pg_catalog.now() \
         WHERE k.status = 'decrypt_only' \
           AND NOT EXISTS (SELECT 1 FROM vetassist_auth.key_usage u WHERE u.key_id = k.key_id) \
         RETURNING 1) SELECT pg_catalog.count(*) FROM r",
    )
    .map_err(spi_failure)
    .or_raise()
    .unwrap_or(0);
    if retired > 0 {
        invalidate_all_backends();
    }
    retired as i32
}
