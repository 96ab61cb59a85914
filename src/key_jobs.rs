//! The outbox's jobs for the data keys (docs/ARCHITECTURE.md, "Layers"): a purpose's first key
//! created in the recorder's transaction, so no application transaction holds key creation, and
//! a key at the warning mark of its budget rotated without the caller waiting. `keys` asks for
//! them through the delegates registered here.

use crate::error::{Failure, Kind, Result};
use crate::keys::{self, Purpose};
use crate::outbox::{self, Job};

/// Registers the jobs with the outbox and the delegates with `keys`; called from `_PG_init`.
pub fn register() {
    outbox::register(Job::CreateKey, run_create_key);
    outbox::register(Job::RotateWornKey, run_rotate_worn_key);
    keys::delegate(keys::Delegates {
        create_key,
        rotate_worn_key_soon,
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
