//! Data keys (docs/ARCHITECTURE.md, "Keys", "Pinning", "Retiring a key"): the master key from
//! the server configuration, data keys wrapped in `vetassist_auth.keys`, a per-backend cache
//! (`KeyCache`) so that encrypting a row does not touch the keys table, and the encryption
//! budget of each key (`counter.rs`).

mod admin;
mod cache;
mod command;
mod counter;
mod locks;
mod master;
mod published;
pub(crate) use crate::search_path;
mod store;

pub use admin::rotate_worn_key;
pub use cache::{keys_relid, register_callbacks};
pub use counter::{reserve_encryption, ENCRYPT_REFUSE_AT as ENCRYPTION_LIMIT};
pub use locks::{key_lock_tag, AUDIT_CHAIN, IDENTITY_CLAIM};
pub use master::Custody;
pub use published::{
    attach_shared, custody_recorded, note_custody_recorded, SHMEM_SIZE as PUBLISHED_SHMEM_SIZE,
};
pub use store::create_active_key;

use cache::*;
use counter::*;
use locks::*;
use master::*;
use store::*;

use crate::crypto::{self, FieldKey, SecretKey};
use crate::error::{Failure, Kind, OrRaise, Result};
use crate::gucs;
use crate::pg::{acquire, latest_rows, schema_has_column};
use pgrx::prelude::*;
use pgrx::spi::Spi;
use std::cell::{Cell, RefCell};
use std::rc::Rc;

// Looked up on every call of the hot path: a fast hasher, as the keys are our own ids.
type HashMap<K, V> = std::collections::HashMap<K, V, foldhash::fast::RandomState>;
type HashSet<K> = std::collections::HashSet<K, foldhash::fast::RandomState>;

/// What a data key is for; each purpose has exactly one active key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    Token,
    Phi,
    Hash,
    Audit,
    /// TOTP secrets: opened by no public function.
    Mfa,
    /// The audit log's IP hashes: the log keeps its rows for years and never rewrites one, so
    /// they have keys of their own, which retire as the purge removes the rows under them and
    /// leave the hash keys free to rotate (docs/ARCHITECTURE.md, "Retiring a key").
    AuditIp,
}

impl Purpose {
    /// In the order of their lock ordinals (lock_purpose): new purposes go last.
    pub const ALL: [Purpose; 6] = [
        Purpose::Token,
        Purpose::Phi,
        Purpose::Hash,
        Purpose::Audit,
        Purpose::Mfa,
        Purpose::AuditIp,
    ];

    /// The purpose's place in ALL: its lock ordinal and its number in a recorder job.
    pub fn ordinal(self) -> u8 {
        self as u8
    }

    /// The purpose of an ordinal (an unknown one, from a corrupted job, reads as the first).
    pub fn from_ordinal(ordinal: u8) -> Purpose {
        Purpose::ALL[usize::from(ordinal) % Purpose::ALL.len()]
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Token => "token",
            Purpose::Phi => "phi",
            Purpose::Hash => "hash",
            Purpose::Audit => "audit",
            Purpose::Mfa => "mfa",
            Purpose::AuditIp => "audit_ip",
        }
    }

    /// The sequence that counts this purpose's encryptions; None for the purposes that only MAC.
    fn counter(self) -> Option<&'static str> {
        match self {
            Purpose::Token => Some("vetassist_auth.token_encryptions_seq"),
            Purpose::Phi => Some("vetassist_auth.phi_encryptions_seq"),
            Purpose::Mfa => Some("vetassist_auth.mfa_encryptions_seq"),
            Purpose::Hash | Purpose::Audit | Purpose::AuditIp => None,
        }
    }

    pub fn parse(text: &str) -> Result<Purpose> {
        Purpose::ALL
            .into_iter()
            .find(|p| p.as_str() == text)
            .ok_or_else(|| {
                let names: Vec<&str> = Purpose::ALL.iter().map(|p| p.as_str()).collect();
                Failure::new(Kind::InvalidArgument, "vetassist_auth: unknown key purpose")
                    .with_hint(format!("The purposes are {}.", names.join(", ")))
            })
    }
}

pub struct DataKey {
    pub id: u32,
    pub purpose: Purpose,
    counter_base: i64,
    /// Tells this key from another with the same id (the extension dropped and created again),
    /// so a lease survives dropping the cache but never counts for another key.
    lease_tag: [u8; 8],
    secret: SecretKey,
    cipher: crypto::Cipher,
}

impl DataKey {
    pub fn cipher(&self) -> &crypto::Cipher {
        &self.cipher
    }

    /// The raw key, for MACs computed by the crypto core (the audit chain).
    pub fn secret(&self) -> &[u8; 32] {
        &self.secret.0
    }
}

