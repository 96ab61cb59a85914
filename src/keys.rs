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
//! Keys are read on a snapshot taken at the moment of reading, never the caller's: a
//! repeatable-read transaction must not keep encrypting with a key that was rotated and
//! retired after its snapshot (docs/ARCHITECTURE.md, "Retiring a key").
//!
//! Pinning: a transaction that writes a value under a key first takes a share lock on that key
//! (an object lock on (keys, key_id), which no SQL function can take), held to its end, prepared
//! transactions included. Retirement takes the same lock exclusively without waiting, so a key
//! is never retired while a transaction that may still commit a value under it is open; and it
//! waits until no snapshot older than the last move off the key exists, so no reader can still
//! see a value under it.
//!
//! Counting encryptions (NIST SP 800-38D limit): each purpose that encrypts has a sequence, and
//! one `nextval` reserves a lease of 128 encryptions. Sequences never roll back and never wait
//! on a row lock, so the count cannot be lost by an abort and counting cannot deadlock with the
//! caller's own locks. A key's count is `(lease number - counter_base) * 128`, where
//! `counter_base` is the sequence position when the key became active. `keys.encrypt_count`
//! mirrors it for administrators: exactly at rotation, and by `refresh_encrypt_counts` (each
//! `reencrypt` call and each background sweep), never by a writer, whose row lock on the key
//! would hold up rotation until its transaction ends. The limits are enforced on the sequence,
//! not the mirror. A lease over-counts by at most 127 per backend, never under-counts.

use crate::crypto::{self, FieldKey, SecretKey};
use crate::error::{Failure, Kind, OrRaise, Result};
use crate::gucs;
use aes_gcm::Aes256Gcm;
use pgrx::prelude::*;
use pgrx::spi::Spi;
use sha2::{Digest, Sha256};
use std::cell::{Cell, RefCell};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::MetadataExt;
use std::rc::Rc;

/// What a data key is for; each purpose has exactly one active key.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Purpose {
    Token,
    Phi,
    Hash,
    Audit,
    /// TOTP secrets: opened by no public function.
    Mfa,
}

