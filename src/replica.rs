//! Where this node stands in logical replication (docs/ARCHITECTURE.md, "Replicas and
//! failover"). On a subscriber the apply worker writes the extension's tables; if anything of
//! ours wrote them too (the sweeper sealing replicated rows, the recorder creating a key, an API
//! call taking the next audit id of a sequence that is not replicated), the next row of the
//! primary would collide with it and the apply would fail for good. So on a subscriber nothing
//! of ours writes, until `promote()` declares the failover.
//!
//! Every write of ours passes one of a few choke points (the audit writer, the durable
//! recorder's queue, key creation, sealing, `set_current_session`); each asks `require_primary`.
//! The answer is kept for the rest of the transaction once it is "primary", so the hot path pays
//! one catalog query per transaction at most (none with `node_role = 'primary'`).

use crate::error::{Failure, Kind};
use pgrx::prelude::*;
use pgrx::{GucContext, GucFlags, GucRegistry, GucSetting, PostgresGucEnum};
use std::cell::Cell;

/// `vetassist_auth.node_role`.
#[derive(PostgresGucEnum, Clone, Copy, PartialEq, Eq, Debug)]
pub enum NodeRole {
    /// A subscriber when a subscription of this database replicates a table of the extension.
    #[name = c"auto"]
    Auto,
    /// Always a primary (the extension writes), whatever replicates into this database.
    #[name = c"primary"]
    Primary,
    /// A subscriber (replication the extension cannot see), until promote().
    #[name = c"subscriber"]
    Subscriber,
}

pub static NODE_ROLE: GucSetting<NodeRole> = GucSetting::<NodeRole>::new(NodeRole::Auto);

pub fn define_setting() {
    GucRegistry::define_enum_guc(
        c"vetassist_auth.node_role",
        c"Whether the extension may write here: auto (a subscriber while a subscription replicates its tables), primary, or subscriber.",
        c"On a subscriber nothing of the extension writes its tables and the application's writes fail with 55000, until vetassist_auth.promote().",
        &NODE_ROLE,
        GucContext::Sighup,
        GucFlags::default(),
    );
}

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub enum Role {
    Primary,
    Subscriber,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Primary => "primary",
            Role::Subscriber => "subscriber",
        }
    }
}

/// What decides the role, for verify_installation.
struct State {
    role: Role,
    /// Subscriptions of this database that replicate a table of the extension, with whether a
    /// promotion ended them.
    subscriptions: Vec<(String, bool)>,
    /// When this node (this cluster's database) was last promoted.
    promoted_at: Option<String>,
}

