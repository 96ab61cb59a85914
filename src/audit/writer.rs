//! The one way rows enter `audit_log`: a direct heap insert plus its index entries, as COPY
//! does it, instead of an INSERT statement through SPI. Executor start-up for a one-row
//! INSERT costs several times the insert itself, and an audit row is written for almost every
//! API call and every audited row change.
//!
//! The row is written as the table's owner would write it: no permission check, no INSERT
//! triggers (audit_log has none; its append-only triggers guard UPDATE, DELETE and TRUNCATE).
//! NOT NULL and CHECK constraints are still enforced.

use super::ACTOR;
use crate::counters::{self, Counter};
use crate::error::{Failure, Kind};
use pgrx::prelude::*;
use pgrx::Uuid;
use std::ffi::CStr;

/// An audit event; actor, session, client address, time, transaction and database role are
/// filled in when it is written.
pub struct AuditRow<'a> {
    pub category: &'a str,
    pub event_type: &'a str,
    pub outcome: &'a str,
    pub subject_user_id: Option<Uuid>,
    pub target_table: Option<&'a str>,
    pub target_id: Option<&'a str>,
    pub changed_columns: Option<&'a [&'a str]>,
    /// A jsonb datum (`{}` when None).
    pub details: Option<pg_sys::Datum>,
}

extern "C-unwind" {
    // commands/sequence.h; not in pgrx's bindings, with the same signature in 15 through 18.
    // Without the permission check: the caller (a trigger on an application table) need not
    // hold USAGE on the audit sequence.
    fn nextval_internal(relid: pg_sys::Oid, check_permissions: bool) -> i64;
}

fn relation_oid(name: &CStr) -> pg_sys::Oid {
    // SAFETY: catalog look-ups by NUL-terminated names, inside a transaction.
    let oid = unsafe {
        let schema = pg_sys::get_namespace_oid(c"vetassist_auth".as_ptr(), false);
        pg_sys::get_relname_relid(name.as_ptr(), schema)
    };
    if oid == pg_sys::InvalidOid {
        Failure::new(
            Kind::NotConfigured,
            "vetassist_auth: the audit log table is missing",
        )
        .raise();
    }
    oid
}

thread_local! {
    /// audit_log and its id sequence, looked up once per backend; forgotten when either one's
    /// relcache entry is invalidated (DROP EXTENSION, ALTER) so the next write looks again.
    static LOG_OIDS: std::cell::Cell<Option<(pg_sys::Oid, pg_sys::Oid)>> = const { std::cell::Cell::new(None) };
}

pub fn log_oids() -> (pg_sys::Oid, pg_sys::Oid) {
    LOG_OIDS.get().unwrap_or_else(|| {
        let oids = (
            relation_oid(c"audit_log"),
            relation_oid(c"audit_log_id_seq"),
        );
        LOG_OIDS.set(Some(oids));
        oids
    })
}

#[pg_guard]
unsafe extern "C-unwind" fn forget_log_oids(_arg: pg_sys::Datum, relid: pg_sys::Oid) {
    if let Some((table, sequence)) = LOG_OIDS.get() {
        if relid == pg_sys::InvalidOid || relid == table || relid == sequence {
            LOG_OIDS.set(None);
        }
    }
}

pub fn register_callbacks() {
    // SAFETY: called once per backend from _PG_init; the callback is a static function.
    unsafe { pg_sys::CacheRegisterRelcacheCallback(Some(forget_log_oids), pg_sys::Datum::from(0)) };
}

/// Who stands behind an audit row: the application user and session named in the caller's
/// transaction, the end user's client address (as its field hash) and the database role.
pub struct Who {
    pub actor: Option<Uuid>,
    pub session: Option<Uuid>,
    pub ip_hash: Option<Vec<u8>>,
    pub db_role: String,
}

impl Who {
    /// The current transaction's.
    pub fn current() -> Who {
        let (actor, session, ip_hash) =
            ACTOR.with_borrow(|a| (a.user_id, a.session_id, a.ip_hash.clone()));
        // SAFETY: the session user of a connected backend always has a name.
        let db_role =
            unsafe { CStr::from_ptr(pg_sys::GetUserNameFromId(pg_sys::GetSessionUserId(), false)) };
        Who {
            actor,
            session,
            ip_hash,
            db_role: db_role.to_string_lossy().into_owned(),
        }
    }
}

/// Appends one row to audit_log in the current transaction and returns its id.
pub fn append(row: &AuditRow<'_>) -> i64 {
    append_as(row, &Who::current(), None)
}

