//! Audit context: who the application says is acting in this transaction.
//!
//! `set_actor` stores the application user (and client address) in backend memory for the
//! current transaction only; a pooled connection never carries one request's actor into the
//! next. (A transaction-local setting would not work: SECURITY DEFINER functions with a
//! `SET search_path` clause undo local settings made inside them.)

use crate::crypto::audit_chain;
use crate::encryption;
use crate::error::{Failure, Kind, OrRaise};

type Outcome<T> = crate::error::Result<T>;
use crate::keys::{self, Purpose};
use pgrx::prelude::*;
use pgrx::Uuid;
use std::cell::RefCell;
use std::ffi::CStr;

#[derive(Default, Clone)]
struct Actor {
    user_id: Option<Uuid>,
    ip_hash: Option<Vec<u8>>,
    session_id: Option<Uuid>,
}

thread_local! {
    static ACTOR: RefCell<Actor> = RefCell::new(Actor::default());
}

/// Actor and purge permission last for one transaction only.
#[pg_guard]
unsafe extern "C-unwind" fn reset_at_transaction_end(
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
        ACTOR.with_borrow_mut(|a| *a = Actor::default());
        PURGING.set(false);
    }
}

pub fn register_callbacks() {
    unsafe { pg_sys::RegisterXactCallback(Some(reset_at_transaction_end), std::ptr::null_mut()) };
}

/// Names the application user behind the current transaction (and, optionally, the end
/// user's IP address, stored only as a keyed hash). Audit rows written later in the same
/// transaction carry both.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn set_actor(user_id: Option<Uuid>, client_ip: default!(Option<&str>, "NULL")) {
    let ip_hash = client_ip.map(|ip| encryption::field_hash_value(ip, "ip").or_raise());
    ACTOR.with_borrow_mut(|a| {
        a.user_id = user_id;
        a.ip_hash = ip_hash;
    });
}

/// Remembers the session a request runs in (touch_session calls it) for the audit rows after
/// it. Internal: not granted to any role.
#[pg_extern(strict, security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn set_current_session(session_id: Uuid) {
    ACTOR.with_borrow_mut(|a| a.session_id = Some(session_id));
}

#[pg_extern(stable, parallel_safe)]
fn current_actor() -> Option<Uuid> {
    ACTOR.with_borrow(|a| a.user_id)
}

#[pg_extern(stable, parallel_safe)]
fn current_actor_ip_hash() -> Option<Vec<u8>> {
    ACTOR.with_borrow(|a| a.ip_hash.clone())
}

#[pg_extern(stable, parallel_safe)]
fn current_session_id() -> Option<Uuid> {
    ACTOR.with_borrow(|a| a.session_id)
}

// ---------------------------------------------------------------------------------------------
// Tamper evidence: sealing and verification (DESIGN section 8)

thread_local! {
    /// Set only inside purge_audit_log, for the rest of its transaction: the append-only
    /// triggers let exactly those deletes through.
    static PURGING: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
}

/// Whether the current transaction is inside purge_audit_log. Internal.
#[pg_extern(stable)]
fn audit_purge_in_progress() -> bool {
    PURGING.get()
}

