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
    let details = pgrx::JsonB(serde_json::Value::Object(details)).into_datum();
    writer::append(&AuditRow {
        category: "data",
        event_type: op,
        outcome: "success",
        subject_user_id: subject,
        target_table: Some(&config.table),
        target_id: target_id.as_deref(),
        changed_columns: Some(changed),
        details,
    });
    Ok(None)
}