/// The next audit row id, for a row another process will write (the recorder).
pub fn next_id() -> i64 {
    // SAFETY: nextval on the audit sequence inside a transaction; an ERROR is re-thrown as one.
    unsafe { pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(log_oids().1, false)) }
}

/// Appends one row on behalf of `who` (the recorder writes rows of other backends), under `id`
/// when the caller took it already, and returns its id.
pub fn append_as(row: &AuditRow<'_>, who: &Who, id: Option<i64>) -> i64 {
    // On a subscriber the next audit id is the primary's too (docs/ARCHITECTURE.md, "Replicas
    // and failover").
    crate::replica::require_primary();
    if let Some(counter) = Counter::of_audit_row(row.category, row.event_type, row.outcome) {
        counters::count_at_commit(counter, 1);
    }
    let (table, sequence) = log_oids();
    // SAFETY: the table is opened and locked here and closed at the end; values and nulls
    // have one entry per attribute of its descriptor; every palloc'd object lives in the
    // current memory context, and the executor state is freed after the insert.
    unsafe {
        let rel = pg_sys::table_open(table, pg_sys::RowExclusiveLock as i32);
        // As the table's owner: its index expressions (hash_key_id) are executed with the
        // current user's EXECUTE privilege, and a row-audited table may belong to any role.
        // An ERROR before the switch back is undone by the (sub)transaction's abort.
        let (mut caller, mut context) = (pg_sys::InvalidOid, 0);
        pg_sys::GetUserIdAndSecContext(&mut caller, &mut context);
        pg_sys::SetUserIdAndSecContext(
            (*(*rel).rd_rel).relowner,
            context | pg_sys::SECURITY_LOCAL_USERID_CHANGE as i32,
        );
        let desc = (*rel).rd_att;
        let id = id.unwrap_or_else(|| {
            pg_sys::ffi::pg_guard_ffi_boundary(|| nextval_internal(sequence, false))
        });
        let details = row.details.unwrap_or_else(|| jsonb_details(None, None));

        let natts = (*desc).natts as usize;
        let mut values = vec![pg_sys::Datum::from(0); natts];
        let mut nulls = vec![true; natts];
        // PgTupleDesc reads the attributes wherever the version keeps them (18 moved them).
        for (i, attr) in pgrx::PgTupleDesc::from_pg_unchecked(desc)
            .iter()
            .enumerate()
        {
            if attr.attisdropped {
                continue;
            }
            let name = CStr::from_ptr(attr.attname.data.as_ptr()).to_bytes();
            let value = match name {
                b"id" => id.into_datum(),
                b"occurred_at" => Some(pg_sys::Datum::from(pg_sys::GetCurrentTimestamp())),
                b"xact_id" => Some(pg_sys::Datum::from(pg_sys::GetTopFullTransactionId().value)),
                b"db_role" => who.db_role.as_str().into_datum(),
                b"actor_user_id" => who.actor.into_datum(),
                b"subject_user_id" => row.subject_user_id.into_datum(),
                b"session_id" => who.session.into_datum(),
                b"category" => row.category.into_datum(),
                b"event_type" => row.event_type.into_datum(),
                b"outcome" => row.outcome.into_datum(),
                b"target_table" => row.target_table.into_datum(),
                b"target_id" => row.target_id.into_datum(),
                b"changed_columns" => row.changed_columns.map(<[&str]>::to_vec).into_datum(),
                b"details" => Some(details),
                b"ip_hash" => who.ip_hash.as_deref().into_datum(),
                // A column this version does not know: NULL, or its NOT NULL constraint says so.
                _ => None,
            };
            if let Some(value) = value {
                values[i] = value;
                nulls[i] = false;
            }
        }

        let estate = pg_sys::CreateExecutorState();
        let result_rel = pg_sys::palloc0(std::mem::size_of::<pg_sys::ResultRelInfo>())
            as *mut pg_sys::ResultRelInfo;
        // Range table index 0: not part of a query (constraint errors then show no values).
        pg_sys::InitResultRelInfo(result_rel, rel, 0, std::ptr::null_mut(), 0);
        pg_sys::ExecOpenIndices(result_rel, false);
        let tuple = pg_sys::heap_form_tuple(desc, values.as_mut_ptr(), nulls.as_mut_ptr());
        let slot = pg_sys::ExecInitExtraTupleSlot(estate, desc, &pg_sys::TTSOpsHeapTuple);
        pg_sys::ExecStoreHeapTuple(tuple, slot, false);
        if !(*desc).constr.is_null() {
            pg_sys::ExecConstraints(result_rel, slot, estate);
        }
        pg_sys::simple_heap_insert(rel, tuple);
        (*slot).tts_tid = (*tuple).t_self;
        insert_index_entries(result_rel, slot, estate);
        // Like the table, the indexes stay locked to the end of the transaction: the next
        // audit row in it then finds its locks already held.
        for i in 0..(*result_rel).ri_NumIndices as usize {
            let index = *(*result_rel).ri_IndexRelationDescs.add(i);
            finish_index_inserts(index, *(*result_rel).ri_IndexRelationInfo.add(i));
            pg_sys::index_close(index, pg_sys::NoLock as i32);
        }
        pg_sys::ExecResetTupleTable((*estate).es_tupleTable, false);
        pg_sys::FreeExecutorState(estate);
        pg_sys::SetUserIdAndSecContext(caller, context);
        pg_sys::table_close(rel, pg_sys::NoLock as i32);
        id
    }
}