fn spi_failed(e: pgrx::spi::SpiError) -> Failure {
    Failure::new(
        Kind::NotConfigured,
        format!("vetassist_auth: audit chain query failed: {e}"),
    )
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

/// Seals finished transactions' audit rows into the chain, oldest id first, at most
/// `max_rows` per call; returns how many. Writers never wait: rows of transactions still
/// running are invisible here and are sealed by a later call. Only one sealer runs at a time;
/// a concurrent call returns 0 at once.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn seal_audit_log(max_rows: default!(i32, 10000)) -> i32 {
    if max_rows < 1 {
        Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: max_rows must be a positive integer",
        )
        .raise();
    }
    let locked = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.pg_try_advisory_xact_lock($1, 2)",
        &[SEAL_LOCK_CLASS.into()],
    )
    .ok()
    .flatten()
    .unwrap_or(false);
    if !locked {
        return 0;
    }
    let key = keys::active_key(Purpose::Audit).or_raise();
    Spi::connect_mut(|client| -> Outcome<i32> {
        // The row text is hashed: fix the time zone it is printed in (undone at function exit).
        client.update("SELECT pg_catalog.set_config('TimeZone', 'UTC', true)", None, &[]).map_err(spi_failed)?;
        // Rows of transactions that have not finished yet were inserted at or after this moment.
        let horizon: TimestampWithTimeZone = client
            .select(
                "SELECT least((SELECT min(xact_start) FROM pg_catalog.pg_stat_activity \
                               WHERE xact_start IS NOT NULL AND pid <> pg_catalog.pg_backend_pid()), \
                              (SELECT min(prepared) FROM pg_catalog.pg_prepared_xacts), \
                              pg_catalog.statement_timestamp()) - interval '1 second'",
                None,
                &[],
            )
            .map_err(spi_failed)?
            .first()
            .get_one()
            .map_err(spi_failed)?
            .expect("least() of a timestamp is not NULL");
        let (mut seq, mut prev) = chain_head(client)?;
        let rows = client
            .select(
                "SELECT a.id, pg_catalog.to_jsonb(a)::text FROM vetassist_auth.audit_log a \
                 WHERE a.occurred_at >= coalesce((SELECT scan_from FROM vetassist_auth.audit_seal_state), '-infinity') \
                   AND NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_seals s WHERE s.audit_id = a.id) \
                 ORDER BY a.id LIMIT $1",
                None,
                &[max_rows.into()],
            )
            .map_err(spi_failed)?;
        let (mut seqs, mut ids, mut prevs, mut hashes) = (vec![], vec![], vec![], vec![]);
        for row in rows {
            let id: i64 = row.get(1).map_err(spi_failed)?.unwrap_or_default();
            let text: String = row.get(2).map_err(spi_failed)?.unwrap_or_default();
            let hash = audit_chain::link(key.secret(), &prev, &text);
            seq += 1;
            seqs.push(seq);
            ids.push(id);
            prevs.push(std::mem::replace(&mut prev, hash.to_vec()));
            hashes.push(hash.to_vec());
        }
        let sealed = ids.len() as i32;
        if sealed > 0 {
            client
                .update(
                    "INSERT INTO vetassist_auth.audit_seals (seq, audit_id, prev_hash, hash, key_id) \
                     SELECT s, a, p, h, $5 FROM unnest($1::bigint[], $2::bigint[], $3::bytea[], $4::bytea[]) AS t(s, a, p, h)",
                    None,
                    &[seqs.into(), ids.into(), prevs.into(), hashes.into(), (key.id as i32).into()],
                )
                .map_err(spi_failed)?;
        }
        if sealed < max_rows {
            // Everything visible is sealed: later rows can only come from transactions that
            // started after the horizon.
            client
                .update(
                    "INSERT INTO vetassist_auth.audit_seal_state (scan_from) VALUES ($1) \
                     ON CONFLICT (singleton) DO UPDATE SET scan_from = excluded.scan_from",
                    None,
                    &[horizon.into()],
                )
                .map_err(spi_failed)?;
        }
        Ok(sealed)
    })
    .or_raise()
}

const SEAL_LOCK_CLASS: i32 = 0x7661_6b32; // "vak2"

struct Verdict {
    ok: bool,
    checked: i64,
    first_bad_seq: Option<i64>,
    problem: Option<String>,
}