#[derive(Default)]
pub(super) struct KeyCache {
    pub(super) master_fingerprint: Option<[u8; 32]>,
    pub(super) kek: Option<Rc<SecretKey>>,
    /// The master key being replaced (vetassist_auth.previous_master_key_file): data keys not
    /// yet rewrapped still open under it.
    pub(super) previous_kek: Option<Rc<SecretKey>>,
    /// The master key load this backend has yet to put on record: at its first data key.
    pub(super) custody_to_record: Option<Custody>,
    /// Why the previous master key set could not be loaded, if it could not.
    pub(super) previous_failure: Option<Failure>,
    /// The setting the master key in force came from, for hints.
    pub(super) source_setting: Option<&'static str>,
    pub(super) keys: HashMap<u32, Rc<DataKey>>,
    pub(super) active: HashMap<Purpose, u32>,
    /// Encryptions left in this backend's current lease, per purpose (with the key's id and
    /// lease tag): only a purpose's active key encrypts, so one lease per purpose bounds it.
    /// Kept when the cached keys are dropped (after an abort, a rotation): the counter handed
    /// the lease out for good, and a lease thrown away is budget lost.
    pub(super) leases: HashMap<Purpose, (u32, [u8; 8], i64)>,
    /// Ids of each purpose's `decrypt_only` keys, newest first.
    pub(super) decrypt_only: HashMap<Purpose, Vec<u32>>,
    /// Per hash key id, per field name; at most FIELD_KEYS_CACHED entries in all (field_key).
    pub(super) field_keys: HashMap<u32, HashMap<String, Rc<FieldKey>>>,
    pub(super) field_keys_cached: usize,
    /// The purposes the keys table's CHECK takes, read once (an ALTER of the table in an
    /// extension update invalidates this cache with the keys).
    pub(super) purposes_accepted: Option<Vec<Purpose>>,
}

/// Bounds of the per-backend caches: callers choose field names, so the cache of per-field
/// keys is bounded by count and name length; deriving one again costs a single HMAC. Data
/// keys are bounded by the keys table, and are capped too against a table of many rotations.
pub(super) const FIELD_KEYS_CACHED: usize = 512;
pub(super) const FIELD_NAME_CACHED_LEN: usize = 128;
pub(super) const DATA_KEYS_CACHED: usize = 64;

/// Empties WRITING. Also called from transaction callbacks, so it never waits on a borrow (none
/// is held across a call that could run one).
pub(super) fn forget_writing_keys() {
    WRITING.with(|writing| {
        if let Ok(mut writing) = writing.try_borrow_mut() {
            *writing = Default::default();
        }
    });
}

impl KeyCache {
    pub(super) fn drop_data_keys(&mut self) {
        forget_writing_keys();
        self.keys.clear();
        self.active.clear();
        self.decrypt_only.clear();
        self.field_keys.clear();
        self.field_keys_cached = 0;
        self.purposes_accepted = None;
    }
}

thread_local! {
    pub(super) static KEY_CACHE: RefCell<KeyCache> = RefCell::new(KeyCache::default());
    /// Set by invalidation callbacks, which may run in the middle of our own SPI calls and
    /// so must not borrow KEY_CACHE; the next entry point drops the cached data keys.
    pub(super) static STALE: Cell<bool> = const { Cell::new(false) };
    pub(super) static CHECKED_THIS_XACT: Cell<bool> = const { Cell::new(false) };
    /// Set while this backend inserts a key of its own making (see sql/operations.sql).
    pub(super) static CREATING_KEY: Cell<bool> = const { Cell::new(false) };
    /// Keys this transaction holds a pin (share lock) on; emptied when the locks go away.
    pub(super) static PINNED: RefCell<HashSet<u32>> = RefCell::new(HashSet::default());
    /// Per purpose, the active key `key_for_writing` pinned in this transaction: emptied with
    /// PINNED and with the cached keys, so it is only ever a pinned, current key.
    pub(super) static WRITING: RefCell<[Option<Rc<DataKey>>; Purpose::ALL.len()]> =
        const { RefCell::new([const { None }; Purpose::ALL.len()]) };
    pub(super) static KEYS_RELID: Cell<pg_sys::Oid> = const { Cell::new(pg_sys::InvalidOid) };
    /// Set when this transaction pinned a key to write a value under it (which is how
    /// reencrypt moves one, too); cleared at its end. retire_unused_keys reads it
    /// (docs/ARCHITECTURE.md, "Retiring a key", item 4).
    pub(super) static WROTE_UNDER_KEYS: Cell<bool> = const { Cell::new(false) };
}