/// Index entries for the tuple just inserted: not an update, no conflict handling.
#[cfg(feature = "pg15")]
unsafe fn insert_index_entries(
    result_rel: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
) {
    // SAFETY: the relation's indexes were opened by ExecOpenIndices on this result_rel, and
    // the slot holds the tuple just inserted with its tid set.
    unsafe {
        pg_sys::ExecInsertIndexTuples(
            result_rel,
            slot,
            estate,
            false,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
        );
    }
}

/// Index entries for the tuple just inserted; since 16 the call also asks whether only
/// summarizing indexes (BRIN) need it, which is for HOT updates: an insert needs every index.
#[cfg(any(feature = "pg16", feature = "pg17", feature = "pg18"))]
unsafe fn insert_index_entries(
    result_rel: *mut pg_sys::ResultRelInfo,
    slot: *mut pg_sys::TupleTableSlot,
    estate: *mut pg_sys::EState,
) {
    // SAFETY: as above.
    unsafe {
        pg_sys::ExecInsertIndexTuples(
            result_rel,
            slot,
            estate,
            false,
            false,
            std::ptr::null_mut(),
            std::ptr::null_mut(),
            false,
        );
    }
}

/// Before 17 an index keeps nothing between inserts.
#[cfg(any(feature = "pg15", feature = "pg16"))]
unsafe fn finish_index_inserts(_index: pg_sys::Relation, _info: *mut pg_sys::IndexInfo) {}

/// Since 17 an index may keep state between the inserts of one statement (BRIN keeps its
/// revmap pages pinned), released here as ExecCloseIndices would release it.
#[cfg(any(feature = "pg17", feature = "pg18"))]
unsafe fn finish_index_inserts(index: pg_sys::Relation, info: *mut pg_sys::IndexInfo) {
    // SAFETY: `index` and `info` are an index and its IndexInfo opened by ExecOpenIndices,
    // after the last insert into it; the index is still open.
    unsafe { pg_sys::index_insert_cleanup(index, info) };
}

/// `{"old": {...}, "new": {...}}` (either part may be absent) as a jsonb datum, built directly
/// rather than printed and parsed again. Values are column texts; None is JSON null.
pub fn jsonb_details(
    old: Option<&[(&CStr, Option<&CStr>)]>,
    new: Option<&[(&CStr, Option<&CStr>)]>,
) -> pg_sys::Datum {
    unsafe fn string(bytes: &[u8]) -> pg_sys::JsonbValue {
        let mut value: pg_sys::JsonbValue = std::mem::zeroed();
        value.type_ = pg_sys::jbvType::jbvString;
        value.val.string.len = bytes.len() as i32;
        value.val.string.val = bytes.as_ptr() as *mut std::ffi::c_char;
        value
    }
    use pg_sys::JsonbIteratorToken::*;
    // SAFETY: a JSONB parse state built with Postgres' own push API, from values whose strings
    // outlive it (borrowed from the caller until JsonbValueToJsonb copies them).
    unsafe {
        let mut state: *mut pg_sys::JsonbParseState = std::ptr::null_mut();
        pg_sys::pushJsonbValue(&mut state, WJB_BEGIN_OBJECT, std::ptr::null_mut());
        for (section, columns) in [("old", old), ("new", new)] {
            let Some(columns) = columns else { continue };
            pg_sys::pushJsonbValue(&mut state, WJB_KEY, &mut string(section.as_bytes()));
            pg_sys::pushJsonbValue(&mut state, WJB_BEGIN_OBJECT, std::ptr::null_mut());
            for (name, value) in columns {
                pg_sys::pushJsonbValue(&mut state, WJB_KEY, &mut string(name.to_bytes()));
                let mut value = match value {
                    Some(text) => string(text.to_bytes()),
                    None => {
                        let mut null: pg_sys::JsonbValue = std::mem::zeroed();
                        null.type_ = pg_sys::jbvType::jbvNull;
                        null
                    }
                };
                pg_sys::pushJsonbValue(&mut state, WJB_VALUE, &mut value);
            }
            pg_sys::pushJsonbValue(&mut state, WJB_END_OBJECT, std::ptr::null_mut());
        }
        let root = pg_sys::pushJsonbValue(&mut state, WJB_END_OBJECT, std::ptr::null_mut());
        pg_sys::Datum::from(pg_sys::JsonbValueToJsonb(root))
    }
}

