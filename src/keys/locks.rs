//! Object locks on the keys table, which only C code can take: key pins, per-purpose key
//! management, identity claims and the audit chain.

use super::*;

/// The lock tag of one data key (`objid` = key id) or of one purpose's key management
/// (`objid` = 0, `subid` = purpose): an object lock on the keys table, which only C code can
/// take. Advisory locks would be a namespace that every role can squat on.
pub(super) fn key_lock_tag(objid: u32, subid: u16) -> pg_sys::LOCKTAG {
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
pub(super) fn acquire(tag: pg_sys::LOCKTAG, mode: u32, wait: bool) -> bool {
    // SAFETY: a valid tag of the default lock method; the lock belongs to the current
    // transaction's resource owner and is released at its end (or its subtransaction's abort).
    let result = unsafe { pg_sys::LockAcquire(&tag, mode as pg_sys::LOCKMODE, false, !wait) };
    result != pg_sys::LockAcquireResult::LOCKACQUIRE_NOT_AVAIL
}

/// The subid of identity claims in the keys table's object-lock space, apart from pins
/// (key id, 0), purpose locks (0, purpose ordinal + 1) and the audit chain (0, AUDIT_CHAIN).
pub(super) const IDENTITY_CLAIM: u16 = u16::MAX;
pub(super) const AUDIT_CHAIN: u16 = u16::MAX - 1;
/// Wrapping keys (0, KEY_WRAPPING): every key creation holds it shared to the end of its
/// transaction, rewrap_keys exclusively, so a rewrap waits for keys wrapped concurrently and
/// then sees them (docs/ARCHITECTURE.md, "Changing the master key").
pub(super) const KEY_WRAPPING: u16 = u16::MAX - 2;

pub(super) fn lock_key_wrapping(mode: u32) {
    acquire(key_lock_tag(0, KEY_WRAPPING), mode, true);
}

/// Serialises sealing and purging of the audit chain to the end of the transaction; false when
/// `wait` is off and another transaction holds it. No SQL function can take this lock, so no
/// role can stall the chain by holding it.
pub fn lock_audit_chain(wait: bool) -> bool {
    acquire(key_lock_tag(0, AUDIT_CHAIN), pg_sys::ExclusiveLock, wait)
}

/// The backend holding the audit chain lock, if any (for the sealer's WARNING and status).
/// pg_locks shows the 16-bit subid as a signed smallint.
pub fn audit_chain_holder() -> Option<i32> {
    search_path::pinned(|| Spi::get_one_with_args::<i32>(
        "SELECT pid FROM pg_catalog.pg_locks WHERE locktype = 'object' AND granted \
           AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()) \
           AND classid = $1 AND objid = 0 AND (objsubid::integer & 65535) = $2 AND pid <> pg_catalog.pg_backend_pid() LIMIT 1",
        &[keys_relid().into(), (AUDIT_CHAIN as i32).into()],
    ))
    .ok()
    .flatten()
}

/// Locks the identity claims are spread over.
const IDENTITY_BUCKETS: u32 = 256;

/// Holds, to the end of the transaction, the claim on a new account whose field hash starts
/// with `hash_prefix` (HMAC bytes, which say nothing about the value). Two transactions
/// creating the same account under different hash keys meet here: each claims the hash under
/// every usable key, and the key of a transaction in flight stays usable (it is pinned).
///
/// Claims fall into `IDENTITY_BUCKETS` locks: a transaction creating many accounts (an import)
/// holds at most that many, not one per account, which filled the shared lock table ("out of
/// shared memory" at 20,000 accounts). Two new veterans in one bucket only take turns.
pub fn claim_identity(hash_prefix: u32) {
    acquire(
        key_lock_tag(hash_prefix % IDENTITY_BUCKETS, IDENTITY_CLAIM),
        pg_sys::ExclusiveLock,
        true,
    );
}

/// Serialises key creation and rotation of one purpose until the end of the transaction.
pub(super) fn lock_purpose(purpose: Purpose) {
    acquire(
        key_lock_tag(0, u16::from(purpose.ordinal()) + 1),
        pg_sys::ExclusiveLock,
        true,
    );
}
