//! Where this node stands in a Citus cluster (docs/citus.md, "Scale-out on Citus"). The application's
//! calls and every encryption run on the coordinator; a worker holds shards and its own audit
//! chain. Asked of Citus itself, not of our SQL: this library also serves an older release's
//! SQL until `ALTER EXTENSION ... UPDATE`.

use crate::error::{Failure, Kind, OrRaise, Result};
use pgrx::prelude::*;

/// Whether this node is a Citus worker: Citus numbers a node's group 0 on the coordinator (and
/// on a node of its own), above 0 on a worker. Without Citus, one catalog cache look-up.
pub fn on_worker() -> Result<bool> {
    // SAFETY: a syscache look-up by name in pg_catalog, inside a transaction.
    let catalog = unsafe {
        pg_sys::get_relname_relid(
            c"pg_dist_local_group".as_ptr(),
            pg_sys::Oid::from(pg_sys::PG_CATALOG_NAMESPACE),
        )
    };
    if catalog == pg_sys::InvalidOid {
        return Ok(false);
    }
    crate::search_path::pinned(|| {
        crate::pg::read_one::<bool>(
            "SELECT groupid <> 0 FROM pg_catalog.pg_dist_local_group",
            &[],
        )
    })
    .map(Option::unwrap_or_default)
    .map_err(|_| {
        Failure::new(
            Kind::NotConfigured,
            "vetassist_auth: this node's place in the Citus cluster cannot be read",
        )
    })
}

/// Whether this node is a Citus worker, for SQL (the row-audit event trigger). Internal.
#[pg_extern(stable)]
fn on_citus_worker() -> bool {
    on_worker().or_raise()
}

/// Refuses an API call on a worker (55000). On a worker the call would see only that worker's
/// audit log: its disclosures would miss the coordinator's accounting and its MFA failures the
/// lock-out count. A superuser's session passes: Citus itself connects to the workers as one
/// (shard DDL fires our event triggers there).
pub fn require_coordinator() {
    // SAFETY: reads the session's user id and its pg_authid row, inside a transaction.
    let superuser = unsafe { pg_sys::superuser_arg(pg_sys::GetSessionUserId()) };
    if superuser {
        return;
    }
    match on_worker() {
        Ok(false) => {}
        Ok(true) => Failure::new(
            Kind::NotConfigured,
            "vetassist_auth: the application's calls run on the Citus coordinator",
        )
        .with_hint("Connect the application to the coordinator.")
        .raise(),
        Err(failure) => failure.raise(),
    }
}