fn walk_chain() -> Outcome<Verdict> {
    Spi::connect_mut(|client| -> Outcome<Verdict> {
        client
            .update(
                "SELECT pg_catalog.set_config('TimeZone', 'UTC', true)",
                None,
                &[],
            )
            .map_err(spi_failed)?;
        let (start_seq, mut prev) = checkpoint(client)?;
        let mut expected = start_seq + 1;
        let mut checked = 0i64;
        let bad = |seq: i64, checked: i64, problem: String| Verdict {
            ok: false,
            checked,
            first_bad_seq: Some(seq),
            problem: Some(problem),
        };
        let mut cursor = client
            .open_cursor(
                "SELECT s.seq, s.audit_id, s.prev_hash, s.hash, s.key_id, pg_catalog.to_jsonb(a)::text \
                 FROM vetassist_auth.audit_seals s LEFT JOIN vetassist_auth.audit_log a ON a.id = s.audit_id \
                 ORDER BY s.seq",
                &[],
            );
        let mut keys_by_id: std::collections::HashMap<i32, std::rc::Rc<keys::DataKey>> =
            Default::default();
        loop {
            let batch = cursor.fetch(10_000).map_err(spi_failed)?;
            if batch.is_empty() {
                break;
            }
            for row in batch {
                let seq: i64 = row.get(1).map_err(spi_failed)?.unwrap_or_default();
                let audit_id: i64 = row.get(2).map_err(spi_failed)?.unwrap_or_default();
                let prev_hash: Vec<u8> = row.get(3).map_err(spi_failed)?.unwrap_or_default();
                let hash: Vec<u8> = row.get(4).map_err(spi_failed)?.unwrap_or_default();
                let key_id: i32 = row.get(5).map_err(spi_failed)?.unwrap_or_default();
                let text: Option<String> = row.get(6).map_err(spi_failed)?;
                if seq != expected {
                    return Ok(bad(
                        expected,
                        checked,
                        format!("seal {expected} is missing: the chain jumps to seal {seq}"),
                    ));
                }
                if prev_hash != prev {
                    return Ok(bad(seq, checked, format!("seal {seq} does not follow seal {} (seals inserted, deleted or reordered)", seq - 1)));
                }
                let Some(text) = text else {
                    return Ok(bad(
                        seq,
                        checked,
                        format!("audit row {audit_id} sealed at seq {seq} was deleted"),
                    ));
                };
                let key = match keys_by_id.get(&key_id) {
                    Some(key) => key.clone(),
                    None => {
                        let key = keys::key_by_id(key_id as u32)
                            .ok()
                            .filter(|k| k.purpose == Purpose::Audit)
                            .ok_or_else(|| {
                                Failure::new(
                                    Kind::DataCorrupted,
                                    format!(
                                        "vetassist_auth: seal {seq} names an unusable audit key"
                                    ),
                                )
                            })?;
                        keys_by_id.insert(key_id, key.clone());
                        key
                    }
                };
                if audit_chain::link(key.secret(), &prev, &text)[..] != hash[..] {
                    return Ok(bad(
                        seq,
                        checked,
                        format!("audit row {audit_id} (seq {seq}) was edited, or its seal altered"),
                    ));
                }
                prev = hash;
                expected += 1;
                checked += 1;
            }
        }
        // A row older than the seal horizon that is not in the chain was slipped in afterwards.
        let (stray, next_seq) = client
            .select(
                "SELECT a.id, (SELECT min(s.seq) FROM vetassist_auth.audit_seals s WHERE s.audit_id > a.id) \
                 FROM vetassist_auth.audit_log a \
                 WHERE a.occurred_at < coalesce((SELECT scan_from FROM vetassist_auth.audit_seal_state), '-infinity') \
                   AND NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_seals s WHERE s.audit_id = a.id) \
                 ORDER BY a.id LIMIT 1",
                None,
                &[],
            )
            .map_err(spi_failed)?
            .first()
            .get_two::<i64, i64>()
            .unwrap_or((None, None));
        if let Some(id) = stray {
            return Ok(Verdict {
                ok: false,
                checked,
                first_bad_seq: next_seq,
                problem: Some(format!("audit row {id} is older than the sealed part of the log but not in the chain (inserted afterwards)")),
            });
        }
        Ok(Verdict {
            ok: true,
            checked,
            first_bad_seq: None,
            problem: None,
        })
    })
}

/// Walks the whole chain: every seal follows the previous one and matches its row.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn verify_audit_chain() -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(checked, i64),
        name!(first_bad_seq, Option<i64>),
        name!(problem, Option<String>),
    ),
> {
    let v = walk_chain().or_raise();
    TableIterator::once((v.ok, v.checked, v.first_bad_seq, v.problem))
}

