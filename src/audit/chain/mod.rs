//! Tamper evidence (docs/ARCHITECTURE.md, "Audit chain"): sealing audit rows into an HMAC chain
//! (seal.rs), verifying it against its anchors (verify.rs), and purging its oldest part behind a
//! checkpoint (purge.rs). Here: what they share, the chain's head and its lock.

use super::PURGING;
use crate::crypto::audit_chain;
use crate::error::{Failure, Kind, OrRaise};
use crate::gucs;
use crate::keys::{self, Purpose};
use crate::pg;
use crate::search_path;
use pgrx::prelude::*;

mod purge;
mod seal;
mod verify;

type Outcome<T> = crate::error::Result<T>;

fn spi_failed(error: pgrx::spi::SpiError) -> Failure {
    pg::query_failed("the audit chain", error)
}

/// The first column of the first row of a read-only query.
fn select_one<T: FromDatum + IntoDatum>(
    client: &pgrx::spi::SpiClient<'_>,
    sql: &str,
    args: &[pgrx::datum::DatumWithOid<'_>],
) -> Outcome<Option<T>> {
    client
        .select(sql, None, args)
        .and_then(|table| table.first().get_one())
        .map_err(spi_failed)
}

/// Hash and sequence number the chain continues from: the newest seal, else the purge
/// checkpoint, else the genesis.
fn chain_head(client: &pgrx::spi::SpiClient<'_>) -> Outcome<(i64, Vec<u8>)> {
    let newest = client
        .select(
            "SELECT seq, hash FROM vetassist_auth.audit_seals ORDER BY seq DESC LIMIT 1",
            None,
            &[],
        )
        .map_err(spi_failed)?;
    if let Some(row) = newest.into_iter().next() {
        let seq: i64 = row.get(1).map_err(spi_failed)?.unwrap_or_default();
        let hash: Vec<u8> = row.get(2).map_err(spi_failed)?.unwrap_or_default();
        return Ok((seq, hash));
    }
    checkpoint(client)
}

fn checkpoint(client: &pgrx::spi::SpiClient<'_>) -> Outcome<(i64, Vec<u8>)> {
    let state = client
        .select(
            "SELECT checkpoint_seq, checkpoint_hash FROM vetassist_auth.audit_seal_state",
            None,
            &[],
        )
        .map_err(spi_failed)?;
    let (seq, hash) = match state.into_iter().next() {
        Some(row) => (
            row.get::<i64>(1).map_err(spi_failed)?,
            row.get::<Vec<u8>>(2).map_err(spi_failed)?,
        ),
        None => (None, None),
    };
    Ok((
        seq.unwrap_or(0),
        hash.unwrap_or_else(|| audit_chain::GENESIS.to_vec()),
    ))
}

/// " (backend N)" naming who holds the audit chain lock, for the sealer's and purge's WARNINGs.
fn chain_holder_note() -> String {
    audit_chain_holder()
        .map(|pid| format!(" (backend {pid})"))
        .unwrap_or_default()
}

/// The row text that is hashed must not depend on the session: every setting that changes how
/// to_jsonb prints a column of audit_log is fixed for the call (the function's SET clause undoes
/// it at exit).
const ROW_TEXT_SETTINGS: &str = "SELECT pg_catalog.set_config(s.name, s.value, true) FROM (VALUES \
    ('TimeZone', 'UTC'), ('DateStyle', 'ISO, MDY'), ('IntervalStyle', 'postgres'), \
    ('bytea_output', 'hex'), ('extra_float_digits', '1')) AS s (name, value)";

/// Serialises sealing and purging of the audit chain to the end of the transaction; false when
/// `wait` is off and another transaction holds it. No SQL function can take this lock, so no
/// role can stall the chain by holding it.
fn lock_audit_chain(wait: bool) -> bool {
    pg::acquire(
        keys::key_lock_tag(0, keys::AUDIT_CHAIN),
        pg_sys::ExclusiveLock,
        wait,
    )
}

/// The backend holding the audit chain lock, if any (for the sealer's WARNING and status).
/// pg_locks shows the 16-bit subid as a signed smallint.
fn audit_chain_holder() -> Option<i32> {
    search_path::pinned(|| crate::pg::read_one::<i32>(
        "SELECT pid FROM pg_catalog.pg_locks WHERE locktype = 'object' AND granted \
           AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()) \
           AND classid = $1 AND objid = 0 AND (objsubid::integer & 65535) = $2 AND pid <> pg_catalog.pg_backend_pid() LIMIT 1",
        &[keys::keys_relid().into(), (keys::AUDIT_CHAIN as i32).into()],
    ))
    .ok()
    .flatten()
}