/// What a layer above does for the keys, registered when the library loads: keys cannot call
/// upward (docs/ARCHITECTURE.md, "Layers"). Unregistered, a caller creates its first key itself
/// and a worn key waits for rotate_key.
pub struct Delegates {
    /// Creates a purpose's first key in a transaction of its own; false when none can run.
    pub create_key: fn(Purpose) -> Result<bool>,
    /// Asks for a key at the warning mark of its budget to be rotated soon, without waiting.
    pub rotate_worn_key_soon: fn(Purpose, u32),
    /// Has the first use of a master key load in this backend (its first data key opened under
    /// it) put on record, once per database and load, without waiting; never raises.
    pub record_custody: fn(&Custody),
}

static DELEGATES: std::sync::OnceLock<Delegates> = std::sync::OnceLock::new();

/// Defines the master key command settings, whose assign hooks run the commands in the
/// postmaster; called from `_PG_init` after `gucs::init`.
pub fn define_settings() {
    gucs::define_master_key_commands(
        Some(current_command_assigned),
        Some(previous_command_assigned),
    );
}

#[pg_guard]
unsafe extern "C-unwind" fn current_command_assigned(
    value: *const std::ffi::c_char,
    _extra: *mut std::ffi::c_void,
) {
    // SAFETY: Postgres passes the new value, a NUL-terminated string, or NULL.
    let value = unsafe { value.as_ref().map(|v| std::ffi::CStr::from_ptr(v)) };
    published::assigned(published::Which::Current, value);
}

#[pg_guard]
unsafe extern "C-unwind" fn previous_command_assigned(
    value: *const std::ffi::c_char,
    _extra: *mut std::ffi::c_void,
) {
    // SAFETY: as above.
    let value = unsafe { value.as_ref().map(|v| std::ffi::CStr::from_ptr(v)) };
    published::assigned(published::Which::Previous, value);
}

pub fn delegate(delegates: Delegates) {
    // Once per process, from _PG_init: a second call (there is none) would change nothing.
    let _ = DELEGATES.set(delegates);
}

/// Whether the keys table takes keys of `purpose`: a database whose extension is not yet updated
/// to the library's version may not (before 0.2.0, no `audit_ip`), and the library serves its
/// SQL until ALTER EXTENSION UPDATE.
pub fn purpose_accepted(purpose: Purpose) -> Result<bool> {
    refresh()?;
    if let Some(accepted) = KEY_CACHE.with_borrow(|cache| cache.purposes_accepted.clone()) {
        return Ok(accepted.contains(&purpose));
    }
    let check = latest_rows(
        "SELECT pg_catalog.pg_get_constraintdef(c.oid) FROM pg_catalog.pg_constraint c \
         WHERE c.conrelid = 'vetassist_auth.keys'::pg_catalog.regclass AND c.conname = 'keys_purpose_check'",
        |row| Ok(row.get::<String>(1).unwrap_or_default()),
    )?
    .concat();
    let accepted: Vec<Purpose> = Purpose::ALL
        .into_iter()
        .filter(|p| check.contains(&format!("'{}'", p.as_str())))
        .collect();
    let answer = accepted.contains(&purpose);
    KEY_CACHE.with_borrow_mut(|cache| cache.purposes_accepted = Some(accepted));
    Ok(answer)
}

/// The active key of a purpose, created on first use. For reading and look-ups; a value that
/// will be stored is made with `key_for_writing`.
pub fn active_key(purpose: Purpose) -> Result<Rc<DataKey>> {
    refresh()?;
    let cached = KEY_CACHE.with_borrow(|cache| {
        cache
            .active
            .get(&purpose)
            .and_then(|id| cache.keys.get(id))
            .cloned()
    });
    if let Some(key) = cached {
        return Ok(key);
    }
    let key = match load_active_key(purpose)? {
        Some(key) => key,
        None => {
            // First use: the recorder creates it in a transaction of its own, so this caller
            // holds no lock on key creation while its transaction lasts (docs/ARCHITECTURE.md,
            // "Locks no role can take"); without a recorder the caller creates it.
            kek()?;
            let delegated = match DELEGATES.get() {
                Some(delegates) => (delegates.create_key)(purpose)?,
                None => false,
            };
            if !delegated {
                create_active_key(purpose)?;
            }
            load_active_key(purpose)?
                .ok_or_else(|| spi_failure(pgrx::spi::SpiError::InvalidPosition))?
        }
    };
    KEY_CACHE.with_borrow_mut(|cache| cache.active.insert(purpose, key.id));
    Ok(key)
}

/// The active key of a purpose, pinned for the rest of the transaction: it cannot be retired
/// until this transaction ends, so whatever it writes under the key stays readable.
pub fn key_for_writing(purpose: Purpose) -> Result<Rc<DataKey>> {
    // A hot standby can take no key pin (and stores nothing): 55000 naming it, as every write
    // of ours there. Look-ups (field_hashes) read keys without a pin.
    // SAFETY: reads shared recovery state.
    if unsafe { pg_sys::RecoveryInProgress() } {
        crate::replica::require_primary();
    }
    refresh()?;
    WROTE_UNDER_KEYS.set(true);
    if let Some(key) = WRITING.with_borrow(|writing| writing[purpose as usize].clone()) {
        return Ok(key);
    }
    let key = pin_active_key(purpose)?;
    WRITING.with_borrow_mut(|writing| writing[purpose as usize] = Some(key.clone()));
    Ok(key)
}

