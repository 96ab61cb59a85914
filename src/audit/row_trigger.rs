//! Row audit: an AFTER ROW trigger written in Rust. It reads column values as text, logs only
//! what changed, and never copies a redacted or bytea (ciphertext) value; their names may appear
//! in changed_columns. Trigger arguments, set by enable_row_audit: `pk:<col>`, `redact:<col>`,
//! `ignore:<col>` (an update touching only ignored columns is not logged), `subject:<col>`.

use super::writer::{self, AuditRow};
use pgrx::prelude::*;
use pgrx::Uuid;
use std::cell::RefCell;
use std::ffi::CStr;

thread_local! {
    /// Parsed trigger arguments and the audited table's name, per trigger.
    static ROW_AUDIT_TRIGGERS: RefCell<std::collections::HashMap<pg_sys::Oid, std::rc::Rc<RowAuditConfig>>> =
        RefCell::new(Default::default());
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

extern "C-unwind" {
    // utils/datum.h; not in pgrx's bindings, with the same signature in 15 through 18.
    // Compares two non-null datums byte for byte.
    fn datumIsEqual(
        value1: pg_sys::Datum,
        value2: pg_sys::Datum,
        typ_by_val: bool,
        typ_len: i32,
    ) -> bool;
}

/// A column's value, as the type's output function prints it (in the trigger's memory context).
unsafe fn text_of(value: Option<pg_sys::Datum>, typ: pg_sys::Oid) -> Option<&'static CStr> {
    let value = value?;
    let (mut output, mut is_varlena) = (pg_sys::InvalidOid, false);
    pg_sys::getTypeOutputInfo(typ, &mut output, &mut is_varlena);
    Some(CStr::from_ptr(pg_sys::OidOutputFunctionCall(output, value)))
}

unsafe fn value_of(
    tuple: Option<*mut pg_sys::HeapTupleData>,
    attnum: i32,
    desc: pg_sys::TupleDesc,
) -> Option<pg_sys::Datum> {
    let tuple = tuple?;
    let mut is_null = false;
    let value = pg_sys::heap_getattr(tuple, attnum, desc, &mut is_null);
    (!is_null).then_some(value)
}

/// Whether the client's query is `COPY <this table> FROM …` and nothing else (pg_restore sends
/// each COPY on its own, bringing back rows whose audit trail comes with them). Parsed, not
/// matched as text: `COPY (SELECT …) TO`, and any query string holding other statements too,
/// are not restores of this table.
fn restoring_into(schema: &str, table: &str) -> bool {
    // SAFETY: a global of this backend, read in the backend's only thread.
    let statement = unsafe { pg_sys::debug_query_string };
    if statement.is_null() {
        return false;
    }
    // SAFETY: non-null, and Postgres keeps the query string alive while it runs.
    let mentions_copy = unsafe { CStr::from_ptr(statement) }
        .to_bytes()
        .windows(4)
        .any(|w| w.eq_ignore_ascii_case(b"copy"));
    if !mentions_copy {
        return false;
    }
    PgTryBuilder::new(|| {
        // SAFETY: raw_parser reads the NUL-terminated query string of this backend and returns
        // a List of RawStmt allocated in the current (trigger) memory context; it is only read.
        unsafe {
            let statements = pg_sys::raw_parser(statement, pg_sys::RawParseMode::RAW_PARSE_DEFAULT);
            if statements.is_null() || (*statements).length != 1 {
                return false;
            }
            {
                let raw = (*(*statements).elements).ptr_value as *mut pg_sys::RawStmt;
                let node = (*raw).stmt;
                if (*node).type_ != pg_sys::NodeTag::T_CopyStmt {
                    return false;
                }
                let copy = node as *mut pg_sys::CopyStmt;
                let relation = (*copy).relation;
                (*copy).is_from
                    && !relation.is_null()
                    && CStr::from_ptr((*relation).relname).to_bytes() == table.as_bytes()
                    && ((*relation).schemaname.is_null()
                        || CStr::from_ptr((*relation).schemaname).to_bytes() == schema.as_bytes())
            }
        }
    })
    .catch_others(|_| false)
    .execute()
}