/// Removes sealed rows older than `older_than` from the start of the chain, keeps a checkpoint
/// (seq and hash of the last removed seal) so verification still works, and is audited.
/// Returns the number of audit rows removed.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn purge_audit_log(older_than: Interval) -> i64 {
    let negative = Spi::get_one_with_args::<bool>("SELECT $1 < interval '0'", &[older_than.into()])
        .ok()
        .flatten()
        .unwrap_or(true);
    if negative {
        Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: older_than must not be negative",
        )
        .raise();
    }
    Spi::connect_mut(|client| -> Outcome<i64> {
        client
            .update("SELECT pg_catalog.pg_advisory_xact_lock($1, 2)", None, &[SEAL_LOCK_CLASS.into()])
            .map_err(spi_failed)?;
        // The longest prefix of the chain whose rows are all older than the cut-off.
        let through: Option<i64> = client
            .select(
                "SELECT coalesce((SELECT min(s.seq) - 1 FROM vetassist_auth.audit_seals s \
                                  JOIN vetassist_auth.audit_log a ON a.id = s.audit_id \
                                  WHERE a.occurred_at >= pg_catalog.now() - $1), \
                                 (SELECT max(seq) FROM vetassist_auth.audit_seals))",
                None,
                &[older_than.into()],
            )
            .map_err(spi_failed)?
            .first()
            .get_one()
            .map_err(spi_failed)?;
        let (checkpoint_seq, _) = checkpoint(client)?;
        let Some(through) = through.filter(|&t| t > checkpoint_seq) else {
            return Ok(0);
        };
        PURGING.set(true);
        let removed: i64 = client
            .update(
                "WITH gone AS (DELETE FROM vetassist_auth.audit_log a USING vetassist_auth.audit_seals s \
                               WHERE s.audit_id = a.id AND s.seq <= $1 RETURNING 1) \
                 SELECT pg_catalog.count(*) FROM gone",
                None,
                &[through.into()],
            )
            .map_err(spi_failed)?
            .first()
            .get_one()
            .map_err(spi_failed)?
            .unwrap_or(0);
        client
            .update(
                "INSERT INTO vetassist_auth.audit_seal_state (checkpoint_seq, checkpoint_hash, checkpoint_at) \
                 SELECT s.seq, s.hash, pg_catalog.now() FROM vetassist_auth.audit_seals s WHERE s.seq = $1 \
                 ON CONFLICT (singleton) DO UPDATE SET checkpoint_seq = excluded.checkpoint_seq, \
                     checkpoint_hash = excluded.checkpoint_hash, checkpoint_at = excluded.checkpoint_at",
                None,
                &[through.into()],
            )
            .map_err(spi_failed)?;
        client
            .update("DELETE FROM vetassist_auth.audit_seals WHERE seq <= $1", None, &[through.into()])
            .map_err(spi_failed)?;
        PURGING.set(false);
        client
            .update(
                "SELECT vetassist_auth.write_audit('audit', 'audit_log_purged', 'success', NULL, 'audit_log', NULL, \
                        pg_catalog.jsonb_build_object('rows', $1, 'through_seq', $2))",
                None,
                &[removed.into(), through.into()],
            )
            .map_err(spi_failed)?;
        Ok(removed)
    })
    .or_raise()
}

// ---------------------------------------------------------------------------------------------
// Row audit: an AFTER ROW trigger written in Rust. It reads column values as text, logs only
// what changed, and never copies a redacted or bytea (ciphertext) value; their names may appear
// in changed_columns. Trigger arguments, set by enable_row_audit: `pk:<col>`, `redact:<col>`,
// `ignore:<col>` (an update touching only ignored columns is not logged), `subject:<col>`.

const ROW_AUDIT_INSERT: &str = "INSERT INTO vetassist_auth.audit_log \
    (actor_user_id, subject_user_id, session_id, category, event_type, outcome, target_table, target_id, \
     changed_columns, details, ip_hash) \
    VALUES ($1, $2, $3, 'data', $4, 'success', $5, $6, $7, $8::pg_catalog.jsonb, $9)";

thread_local! {
    static ROW_AUDIT_PLAN: RefCell<Option<pgrx::spi::OwnedPreparedStatement>> = const { RefCell::new(None) };
    /// Parsed trigger arguments and the audited table's name, per trigger.
    static ROW_AUDIT_TRIGGERS: RefCell<std::collections::HashMap<pg_sys::Oid, std::rc::Rc<RowAuditConfig>>> =
        RefCell::new(Default::default());
    /// Owner of audit_log: the trigger writes as this role, whoever changed the audited table.
    static AUDIT_OWNER: std::cell::Cell<pg_sys::Oid> = const { std::cell::Cell::new(pg_sys::InvalidOid) };
}