thread_local! {
    /// Set once this transaction found the node a primary; cleared at its end. A subscriber is
    /// asked again each time (it only fails), so promote() sees its own promotion at once.
    static PRIMARY_IN_THIS_TRANSACTION: Cell<bool> = const { Cell::new(false) };
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_at_transaction_end(
    event: pg_sys::XactEvent::Type,
    _arg: *mut std::ffi::c_void,
) {
    use pg_sys::XactEvent::*;
    if matches!(
        event,
        XACT_EVENT_COMMIT
            | XACT_EVENT_ABORT
            | XACT_EVENT_PREPARE
            | XACT_EVENT_PARALLEL_COMMIT
            | XACT_EVENT_PARALLEL_ABORT
    ) {
        PRIMARY_IN_THIS_TRANSACTION.set(false);
    }
}

pub fn register_callbacks() {
    // SAFETY: called once per backend from _PG_init; the callback is a static function.
    unsafe { pg_sys::RegisterXactCallback(Some(forget_at_transaction_end), std::ptr::null_mut()) };
}

/// Runs `f` as the bootstrap superuser: the role is decided from catalogs and a table of ours
/// whoever asks (a row-audit trigger fires for any role). The queries are fixed texts.
fn as_superuser<R>(f: impl FnOnce() -> R + std::panic::UnwindSafe) -> R {
    let mut user = pg_sys::InvalidOid;
    let mut context = 0;
    // SAFETY: reads and sets this backend's current user id and security context, as
    // SECURITY DEFINER functions do; restored below on success and on error (an abort restores
    // it too).
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut user, &mut context);
        pg_sys::SetUserIdAndSecContext(
            pg_sys::Oid::from(pg_sys::BOOTSTRAP_SUPERUSERID),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    PgTryBuilder::new(f)
        .finally(|| {
            // SAFETY: the values read above.
            unsafe { pg_sys::SetUserIdAndSecContext(user, context) }
        })
        .execute()
}

fn unreadable(_: pgrx::spi::SpiError) -> Failure {
    Failure::new(
        Kind::NotConfigured,
        "vetassist_auth: this node's replication role cannot be read",
    )
}

/// Subscriptions of this database that replicate a table in the extension's schema, by oid.
fn subscriptions() -> Result<Vec<(i64, String)>, Failure> {
    crate::search_path::pinned(|| {
        Spi::connect(|client| {
            client
                .select(
                    "SELECT DISTINCT s.oid::bigint, s.subname::text \
                     FROM pg_catalog.pg_subscription_rel r \
                     JOIN pg_catalog.pg_class c ON c.oid = r.srrelid \
                     JOIN pg_catalog.pg_namespace n ON n.oid = c.relnamespace \
                     JOIN pg_catalog.pg_subscription s ON s.oid = r.srsubid \
                     WHERE n.nspname = 'vetassist_auth' ORDER BY 2",
                    None,
                    &[],
                )?
                .map(|row| {
                    Ok((
                        row.get::<i64>(1)?.unwrap_or_default(),
                        row.get::<String>(2)?.unwrap_or_default(),
                    ))
                })
                .collect::<Result<Vec<_>, pgrx::spi::SpiError>>()
        })
    })
    .map_err(unreadable)
}

/// This node's promotion, if any: when, and the subscriptions it ended. Rows replicated from
/// another cluster carry that cluster's system identifier and are ignored.
fn promotion() -> Result<Option<(String, Vec<i64>)>, Failure> {
    // SAFETY: a syscache look-up by name, inside a transaction. The table is new in 0.2.0: the
    // library serves an older release's SQL until ALTER EXTENSION UPDATE.
    let exists = unsafe {
        let schema = pg_sys::get_namespace_oid(c"vetassist_auth".as_ptr(), true);
        schema != pg_sys::InvalidOid
            && pg_sys::get_relname_relid(c"node_promotions".as_ptr(), schema) != pg_sys::InvalidOid
    };
    if !exists {
        return Ok(None);
    }
    // SAFETY: reads the control file's copy in shared memory and this backend's database.
    let (system, database) =
        unsafe { (pg_sys::GetSystemIdentifier() as i64, pg_sys::MyDatabaseId) };
    crate::search_path::pinned(|| {
        Spi::connect(|client| {
            let rows = client.select(
                "SELECT pg_catalog.to_char(p.promoted_at, 'YYYY-MM-DD HH24:MI:SSOF'), \
                        p.ended_subscriptions::bigint[] \
                 FROM vetassist_auth.node_promotions p \
                 WHERE p.system_identifier = $1 AND p.database = $2",
                Some(1),
                &[system.into(), database.into()],
            )?;
            match rows.into_iter().next() {
                None => Ok(None),
                Some(row) => Ok(Some((
                    row.get::<String>(1)?.unwrap_or_default(),
                    row.get::<Vec<i64>>(2)?.unwrap_or_default(),
                ))),
            }
        })
    })
    .map_err(unreadable)
}

fn state() -> Result<State, Failure> {
    as_superuser(|| {
        let setting = NODE_ROLE.get();
        let subscriptions = subscriptions()?;
        let promotion = promotion()?;
        let subscriptions: Vec<(String, bool)> = subscriptions
            .into_iter()
            .map(|(oid, name)| {
                let ended = promotion
                    .as_ref()
                    .is_some_and(|(_, ended)| ended.contains(&oid));
                (name, ended)
            })
            .collect();
        let fed = subscriptions.iter().any(|(_, ended)| !ended);
        let role = match setting {
            NodeRole::Primary => Role::Primary,
            NodeRole::Auto if fed => Role::Subscriber,
            NodeRole::Subscriber if fed || promotion.is_none() => Role::Subscriber,
            _ => Role::Primary,
        };
        Ok(State {
            role,
            subscriptions,
            promoted_at: promotion.map(|(at, _)| at),
        })
    })
}

/// This node's role now: a primary writes, a subscriber does not.
pub fn role() -> Result<Role, Failure> {
    if PRIMARY_IN_THIS_TRANSACTION.get() || NODE_ROLE.get() == NodeRole::Primary {
        return Ok(Role::Primary);
    }
    let role = state()?.role;
    if role == Role::Primary {
        PRIMARY_IN_THIS_TRANSACTION.set(true);
    }
    Ok(role)
}

/// Whether this node may write the extension's tables: the background processes skip their
/// work where it may not.
pub fn is_primary() -> bool {
    matches!(role(), Ok(Role::Primary))
}

/// Refuses a write of ours on a subscriber, or on a hot standby, with 55000 naming the role.
pub fn require_primary() {
    // SAFETY: reads shared recovery state; callable in any backend.
    if unsafe { pg_sys::RecoveryInProgress() } {
        // No recorder runs during recovery: a disclosure would wait for one, then fail.
        Failure::new(
            Kind::NotConfigured,
            "vetassist_auth: this server is a hot standby; the extension writes and discloses nothing here",
        )
        .with_hint("Connect the application to the primary (a standby serves no audited read).")
        .raise();
    }
    match role() {
        Ok(Role::Primary) => {}
        Ok(Role::Subscriber) => Failure::new(
            Kind::NotConfigured,
            "vetassist_auth: this node is a logical replication subscriber; the extension writes nothing here",
        )
        .with_hint(
            "Connect the application to the primary. After a failover, vetassist_auth.promote() (as vetassist_admin) makes this node the primary.",
        )
        .raise(),
        Err(failure) => failure.raise(),
    }
}

/// This node's replication role: `primary` or `subscriber` (docs/operations.md, "Replicas and failover").
#[pg_extern(stable)]
fn node_role() -> &'static str {
    match role() {
        Ok(role) => role.as_str(),
        Err(failure) => failure.raise(),
    }
}