#[pg_trigger]
fn row_audit<'a>(
    trigger: &'a PgTrigger<'a>,
) -> std::result::Result<Option<PgHeapTuple<'a, AllocatedByPostgres>>, pgrx::PgTriggerError> {
    let data = trigger.trigger_data();
    // SAFETY: Postgres passes a valid Trigger for the duration of the trigger call.
    let trigger_oid = unsafe { (*data.tg_trigger).tgoid };
    let config = match ROW_AUDIT_TRIGGERS.with_borrow(|cache| cache.get(&trigger_oid).cloned()) {
        Some(config) => config,
        None => {
            // Quoted where needed, as regclass prints it: "a.b".c and a."b.c" stay apart.
            let (schema, name) = (
                std::ffi::CString::new(trigger.table_schema()?).unwrap_or_default(),
                std::ffi::CString::new(trigger.table_name()?).unwrap_or_default(),
            );
            // SAFETY: both are NUL-terminated; the result is a palloc'd C string.
            let table = unsafe {
                std::ffi::CStr::from_ptr(pg_sys::quote_qualified_identifier(
                    schema.as_ptr(),
                    name.as_ptr(),
                ))
            }
            .to_string_lossy()
            .into_owned();
            let config = std::rc::Rc::new(RowAuditConfig::from_args(table, &trigger.extra_args()?));
            ROW_AUDIT_TRIGGERS.with_borrow_mut(|cache| cache.insert(trigger_oid, config.clone()));
            config
        }
    };
    let op = trigger.op()?;
    // The extension's own tables are filled by COPY only when pg_restore brings back rows
    // whose audit trail is restored with them; so is an application's table when a superuser
    // copies into it (pg_restore --data-only; a superuser could disable the trigger anyway).
    // SAFETY: reads the current user's role attributes from the syscache.
    if (config.skip_copy || unsafe { pg_sys::superuser() })
        && matches!(op, PgTriggerOperation::Insert)
        && restoring_into(&trigger.table_schema()?, &trigger.table_name()?)
    {
        return Ok(None);
    }
    let (op, old, new) = match op {
        PgTriggerOperation::Insert => ("insert", None, Some(data.tg_trigtuple)),
        PgTriggerOperation::Update => ("update", Some(data.tg_trigtuple), Some(data.tg_newtuple)),
        PgTriggerOperation::Delete => ("delete", Some(data.tg_trigtuple), None),
        PgTriggerOperation::Truncate => return Ok(None),
    };
    // SAFETY: the trigger's relation is open for the duration of the trigger call.
    let desc = unsafe { (*data.tg_relation).rd_att };

    // Only columns whose bytes differ are printed: an UPDATE of one column of a wide row prints
    // two values, plus the key.
    let mut changed = Vec::new();
    let (mut old_values, mut new_values) = (Vec::new(), Vec::new());
    let (mut key_values, mut subject) = (vec![None; config.pk.len()], None);
    // SAFETY: the trigger's tuple descriptor lives as long as the trigger call.
    let attributes = unsafe { pgrx::PgTupleDesc::from_pg_unchecked(desc) };
    for (i, attr) in attributes.iter().enumerate() {
        if attr.attisdropped {
            continue;
        }
        let attnum = (i + 1) as i32;
        // SAFETY: attname is a NUL-terminated NameData inside the descriptor.
        let name = unsafe { CStr::from_ptr(attr.attname.data.as_ptr()) };
        let name_str = name.to_str().unwrap_or_default();
        // SAFETY: the tuples are the trigger's own, described by `desc`; attnum is in range.
        let (before, after) = unsafe { (value_of(old, attnum, desc), value_of(new, attnum, desc)) };
        let mut texts = None;
        let mut text = || {
            // SAFETY: the datums were just read from the tuples with this column's type.
            *texts.get_or_insert_with(|| unsafe {
                (
                    text_of(before, attr.atttypid),
                    text_of(after, attr.atttypid),
                )
            })
        };
        let included = match (before, after) {
            (Some(b), Some(a)) => {
                // SAFETY: two non-null datums of the same column, with its byval and length.
                !unsafe { datumIsEqual(b, a, attr.attbyval, attr.attlen as i32) } && {
                    let (b, a) = text();
                    b != a
                }
            }
            (None, None) => false,
            _ => true,
        };
        if let Some(slot) = config.pk.iter().position(|k| k == name_str) {
            let (b, a) = text();
            key_values[slot] = a.or(b).map(|t| t.to_string_lossy().into_owned());
        }
        // The subject column is a uuid (enable_row_audit only names uuid columns): read, not printed.
        if config.subject.as_deref() == Some(name_str) && attr.atttypid == pg_sys::UUIDOID {
            subject = after
                .or(before)
                // SAFETY: a non-null datum of a column whose type was checked to be uuid.
                .and_then(|d| unsafe { Uuid::from_datum(d, false) });
        }
        if !included {
            continue;
        }
        changed.push(name_str);
        if attr.atttypid == pg_sys::BYTEAOID || config.redact.iter().any(|r| r == name_str) {
            continue;
        }
        let (b, a) = text();
        if old.is_some() {
            old_values.push((name, b));
        }
        if new.is_some() {
            new_values.push((name, a));
        }
    }
    if op == "update" && changed.iter().all(|c| config.ignore.iter().any(|i| i == c)) {
        return Ok(None);
    }
    let target_id = (!config.pk.is_empty()).then(|| {
        key_values
            .into_iter()
            .map(Option::unwrap_or_default)
            .collect::<Vec<_>>()
            .join(",")
    });
    let details = writer::jsonb_details(
        old.is_some().then_some(&old_values[..]),
        new.is_some().then_some(&new_values[..]),
    );
    writer::append(&AuditRow {
        category: "data",
        event_type: op,
        outcome: "success",
        subject_user_id: subject,
        target_table: Some(&config.table),
        target_id: target_id.as_deref(),
        changed_columns: Some(&changed),
        details: Some(details),
    });
    Ok(None)
}