fn audit_owner() -> pg_sys::Oid {
    if AUDIT_OWNER.get() == pg_sys::InvalidOid {
        let owner = Spi::get_one::<pg_sys::Oid>(
            "SELECT relowner FROM pg_catalog.pg_class WHERE oid = 'vetassist_auth.audit_log'::pg_catalog.regclass",
        )
        .ok()
        .flatten()
        .unwrap_or(pg_sys::InvalidOid);
        AUDIT_OWNER.set(owner);
    }
    AUDIT_OWNER.get()
}

struct RowAuditConfig {
    table: String,
    pk: Vec<String>,
    redact: Vec<String>,
    ignore: Vec<String>,
    subject: Option<String>,
    skip_copy: bool,
}

impl RowAuditConfig {
    fn from_args(table: String, args: &[String]) -> Self {
        let pick = |prefix: &str| -> Vec<String> {
            args.iter()
                .filter_map(|a| a.strip_prefix(prefix))
                .map(str::to_owned)
                .collect()
        };
        RowAuditConfig {
            table,
            pk: pick("pk:"),
            redact: pick("redact:"),
            ignore: pick("ignore:"),
            subject: pick("subject:").pop(),
            skip_copy: args.iter().any(|a| a == "skip_copy"),
        }
    }
}

/// Column name, type and text value of every live column of a tuple.
unsafe fn columns(
    tuple: *mut pg_sys::HeapTupleData,
    desc: pg_sys::TupleDesc,
) -> Vec<(String, pg_sys::Oid, Option<String>)> {
    let natts = (*desc).natts as usize;
    let attrs = (*desc).attrs.as_slice(natts);
    let mut out = Vec::with_capacity(natts);
    for (i, attr) in attrs.iter().enumerate() {
        if attr.attisdropped {
            continue;
        }
        let name = CStr::from_ptr(attr.attname.data.as_ptr())
            .to_string_lossy()
            .into_owned();
        let value = pg_sys::SPI_getvalue(tuple, desc, (i + 1) as i32);
        let value =
            (!value.is_null()).then(|| CStr::from_ptr(value).to_string_lossy().into_owned());
        out.push((name, attr.atttypid, value));
    }
    out
}

fn statement_is_copy() -> bool {
    let statement = unsafe { pg_sys::debug_query_string };
    !statement.is_null()
        && unsafe { CStr::from_ptr(statement) }
            .to_bytes()
            .trim_ascii_start()
            .get(..4)
            .is_some_and(|w| w.eq_ignore_ascii_case(b"copy"))
}