/// Raises 55000 on a subscriber; for SQL functions that write without passing another check.
/// Internal: not granted to any role.
#[pg_extern]
fn require_primary_node() {
    require_primary();
}

/// verify_installation's check: the role and why; `ok` false only when `node_role = 'primary'`
/// overrides a subscription that replicates the extension's tables (the sweeper would then
/// write rows that collide with the primary's). Internal.
#[pg_extern]
fn node_role_state() -> TableIterator<'static, (name!(ok, bool), name!(detail, String))> {
    let state = match state() {
        Ok(state) => state,
        Err(failure) => failure.raise(),
    };
    let setting = NODE_ROLE.get();
    let live: Vec<&str> = state
        .subscriptions
        .iter()
        .filter(|(_, ended)| !ended)
        .map(|(name, _)| name.as_str())
        .collect();
    let promoted = state
        .promoted_at
        .as_deref()
        .map(|at| format!(", promoted at {at}"))
        .unwrap_or_default();
    let (ok, detail) = match (state.role, setting) {
        (Role::Primary, NodeRole::Primary) if !live.is_empty() => (
            false,
            format!(
                "primary (vetassist_auth.node_role = 'primary'), but subscription {} replicates the extension's tables: the sweeper's writes collide with the rows it brings",
                live.join(", ")
            ),
        ),
        (Role::Primary, NodeRole::Primary) => {
            (true, "primary (vetassist_auth.node_role = 'primary')".to_owned())
        }
        (Role::Primary, _) => (true, format!("primary{promoted}")),
        (Role::Subscriber, _) if !live.is_empty() => (
            true,
            format!(
                "subscriber: subscription {} replicates the extension's tables; nothing of the extension writes here until vetassist_auth.promote()",
                live.join(", ")
            ),
        ),
        (Role::Subscriber, _) => (
            true,
            "subscriber (vetassist_auth.node_role = 'subscriber'): nothing of the extension writes here until vetassist_auth.promote()"
                .to_owned(),
        ),
    };
    TableIterator::once((ok, detail))
}

// Who may call the functions above (any other function of the extension: no role,
// sql/grants.sql).
extension_sql!(
    r#"
GRANT EXECUTE ON FUNCTION vetassist_auth.node_role() TO vetassist_app, vetassist_admin, vetassist_auditor;
"#,
    name = "replica_grants",
    requires = [node_role],
);

/// A `pg_restore` session connected to this database as a role that can restore (a superuser or
/// the database's owner: the application, which can name itself anything, cannot hold our
/// writers off): its pid and for how many seconds it has been connected. Nothing of ours that
/// writes on its own initiative (the sweeper, the key custody record) may write meanwhile: its
/// row would collide with the rows the restore brings.
pub fn restore_session() -> Result<Option<(i32, i64)>, pgrx::spi::SpiError> {
    let found = pgrx::spi::Spi::get_two::<i32, i64>(
        "SELECT a.pid, pg_catalog.date_part('epoch', pg_catalog.now() - a.backend_start)::bigint \
         FROM pg_catalog.pg_stat_activity a JOIN pg_catalog.pg_database d ON d.datname = a.datname \
         WHERE a.datname = pg_catalog.current_database() AND a.application_name = 'pg_restore' \
           AND (a.usesysid = d.datdba OR EXISTS (SELECT 1 FROM pg_catalog.pg_roles r \
                                                 WHERE r.oid = a.usesysid AND r.rolsuper)) \
         ORDER BY a.backend_start LIMIT 1",
    );
    match found {
        Ok((Some(pid), seconds)) => Ok(Some((pid, seconds.unwrap_or_default()))),
        Ok((None, _)) | Err(pgrx::spi::SpiError::InvalidPosition) => Ok(None),
        Err(e) => Err(e),
    }
}