fn pin_active_key(purpose: Purpose) -> Result<Rc<DataKey>> {
    loop {
        let key = active_key(purpose)?;
        if PINNED.with_borrow(|pinned| pinned.contains(&key.id)) {
            return Ok(key);
        }
        acquire(key_lock_tag(key.id, 0), pg_sys::ShareLock, true);
        PINNED.with_borrow_mut(|pinned| pinned.insert(key.id));
        // A retirement or rotation that committed while we waited for the lock sent its
        // invalidation before releasing the lock: take it in and look again.
        // SAFETY: processing invalidations between statements' steps is what every relation
        // lock acquisition does; our callback only sets a flag.
        unsafe { pg_sys::AcceptInvalidationMessages() };
        if !STALE.get() {
            return Ok(key);
        }
    }
}

/// Any key that may still decrypt (`active` or `decrypt_only`) by id. Retired and unknown
/// keys are reported exactly like a failed authentication.
pub fn key_by_id(id: u32) -> Result<Rc<DataKey>> {
    refresh()?;
    if let Some(key) = KEY_CACHE.with_borrow(|cache| cache.keys.get(&id).cloned()) {
        return Ok(key);
    }
    let id = i32::try_from(id).map_err(|_| Failure::from(crypto::Error::Authentication))?;
    load_keys(&format!("key_id = {id} AND status <> 'retired'"))?
        .pop()
        .ok_or_else(|| crypto::Error::Authentication.into())
}

/// The per-field HMAC key for a hash data key, derived once per backend.
/// The per-field HMAC key for a hash data key, derived once per backend and field name while
/// the cache has room (FIELD_KEYS_CACHED): it starts afresh when full.
pub fn field_key(key: &DataKey, field: &str) -> Rc<FieldKey> {
    KEY_CACHE.with_borrow_mut(|cache| {
        if let Some(field_key) = cache.field_keys.get(&key.id).and_then(|f| f.get(field)) {
            return field_key.clone();
        }
        let field_key = Rc::new(FieldKey::new(key.id, &key.secret.0, field));
        if field.len() <= FIELD_NAME_CACHED_LEN {
            if cache.field_keys_cached >= FIELD_KEYS_CACHED {
                cache.field_keys.clear();
                cache.field_keys_cached = 0;
            }
            let fields = cache.field_keys.entry(key.id).or_default();
            fields.insert(field.to_owned(), field_key.clone());
            cache.field_keys_cached += 1;
        }
        field_key
    })
}

/// Entries in this backend's key caches, to check their bounds. Internal: not granted to any
/// role.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn key_cache_sizes() -> TableIterator<'static, (name!(cache, String), name!(entries, i64))> {
    let sizes = KEY_CACHE.with_borrow(|cache| {
        vec![
            ("data keys".to_owned(), cache.keys.len() as i64),
            (
                "field keys".to_owned(),
                cache.field_keys.values().map(|f| f.len() as i64).sum(),
            ),
            ("leases".to_owned(), cache.leases.len() as i64),
            (
                "decrypt_only key lists".to_owned(),
                cache.decrypt_only.values().map(|v| v.len() as i64).sum(),
            ),
        ]
    });
    TableIterator::new(sizes)
}

/// Every key of a purpose that may still be found in stored data (active first).
pub fn usable_keys(purpose: Purpose) -> Result<Vec<Rc<DataKey>>> {
    let active = active_key(purpose)?;
    let cached = KEY_CACHE.with_borrow(|cache| cache.decrypt_only.get(&purpose).cloned());
    let others = match cached {
        Some(ids) => ids.into_iter().map(key_by_id).collect::<Result<Vec<_>>>()?,
        None => {
            let keys = load_keys(&format!(
                "purpose = '{}' AND status = 'decrypt_only'",
                purpose.as_str()
            ))?;
            let ids = keys.iter().map(|key| key.id).collect();
            KEY_CACHE.with_borrow_mut(|cache| cache.decrypt_only.insert(purpose, ids));
            keys
        }
    };
    Ok(std::iter::once(active).chain(others).collect())
}

#[cfg(test)]
mod tests {
    use super::Purpose;

    #[test]
    fn a_purpose_ordinal_is_its_place_in_all() {
        for (place, purpose) in Purpose::ALL.into_iter().enumerate() {
            assert_eq!(usize::from(purpose.ordinal()), place);
            assert_eq!(Purpose::from_ordinal(purpose.ordinal()), purpose);
        }
    }
}
