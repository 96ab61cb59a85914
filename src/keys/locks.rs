//! Object locks on the keys table, which only C code can take: key pins and per-purpose key
//! management, and the one table of the lock space's sub-ids (identity claims and the audit
//! chain lock there too, taken by their owners).

use super::*;

/// The lock tag of one data key (`objid` = key id) or of one purpose's key management
/// (`objid` = 0, `subid` = purpose), in the keys table's object-lock space.
pub fn key_lock_tag(objid: u32, subid: u16) -> pg_sys::LOCKTAG {
    crate::pg::object_lock_tag(keys_relid(), objid, subid)
}

/// The subid of identity claims in the keys table's object-lock space, apart from pins
/// (key id, 0), purpose locks (0, purpose ordinal + 1) and the audit chain (0, AUDIT_CHAIN).
pub const IDENTITY_CLAIM: u16 = u16::MAX;
pub const AUDIT_CHAIN: u16 = u16::MAX - 1;
/// Wrapping keys (0, KEY_WRAPPING): every key creation holds it shared to the end of its
/// transaction, rewrap_keys exclusively, so a rewrap waits for keys wrapped concurrently and
/// then sees them (docs/ARCHITECTURE.md, "Changing the master key").
pub(super) const KEY_WRAPPING: u16 = u16::MAX - 2;

pub(super) fn lock_key_wrapping(mode: u32) {
    acquire(key_lock_tag(0, KEY_WRAPPING), mode, true);
}

/// Serialises key creation and rotation of one purpose until the end of the transaction.
pub(super) fn lock_purpose(purpose: Purpose) {
    acquire(
        key_lock_tag(0, u16::from(purpose.ordinal()) + 1),
        pg_sys::ExclusiveLock,
        true,
    );
}