impl Purpose {
    /// In the order of their lock ordinals (lock_purpose): new purposes go last.
    pub const ALL: [Purpose; 5] = [
        Purpose::Token,
        Purpose::Phi,
        Purpose::Hash,
        Purpose::Audit,
        Purpose::Mfa,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Purpose::Token => "token",
            Purpose::Phi => "phi",
            Purpose::Hash => "hash",
            Purpose::Audit => "audit",
            Purpose::Mfa => "mfa",
        }
    }

    /// The sequence that counts this purpose's encryptions; None for the purposes that only MAC.
    fn counter(self) -> Option<&'static str> {
        match self {
            Purpose::Token => Some("vetassist_auth.token_encryptions_seq"),
            Purpose::Phi => Some("vetassist_auth.phi_encryptions_seq"),
            Purpose::Mfa => Some("vetassist_auth.mfa_encryptions_seq"),
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

pub struct DataKey {
    pub id: u32,
    pub purpose: Purpose,
    counter_base: i64,
    /// Tells this key from another with the same id (the extension dropped and created again),
    /// so a lease survives dropping the cache but never counts for another key.
    lease_tag: [u8; 8],
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
    /// The master key being replaced (vetassist_auth.previous_master_key_file): data keys not
    /// yet rewrapped still open under it.
    previous_kek: Option<Rc<SecretKey>>,
    keys: HashMap<u32, Rc<DataKey>>,
    active: HashMap<Purpose, u32>,
    /// Encryptions left in this backend's current lease, per key id (with the key's lease tag).
    /// Kept when the cached keys are dropped (after an abort, a rotation): the counter handed
    /// the lease out for good, and a lease thrown away is budget lost.
    leases: HashMap<u32, ([u8; 8], i64)>,
    /// Ids of each purpose's `decrypt_only` keys, newest first.
    decrypt_only: HashMap<Purpose, Vec<u32>>,
    field_keys: HashMap<(u32, String), Rc<FieldKey>>,
}

impl Ring {
    fn drop_data_keys(&mut self) {
        self.keys.clear();
        self.active.clear();
        self.decrypt_only.clear();
        self.field_keys.clear();
    }
}

thread_local! {
    static RING: RefCell<Ring> = RefCell::new(Ring::default());
    /// Set by invalidation callbacks, which may run in the middle of our own SPI calls and
    /// so must not borrow RING; the next entry point drops the cached data keys.
    static STALE: Cell<bool> = const { Cell::new(false) };
    static CHECKED_THIS_XACT: Cell<bool> = const { Cell::new(false) };
    /// Set while this backend inserts a key of its own making (see sql/operations.sql).
    static CREATING_KEY: Cell<bool> = const { Cell::new(false) };
    /// Keys this transaction holds a pin (share lock) on; emptied when the locks go away.
    static PINNED: RefCell<HashSet<u32>> = RefCell::new(HashSet::new());
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

fn previous_master_file<'a>() -> Option<&'a str> {
    gucs::string_setting(&gucs::PREVIOUS_MASTER_KEY_FILE).and_then(|path| path.to_str().ok())
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

fn file_identity(digest: &mut Sha256, path: &str, meta: &std::fs::Metadata) {
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
    keys_relid(); // so this backend recognises the next invalidation of the keys table
    if CHECKED_THIS_XACT.get() {
        return Ok(());
    }
    crate::log_redaction::warn_about_unsafe_channels();
    let checked = master_source().and_then(|source| Ok((master_fingerprint(&source)?, source)));
    let (fingerprint, source) = match checked {
        Ok(checked) => checked,
        Err(e) => {
            // A removed key disables the cached keys too, not just new ones.
            RING.with_borrow_mut(|ring| {
                ring.drop_data_keys();
                ring.kek = None;
                ring.previous_kek = None;
                ring.master_fingerprint = None;
            });
            return Err(e);
        }
    };
    let changed = RING.with_borrow(|ring| ring.master_fingerprint != Some(fingerprint));
    if changed {
        let master = load_master_key(&source)?;
        let kek = Rc::new(crypto::derive_kek(&master));
        // A previous key that cannot be read only means no fallback: the current key works.
        let previous_kek = previous_master_file()
            .and_then(|path| read_master_key_file(path).ok())
            .map(|previous| Rc::new(crypto::derive_kek(&previous)));
        RING.with_borrow_mut(|ring| {
            ring.drop_data_keys();
            ring.kek = Some(kek);
            ring.previous_kek = previous_kek;
            ring.master_fingerprint = Some(fingerprint);
        });
    }
    CHECKED_THIS_XACT.set(true);
    Ok(())
}

fn kek() -> Result<Rc<SecretKey>> {
    RING.with_borrow(|ring| ring.kek.clone())
        .ok_or_else(no_master_key)
}

pub fn keys_relid() -> pg_sys::Oid {
    let cached = KEYS_RELID.get();
    if cached != pg_sys::InvalidOid {
        return cached;
    }
    let oid =
        Spi::get_one::<pg_sys::Oid>("SELECT pg_catalog.to_regclass('vetassist_auth.keys')::oid")
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
    let previous = RING.with_borrow(|ring| ring.previous_kek.clone());
    let secret = crypto::unwrap_dek(&kek, id as u32, purpose.as_str(), wrapped)
        .or_else(|e| match &previous {
            Some(previous) => crypto::unwrap_dek(previous, id as u32, purpose.as_str(), wrapped),
            None => Err(e),
        })
        .map_err(|_| {
            Failure::new(Kind::DataCorrupted, format!("vetassist_auth: data key {id} cannot be unwrapped"))
                .with_hint("The master key differs from the one that wrapped the data keys: set vetassist_auth.previous_master_key_file to the old key's file and run rewrap_keys (README, \"Changing the master key\").")
        })?;
    let cipher = secret.cipher();
    let digest = <sha2::Sha256 as sha2::Digest>::digest(secret.0);
    let key = Rc::new(DataKey {
        id: id as u32,
        purpose,
        counter_base,
        lease_tag: digest[..8].try_into().expect("8 bytes"),
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

/// Rows of a read-only query on a snapshot taken now rather than the caller's, so a key
/// created, rotated or retired by a transaction that committed after the caller's snapshot is
/// seen. `sql` holds no caller input (ids and purposes are formatted in by us); `read` gets a
/// column reader per row.
pub fn latest_rows<T>(sql: &str, mut read: impl FnMut(&LatestRow) -> Result<T>) -> Result<Vec<T>> {
    let query = std::ffi::CString::new(sql).expect("internal queries hold no NUL");
    Spi::connect(|_client| {
        // SAFETY: SPI is connected for the duration of this closure. The plan is prepared and
        // freed here; SPI_execute_snapshot pushes (a copy of) the latest snapshot for the query
        // alone. Tuples are read before the next SPI call, and FromDatum copies every value out
        // of SPI's memory.
        unsafe {
            let plan = pg_sys::SPI_prepare(query.as_ptr(), 0, std::ptr::null_mut());
            if plan.is_null() {
                return Err(spi_failure(pgrx::spi::SpiError::NoTupleTable));
            }
            let status = pg_sys::SPI_execute_snapshot(
                plan,
                std::ptr::null_mut(),
                std::ptr::null(),
                pg_sys::GetLatestSnapshot(),
                std::ptr::null_mut(),
                true,
                false,
                0,
            );
            let rows = if status == pg_sys::SPI_OK_SELECT as i32 && !pg_sys::SPI_tuptable.is_null()
            {
                let table = &*pg_sys::SPI_tuptable;
                (0..pg_sys::SPI_processed as usize)
                    .map(|i| {
                        read(&LatestRow {
                            tuple: *table.vals.add(i),
                            desc: table.tupdesc,
                        })
                    })
                    .collect()
            } else {
                Err(spi_failure(pgrx::spi::SpiError::NoTupleTable))
            };
            pg_sys::SPI_freeplan(plan);
            rows
        }
    })
}

pub struct LatestRow {
    tuple: pg_sys::HeapTuple,
    desc: pg_sys::TupleDesc,
}

impl LatestRow {
    pub fn get<T: FromDatum>(&self, column: i32) -> Option<T> {
        let mut is_null = false;
        // SAFETY: the tuple and descriptor come from SPI_tuptable of the query just run, and
        // the column numbers are those of our own SELECT lists.
        unsafe {
            let datum = pg_sys::SPI_getbinval(self.tuple, self.desc, column, &mut is_null);
            T::from_datum(datum, is_null)
        }
    }
}

/// The lock tag of one data key (`objid` = key id) or of one purpose's key management
/// (`objid` = 0, `subid` = purpose): an object lock on the keys table, which only C code can
/// take. Advisory locks would be a namespace that every role can squat on.
fn key_lock_tag(objid: u32, subid: u16) -> pg_sys::LOCKTAG {
    pg_sys::LOCKTAG {
        // SAFETY: MyDatabaseId is set once at backend start and only read here.
        locktag_field1: unsafe { pg_sys::MyDatabaseId }.to_u32(),
        locktag_field2: keys_relid().to_u32(),
        locktag_field3: objid,
        locktag_field4: subid,
        locktag_type: pg_sys::LockTagType::LOCKTAG_OBJECT as u8,
        locktag_lockmethodid: pg_sys::DEFAULT_LOCKMETHOD as u8,
    }
}

/// Takes a transaction-level lock; false when `wait` is off and someone else holds it.
fn acquire(tag: pg_sys::LOCKTAG, mode: u32, wait: bool) -> bool {
    // SAFETY: a valid tag of the default lock method; the lock belongs to the current
    // transaction's resource owner and is released at its end (or its subtransaction's abort).
    let result = unsafe { pg_sys::LockAcquire(&tag, mode as pg_sys::LOCKMODE, false, !wait) };
    result != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// The subid of identity claims in the keys table's object-lock space, apart from pins
/// (key id, 0), purpose locks (0, purpose ordinal + 1) and the audit chain (0, AUDIT_CHAIN).
const IDENTITY_CLAIM: u16 = u16::MAX;
const AUDIT_CHAIN: u16 = u16::MAX - 1;

/// Serialises sealing and purging of the audit chain to the end of the transaction; false when
/// `wait` is off and another transaction holds it. No SQL function can take this lock, so no
/// role can stall the chain by holding it.
pub fn lock_audit_chain(wait: bool) -> bool {
    acquire(key_lock_tag(0, AUDIT_CHAIN), pg_sys::ExclusiveLock, wait)
}

/// The backend holding the audit chain lock, if any (for the sealer's WARNING and status).
/// pg_locks shows the 16-bit subid as a signed smallint.
pub fn audit_chain_holder() -> Option<i32> {
    Spi::get_one_with_args::<i32>(
        "SELECT pid FROM pg_catalog.pg_locks WHERE locktype = 'object' AND granted \
           AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()) \
           AND classid = $1 AND objid = 0 AND (objsubid::integer & 65535) = $2 AND pid <> pg_catalog.pg_backend_pid() LIMIT 1",
        &[keys_relid().into(), (AUDIT_CHAIN as i32).into()],
    )
    .ok()
    .flatten()
}

/// Holds, to the end of the transaction, the claim on a new account whose field hash starts
/// with `hash_prefix` (HMAC bytes, which say nothing about the value). Two transactions
/// creating the same account under different hash keys meet here: each claims the hash under
/// every usable key, and the key of a transaction in flight stays usable (it is pinned).
pub fn claim_identity(hash_prefix: u32) {
    acquire(
        key_lock_tag(hash_prefix, IDENTITY_CLAIM),
        pg_sys::ExclusiveLock,
        true,
    );
}

/// Serialises key creation and rotation of one purpose until the end of the transaction.
fn lock_purpose(purpose: Purpose) {
    let ordinal = Purpose::ALL.iter().position(|p| *p == purpose).unwrap_or(0) as u16;
    acquire(key_lock_tag(0, ordinal + 1), pg_sys::ExclusiveLock, true);
}

/// Creates the active key of a purpose unless another transaction already did.
pub fn create_active_key(purpose: Purpose) -> Result<()> {
    refresh()?; // the recorder calls this first thing in its transaction
    let kek = kek()?;
    lock_purpose(purpose);
    // Read after the lock, on a fresh snapshot: a key another transaction created while we
    // waited is seen even from a repeatable-read transaction.
    if load_active_key(purpose)?.is_some() {
        return Ok(());
    }
    Spi::connect_mut(|client| -> Result<()> {
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
        CREATING_KEY.set(true);
        let inserted = client.update(
            "INSERT INTO vetassist_auth.keys (key_id, purpose, status, wrapped_key, counter_base) \
             VALUES ($1, $2, 'active', $3, $4)",
            None,
            &[
                id.into(),
                purpose.as_str().into(),
                wrapped.into(),
                base.into(),
            ],
        );
        CREATING_KEY.set(false);
        inserted.map_err(spi_failure)?;
        Ok(())
    })?;
    invalidate_all_backends();
    Ok(())
}

/// Loads data keys matching `condition` (a WHERE clause of our own) on a fresh snapshot.
fn load_keys(condition: &str) -> Result<Vec<Rc<DataKey>>> {
    let rows = latest_rows(
        &format!(
            "SELECT key_id, purpose, wrapped_key, counter_base FROM vetassist_auth.keys \
             WHERE wrapped_key IS NOT NULL AND {condition} ORDER BY key_id DESC"
        ),
        |row| {
            Ok((
                row.get::<i32>(1).unwrap_or_default(),
                row.get::<String>(2).unwrap_or_default(),
                row.get::<Vec<u8>>(3).unwrap_or_default(),
                row.get::<i64>(4).unwrap_or_default(),
            ))
        },
    )?;
    rows.into_iter()
        .map(|(id, purpose, wrapped, base)| unwrap_row(id, &purpose, &wrapped, base))
        .collect()
}

fn load_active_key(purpose: Purpose) -> Result<Option<Rc<DataKey>>> {
    Ok(load_keys(&format!(
        "purpose = '{}' AND status = 'active'",
        purpose.as_str()
    ))?
    .pop())
}

/// Whether an extension table has a column: the library is installed before `ALTER EXTENSION
/// vetassist_auth UPDATE` runs, and must keep an older release's schema working until then.
pub fn schema_has_column(table: &str, column: &str) -> bool {
    Spi::get_one_with_args::<bool>(
        "SELECT EXISTS (SELECT 1 FROM pg_catalog.pg_attribute a \
                        WHERE a.attrelid = pg_catalog.to_regclass('vetassist_auth.' || $1) \
                          AND a.attname = $2 AND NOT a.attisdropped)",
        &[table.into(), column.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false)
}

/// Whether the keys row being inserted is one this extension made (the restore guard's test).
/// Internal: not granted to any role.
#[pg_extern]
fn key_creation_in_progress() -> bool {
    CREATING_KEY.get()
}

/// The active key of a purpose, created on first use. For reading and look-ups; a value that
/// will be stored is made with `key_for_writing`.
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
            // First use: the recorder creates it in a transaction of its own, so this caller
            // holds no lock on key creation while its transaction lasts (docs/ARCHITECTURE.md,
            // "Locks no role can take"); without a recorder the caller creates it.
            kek()?;
            if !crate::audit::recorder::create_key(purpose)? {
                create_active_key(purpose)?;
            }
            load_active_key(purpose)?
                .ok_or_else(|| spi_failure(pgrx::spi::SpiError::InvalidPosition))?
        }
    };
    RING.with_borrow_mut(|ring| ring.active.insert(purpose, key.id));
    Ok(key)
}

/// The active key of a purpose, pinned for the rest of the transaction: it cannot be retired
/// until this transaction ends, so whatever it writes under the key stays readable.
pub fn key_for_writing(purpose: Purpose) -> Result<Rc<DataKey>> {
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
    if let Some(key) = RING.with_borrow(|ring| ring.keys.get(&id).cloned()) {
        return Ok(key);
    }
    let id = i32::try_from(id).map_err(|_| Failure::from(crypto::Error::Authentication))?;
    load_keys(&format!("key_id = {id} AND status <> 'retired'"))?
        .pop()
        .ok_or_else(|| crypto::Error::Authentication.into())
}
pub fn reserve_encryption(key: &DataKey) -> Result<()> {
    let taken = RING.with_borrow_mut(|ring| match ring.leases.get_mut(&key.id) {
        Some((tag, remaining)) if *tag == key.lease_tag && *remaining > 0 => {
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
        crate::audit::recorder::rotate_worn_key_soon(key.purpose, key.id);
        pgrx::ereport!(
            WARNING,
            PgSqlErrorCode::ERRCODE_WARNING,
            format!(
                "vetassist_auth: data key {} ({purpose}) has been used {count} times; it is rotated automatically (or rotate_key('{purpose}'))",
                key.id
            )
        );
    }
    RING.with_borrow_mut(|ring| ring.leases.insert(key.id, (key.lease_tag, LEASE - 1)));
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
    let cached = RING.with_borrow(|ring| ring.decrypt_only.get(&purpose).cloned());
    let others = match cached {
        Some(ids) => ids.into_iter().map(key_by_id).collect::<Result<Vec<_>>>()?,
        None => {
            let keys = load_keys(&format!(
                "purpose = '{}' AND status = 'decrypt_only'",
                purpose.as_str()
            ))?;
            let ids = keys.iter().map(|key| key.id).collect();
            RING.with_borrow_mut(|ring| ring.decrypt_only.insert(purpose, ids));
            keys
        }
    };
    Ok(std::iter::once(active).chain(others).collect())
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
            CHECKED_THIS_XACT.set(false);
            forget_pins();
        }
        XACT_EVENT_ABORT | XACT_EVENT_PARALLEL_ABORT => {
            CHECKED_THIS_XACT.set(false);
            STALE.set(true);
            CREATING_KEY.set(false);
            forget_pins();
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
        // Locks the subtransaction took are gone; pinning again is cheap and idempotent.
        forget_pins();
    }
}

/// The transaction's key locks were released (or handed to a prepared transaction).
fn forget_pins() {
    PINNED.with(|pinned| {
        if let Ok(mut pinned) = pinned.try_borrow_mut() {
            pinned.clear();
        }
    });
}

#[pg_guard]
unsafe extern "C-unwind" fn on_relcache_invalidation(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    let ours = KEYS_RELID.get();
    // While our oid is unknown (looked up again after the last invalidation of the keys table),
    // any relation's invalidation may be ours: ignoring it would keep a rotated key in use.
    if relid == pg_sys::InvalidOid || relid == ours || ours == pg_sys::InvalidOid {
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
    rotate(purpose, None).or_raise().unwrap_or_default() as i32
}

/// Makes a new active key of `purpose` and turns the old one decrypt_only; with `only_if`, only
/// while that key is still the active one (None otherwise). Returns the new key's id.
fn rotate(purpose: Purpose, only_if: Option<u32>) -> Result<Option<u32>> {
    refresh()?;
    kek()?;
    // The retiring key's final count comes from the counter before the new key takes it over.
    lock_purpose(purpose);
    if let Some(expected) = only_if {
        if load_active_key(purpose)?.map(|key| key.id) != Some(expected) {
            return Ok(None);
        }
    }
    let position = Spi::connect(|client| counter_position(client, purpose))?;
    Spi::run_with_args(
        "UPDATE vetassist_auth.keys \
         SET status = 'decrypt_only', encrypt_count = greatest(encrypt_count, ($2 - counter_base) * $3) \
         WHERE purpose = $1 AND status = 'active'",
        &[purpose.as_str().into(), position.into(), LEASE.into()],
    )
    .map_err(spi_failure)?;
    // create_active_key tells every backend, this one included, to drop its cached keys.
    create_active_key(purpose)?;
    let key = load_active_key(purpose)?.expect("the key was just created");
    Ok(Some(key.id))
}

/// Rotates a key that reached the warning mark of its encryption budget, unless it has been
/// rotated already; audited. The recorder runs it (in a transaction of its own), so reaching the
/// mark never turns into every writer being refused at the limit.
pub fn rotate_worn_key(purpose: Purpose, key_id: u32) -> Result<()> {
    if let Some(new_key) = rotate(purpose, Some(key_id))? {
        let details = format!(
            r#"{{"purpose": "{}", "retired_from_writing": {key_id}, "new_key": {new_key}, "reason": "encryption count reached {ENCRYPT_WARN_AT}"}}"#,
            purpose.as_str()
        );
        Spi::run_with_args(
            "SELECT vetassist_auth.write_audit('key', 'key_rotated_automatically', 'success', \
             NULL, 'keys', $1, $2::jsonb)",
            &[key_id.to_string().into(), details.into()],
        )
        .map_err(spi_failure)?;
    }
    Ok(())
}

/// Re-wraps every data key under the current master key after the master key was changed.
/// Keys already wrapped under the current master key are left alone, so a rerun is harmless.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn rewrap_keys(old_master_key_file: default!(Option<&str>, "NULL")) -> i32 {
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
    let old_file = old_master_key_file
        .or_else(previous_master_file)
        .unwrap_or_else(|| {
            Failure::new(
                Kind::InvalidArgument,
                "vetassist_auth: no old master key file was given",
            )
            .with_hint("Pass its path, or set vetassist_auth.previous_master_key_file.")
            .raise()
        });
    let old_kek = crypto::derive_kek(&read_master_key_file(old_file).or_raise());
    refresh().or_raise();
    let new_kek = kek().or_raise();
    let rows: Vec<(i32, String, Vec<u8>)> = Spi::connect(|client| {
        client
            .select("SELECT key_id, purpose, wrapped_key FROM vetassist_auth.keys WHERE wrapped_key IS NOT NULL ORDER BY key_id FOR UPDATE", None, &[])?
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

/// How `retire_unused_keys` found each `decrypt_only` key.
enum Retirement {
    Retired,
    /// No value uses it, but a snapshot from before the last move off it may still be open.
    Waiting,
    /// A stored value, or an open transaction holding the key, still needs it.
    InUse,
}

/// Retires `decrypt_only` keys that nothing can need any more (docs/ARCHITECTURE.md,
/// "Retiring a key"): no open transaction holds the key (it would have pinned it), no committed
/// value uses it on a fresh snapshot, and no snapshot older than that check is still open in
/// this database. The first call that finds a key unused records the check's transaction
/// horizon; a later call retires the key once every older snapshot has ended.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn retire_unused_keys() -> i32 {
    refresh().or_raise();
    // A transaction that has already written may have moved values off a key itself: a snapshot
    // taken between this check and its commit would still see them under the key. It only
    // records the horizon, and a later transaction retires.
    // SAFETY: reads this backend's own transaction state.
    let wrote = unsafe { pg_sys::GetTopTransactionIdIfAny() } != pg_sys::InvalidTransactionId;
    // A schema from before 0.1.2 cannot record the wait: retire nothing until it is updated.
    if !schema_has_column("keys", "retire_after") {
        return 0;
    }
    let candidates = latest_rows(
        "SELECT key_id, retire_after FROM vetassist_auth.keys WHERE status = 'decrypt_only' ORDER BY key_id",
        |row| Ok((row.get::<i32>(1).unwrap_or_default(), row.get::<i64>(2))),
    )
    .or_raise();
    // Without waiting: a key some open transaction has pinned is simply not retired this time.
    let free: Vec<(i32, Option<i64>)> = candidates
        .into_iter()
        .filter(|(id, _)| acquire(key_lock_tag(*id as u32, 0), pg_sys::ExclusiveLock, false))
        .collect();
    if free.is_empty() {
        return 0;
    }
    // SAFETY: reads the shared transaction counter; no lock is needed for a lower bound.
    let horizon = unsafe { pg_sys::ReadNextFullTransactionId() }.value as i64;
    let used: HashSet<i32> = latest_rows(
        "SELECT DISTINCT key_id FROM vetassist_auth.key_usage WHERE key_id IS NOT NULL",
        |row| Ok(row.get::<i32>(1).unwrap_or_default()),
    )
    .or_raise()
    .into_iter()
    .collect();
    let mut retired = 0;
    for (id, retire_after) in free {
        let outcome = if used.contains(&id) {
            Retirement::InUse
        } else if !wrote && no_snapshot_before(retire_after.unwrap_or(horizon)).or_raise() {
            Retirement::Retired
        } else {
            Retirement::Waiting
        };
        let (sql, args): (&str, Vec<pgrx::datum::DatumWithOid>) = match outcome {
            Retirement::Retired => {
                retired += 1;
                ("UPDATE vetassist_auth.keys SET status = 'retired', retired_at = pg_catalog.now(), retire_after = NULL WHERE key_id = $1",
                 vec![id.into()])
            }
            Retirement::Waiting if wrote || retire_after.is_none() => (
                "UPDATE vetassist_auth.keys SET retire_after = $2 WHERE key_id = $1",
                vec![id.into(), horizon.into()],
            ),
            Retirement::InUse if retire_after.is_some() => (
                "UPDATE vetassist_auth.keys SET retire_after = NULL WHERE key_id = $1",
                vec![id.into()],
            ),
            _ => continue,
        };
        Spi::run_with_args(sql, &args)
            .map_err(spi_failure)
            .or_raise();
        if matches!(outcome, Retirement::Retired) {
            audit_key_event("key_retired", id);
        }
    }
    if retired > 0 {
        invalidate_all_backends();
    }
    retired
}

/// Whether every other backend of this database (and every standby feeding back through a
/// WAL sender) took its oldest snapshot at or after transaction id `full_xid`.
fn no_snapshot_before(full_xid: i64) -> Result<bool> {
    // SAFETY: drops this transaction's cached copy of the backend status table, so the query
    // below reads every backend's current xmin rather than one read earlier in the transaction.
    unsafe { pg_sys::pgstat_clear_snapshot() };
    let older = Spi::get_one_with_args::<i64>(
        "SELECT pg_catalog.count(*) FROM pg_catalog.pg_stat_activity \
         WHERE pid <> pg_catalog.pg_backend_pid() \
           AND (datname = pg_catalog.current_database() OR datname IS NULL) \
           AND backend_xmin IS NOT NULL \
           AND ((backend_xmin::text::bigint - ($1 & 4294967295)) & 4294967295) >= 2147483648",
        &[full_xid.into()],
    )
    .map_err(spi_failure)?
    .unwrap_or_default();
    Ok(older == 0)
}

fn audit_key_event(event_type: &str, key_id: i32) {
    Spi::run_with_args(
        "SELECT vetassist_auth.write_audit('key', $1, 'success', NULL, 'keys', $2::text, '{}'::jsonb)",
        &[event_type.into(), key_id.into()],
    )
    .map_err(spi_failure)
    .or_raise();
}

/// Applies `set` (an assignment list of our own) to a retired key whose material still exists,
/// audits it as `event_type`, and tells every backend; P0002 when there is no such key.
fn change_retired_key(key_id: i32, set: &str, event_type: &str, hint: &str) -> bool {
    let changed = Spi::get_one_with_args::<i64>(
        &format!(
            "WITH k AS (UPDATE vetassist_auth.keys SET {set} \
                        WHERE key_id = $1 AND status = 'retired' AND wrapped_key IS NOT NULL RETURNING 1) \
             SELECT pg_catalog.count(*) FROM k"
        ),
        &[key_id.into()],
    )
    .map_err(spi_failure)
    .or_raise()
    .unwrap_or_default();
    if changed == 0 {
        Failure::new(
            Kind::NotFound,
            "vetassist_auth: no retired key with this id whose material still exists",
        )
        .with_hint(hint)
        .raise();
    }
    audit_key_event(event_type, key_id);
    invalidate_all_backends();
    true
}

/// Brings a retired key back to `decrypt_only`, for values found under it after all (restored
/// from a backup, written outside the extension's tables). Its material must still exist.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn unretire_key(key_id: i32) -> bool {
    change_retired_key(
        key_id,
        "status = 'decrypt_only', retired_at = NULL",
        "key_unretired",
        "A destroyed key cannot be brought back.",
    )
}

/// Destroys a retired key's material for good (crypto-shredding): values under it can never
/// be read again, and it can no longer be brought back.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn destroy_key(key_id: i32) -> bool {
    change_retired_key(
        key_id,
        "wrapped_key = NULL, destroyed_at = pg_catalog.now()",
        "key_destroyed",
        "Only retired keys are destroyed; reencrypt() retires keys no value uses.",
    )
}