/// A jsonb argument handed on as the datum it is, without pgrx's print-and-parse round trip
/// through serde (write_audit is called by nearly every API function).
pub struct JsonbDatum(pg_sys::Datum);

impl JsonbDatum {
    pub fn datum(&self) -> pg_sys::Datum {
        self.0
    }
}

impl pgrx::FromDatum for JsonbDatum {
    unsafe fn from_polymorphic_datum(
        datum: pg_sys::Datum,
        is_null: bool,
        _: pg_sys::Oid,
    ) -> Option<Self> {
        // Detoasted: the value is stored inline in the audit row.
        (!is_null).then(|| {
            JsonbDatum(pg_sys::Datum::from(pg_sys::pg_detoast_datum_packed(
                datum.cast_mut_ptr(),
            )))
        })
    }
}

unsafe impl<'fcx> pgrx::callconv::ArgAbi<'fcx> for JsonbDatum {
    unsafe fn unbox_arg_unchecked(arg: pgrx::callconv::Arg<'_, 'fcx>) -> Self {
        let index = arg.index();
        arg.unbox_arg_using_from_datum()
            .unwrap_or_else(|| panic!("argument {index} must not be null"))
    }
}

unsafe impl pgrx::pgrx_sql_entity_graph::metadata::SqlTranslatable for JsonbDatum {
    const TYPE_IDENT: &'static str = pgrx::pgrx_resolved_type!(JsonbDatum);
    const TYPE_ORIGIN: pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin =
        pgrx::pgrx_sql_entity_graph::metadata::TypeOrigin::External;
    const ARGUMENT_SQL: Result<
        pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef,
        pgrx::pgrx_sql_entity_graph::metadata::ArgumentError,
    > = Ok(pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal("jsonb"));
    const RETURN_SQL: Result<
        pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef,
        pgrx::pgrx_sql_entity_graph::metadata::ReturnsError,
    > = Ok(pgrx::pgrx_sql_entity_graph::metadata::ReturnsRef::One(
        pgrx::pgrx_sql_entity_graph::metadata::SqlMappingRef::literal("jsonb"),
    ));
}

const OUTCOMES: [&str; 4] = ["success", "failure", "denied", "info"];

/// Raises 22023 unless `outcome` is one of the four the audit log knows.
pub fn check_outcome(outcome: &str) {
    if !OUTCOMES.contains(&outcome) {
        Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: outcome must be success, failure, denied or info",
        )
        .raise();
    }
}

/// Writes one audit row; the API functions (running as the extension owner) call it.
/// Internal: not granted to any role.
#[pg_extern]
fn write_audit(
    category: Option<&str>,
    event_type: Option<&str>,
    outcome: Option<&str>,
    subject_user_id: default!(Option<Uuid>, "NULL"),
    target_table: default!(Option<&str>, "NULL"),
    target_id: default!(Option<&str>, "NULL"),
    details: default!(Option<JsonbDatum>, "'{}'"),
) -> i64 {
    crate::citus::require_coordinator();
    let (Some(category), Some(event_type), Some(outcome)) = (category, event_type, outcome) else {
        Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: category, event_type and outcome must not be NULL",
        )
        .raise();
    };
    check_outcome(outcome);
    append(&AuditRow {
        category,
        event_type,
        outcome,
        subject_user_id,
        target_table,
        target_id,
        changed_columns: None,
        details: details.map(|d| d.0),
    })
}