#[pg_trigger]
fn row_audit<'a>(
    trigger: &'a PgTrigger<'a>,
) -> std::result::Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let data = trigger.trigger_data();
    let trigger_oid = unsafe { (*data.tg_trigger).tgoid };
    let config = match ROW_AUDIT_TRIGGERS.with_borrow(|cache| cache.get(&trigger_oid).cloned()) {
        Some(config) => config,
        None => {
            let table = format!("{}.{}", trigger.table_schema()?, trigger.table_name()?);
            let config = std::rc::Rc::new(RowAuditConfig::from_args(table, &trigger.extra_args()?));
            ROW_AUDIT_TRIGGERS.with_borrow_mut(|cache| cache.insert(trigger_oid, config.clone()));
            config
        }
    };
    // The extension's own tables are filled by COPY only when pg_restore brings back rows
    // whose audit trail is restored with them.
    if config.skip_copy && statement_is_copy() {
        return Ok(None);
    }
    let (op, old, new) = match trigger.op()? {
        PgTriggerOperation::Insert => ("insert", None, Some(data.tg_trigtuple)),
        PgTriggerOperation::Update => ("update", Some(data.tg_trigtuple), Some(data.tg_newtuple)),
        PgTriggerOperation::Delete => ("delete", Some(data.tg_trigtuple), None),
        PgTriggerOperation::Truncate => return Ok(None),
    };
    let desc = unsafe { (*data.tg_relation).rd_att };
    let old_cols = old.map(|t| unsafe { columns(t, desc) });
    let new_cols = new.map(|t| unsafe { columns(t, desc) });
    let hidden = |name: &str, typ: pg_sys::Oid| {
        typ == pg_sys::BYTEAOID || config.redact.iter().any(|r| r == name)
    };

    let mut changed = Vec::new();
    let (mut old_json, mut new_json) = (serde_json::Map::new(), serde_json::Map::new());
    let current = new_cols
        .as_ref()
        .or(old_cols.as_ref())
        .expect("a row trigger has a tuple");
    for (i, (name, typ, _)) in current.iter().enumerate() {
        let before = old_cols.as_ref().and_then(|c| c[i].2.clone());
        let after = new_cols.as_ref().and_then(|c| c[i].2.clone());
        let include = match op {
            "update" => before != after,
            "insert" => after.is_some(),
            _ => before.is_some(),
        };
        if !include {
            continue;
        }
        changed.push(name.clone());
        if hidden(name, *typ) {
            continue;
        }
        if old.is_some() {
            old_json.insert(
                name.clone(),
                before.map_or(serde_json::Value::Null, serde_json::Value::String),
            );
        }
        if new.is_some() {
            new_json.insert(
                name.clone(),
                after.map_or(serde_json::Value::Null, serde_json::Value::String),
            );
        }
    }
    if op == "update" && changed.iter().all(|c| config.ignore.contains(c)) {
        return Ok(None);
    }
    let value_of = |col: &str| {
        current
            .iter()
            .find(|(n, _, _)| n == col)
            .and_then(|(_, _, v)| v.clone())
    };
    let target_id = (!config.pk.is_empty()).then(|| {
        config
            .pk
            .iter()
            .map(|c| value_of(c).unwrap_or_default())
            .collect::<Vec<_>>()
            .join(",")
    });
    let subject = config
        .subject
        .as_deref()
        .and_then(value_of)
        .and_then(|v| uuid::Uuid::parse_str(&v).ok())
        .map(|u| Uuid::from_bytes(*u.as_bytes()));
    let mut details = serde_json::Map::new();
    if old.is_some() {
        details.insert("old".into(), old_json.into());
    }
    if new.is_some() {
        details.insert("new".into(), new_json.into());
    }
    let details = serde_json::Value::Object(details).to_string();
    let (actor, ip_hash, session) =
        ACTOR.with_borrow(|a| (a.user_id, a.ip_hash.clone(), a.session_id));

    // Write as the owner of audit_log, like a SECURITY DEFINER function but without its
    // per-call settings round trip; an error restores the caller's identity on abort.
    let (mut caller, mut context) = (pg_sys::InvalidOid, 0);
    unsafe {
        pg_sys::GetUserIdAndSecContext(&mut caller, &mut context);
        pg_sys::SetUserIdAndSecContext(
            audit_owner(),
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
    }
    let written = Spi::connect_mut(|client| -> std::result::Result<(), pgrx::spi::SpiError> {
        let plan = match ROW_AUDIT_PLAN.take() {
            Some(plan) => plan,
            None => {
                let types = [
                    pg_sys::UUIDOID,
                    pg_sys::UUIDOID,
                    pg_sys::UUIDOID,
                    pg_sys::TEXTOID,
                    pg_sys::TEXTOID,
                    pg_sys::TEXTOID,
                    pg_sys::TEXTARRAYOID,
                    pg_sys::TEXTOID,
                    pg_sys::BYTEAOID,
                ]
                .map(PgOid::from);
                client.prepare_mut(ROW_AUDIT_INSERT, &types)?.keep()
            }
        };
        let result = client.update(
            &plan,
            None,
            &[
                actor.into(),
                subject.into(),
                session.into(),
                op.into(),
                config.table.as_str().into(),
                target_id.into(),
                changed.into(),
                details.into(),
                ip_hash.into(),
            ],
        );
        ROW_AUDIT_PLAN.set(Some(plan));
        result.map(|_| ())
    });
    unsafe { pg_sys::SetUserIdAndSecContext(caller, context) };
    written
        .map_err(|e| {
            Failure::new(
                Kind::NotConfigured,
                format!("vetassist_auth: row audit failed: {e}"),
            )
        })
        .or_raise();
    Ok(None)
}
