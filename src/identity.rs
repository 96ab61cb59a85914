//! Account creation that stays unique while the hash key rotates (docs/ARCHITECTURE.md,
//! "One account per ICN").

use crate::error::OrRaise;
use crate::keys;
use crate::pg;
use crate::sealing::field_hashes_value;
use pgrx::prelude::*;
use std::fmt::Write;

/// Before creating an account for an ICN that was not found: claims the ICN's hash under every
/// usable hash key until the end of the transaction, which waits for any transaction creating
/// the same account under another hash key, then looks for the account on a fresh snapshot.
/// True when it exists after all: look it up again instead of creating it.
#[pg_extern(strict, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn claim_new_account(va_icn: &str) -> bool {
    // A field hash is key id (4 bytes) || HMAC; claim by the first HMAC bytes, in one order
    // for every transaction so that two claimants cannot deadlock.
    let mut prefixes: Vec<u32> = field_hashes_value(va_icn, "va_icn")
        .or_raise()
        .iter()
        .filter_map(|hash| hash.get(4..8))
        .map(|bytes| u32::from_be_bytes(bytes.try_into().expect("four bytes")))
        .collect();
    prefixes.sort_unstable();
    prefixes.dedup();
    for prefix in prefixes {
        claim_identity(prefix);
    }
    // The other claimant may have committed under a hash key this backend has not seen yet.
    // SAFETY: processes pending catalog invalidations (the key cache drops itself on ours).
    unsafe { pg_sys::AcceptInvalidationMessages() };
    let mut list = String::new();
    for hash in field_hashes_value(va_icn, "va_icn").or_raise() {
        // Hex literals formatted from hash bytes: no caller text enters the query.
        list.push_str(if list.is_empty() { "'\\x" } else { ",'\\x" });
        for byte in hash {
            write!(list, "{byte:02x}").expect("writing to a String");
        }
        list.push_str("'::bytea");
    }
    let sql = format!(
        "SELECT 1 FROM vetassist_auth.users WHERE va_icn_hash = ANY (ARRAY[{list}]) LIMIT 1"
    );
    !pg::latest_rows(&sql, |_| Ok(())).or_raise().is_empty()
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
fn claim_identity(hash_prefix: u32) {
    pg::acquire(
        keys::key_lock_tag(hash_prefix % IDENTITY_BUCKETS, keys::IDENTITY_CLAIM),
        pg_sys::ExclusiveLock,
        true,
    );
}
