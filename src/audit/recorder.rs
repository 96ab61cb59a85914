//! Audit rows that outlive the caller's transaction (docs/ARCHITECTURE.md, "Records that survive
//! a rollback"): PHI and token disclosures and failed authentications, committed by the outbox's
//! recorder before the caller goes on and returns what it discloses.

use super::writer::{self, AuditRow, Who};
use crate::error::{Failure, Kind, OrRaise, Result};
use crate::outbox::{self, Job, Reader, Writer};
use pgrx::prelude::*;
use pgrx::Uuid;

/// Registers the job that writes an audit row; called from `_PG_init`.
pub fn register() {
    outbox::register(Job::AuditRow, write_encoded);
}

/// Writes an audit row that the caller's rollback cannot take back, and returns its id once it
/// is committed. Without the outbox (library not preloaded) it is written in the caller's
/// transaction instead.
pub fn record(row: &AuditRow<'_>) -> Result<i64> {
    record_as(row, &Who::current())
}

/// `record` on behalf of `who` rather than the transaction's actor and session.
pub fn record_as(row: &AuditRow<'_>, who: &Who) -> Result<i64> {
    // Before the job is queued: nothing is disclosed on a subscriber.
    crate::replica::require_primary();
    if !outbox::delegated(writer::log_oids().0) {
        return Ok(writer::append_as(row, who, None));
    }
    // The id is the caller's to return, so it is taken here, before the row is queued.
    let id = writer::next_id();
    let mut payload = Vec::new();
    encode(id, row, who, &mut payload)?;
    outbox::submit(Job::AuditRow, &payload)
        .map(|()| id)
        .map_err(|failure| {
            failure.unwrap_or_else(|| {
                Failure::new(
                    Kind::InsufficientResources,
                    "vetassist_auth: the audit row could not be recorded",
                )
                .with_hint("Nothing was disclosed. The server log names the cause.")
            })
        })
}

// ---------------------------------------------------------------------------------------------
// Encoding: a row and who stands behind it.

fn encode(id: i64, row: &AuditRow<'_>, who: &Who, out: &mut Vec<u8>) -> Result<()> {
    let mut w = Writer(std::mem::take(out));
    w.field(Some(&id.to_le_bytes()));
    w.field(Some(row.category.as_bytes()));
    w.field(Some(row.event_type.as_bytes()));
    w.field(Some(row.outcome.as_bytes()));
    w.field(
        row.subject_user_id
            .as_ref()
            .map(|u| u.as_bytes().as_slice()),
    );
    w.field(row.target_table.map(str::as_bytes));
    w.field(row.target_id.map(str::as_bytes));
    // SAFETY: details is a detoasted jsonb datum; VARSIZE_ANY covers its whole varlena.
    let details = row.details.map(|d| unsafe {
        let ptr = d.cast_mut_ptr::<pg_sys::varlena>();
        std::slice::from_raw_parts(ptr as *const u8, pgrx::varsize_any(ptr))
    });
    w.field(details);
    w.field(who.actor.as_ref().map(|u| u.as_bytes().as_slice()));
    w.field(who.session.as_ref().map(|u| u.as_bytes().as_slice()));
    w.field(who.ip_hash.as_deref());
    w.field(Some(who.db_role.as_bytes()));
    if w.0.len() >= outbox::PAYLOAD {
        return Err(Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: audit details are too large to record",
        ));
    }
    *out = w.0;
    Ok(())
}

/// Writes one encoded row in the current transaction.
fn write_encoded(payload: &[u8]) {
    let mut r = Reader(payload);
    let id = r
        .field()
        .map(|b| i64::from_le_bytes(b.try_into().expect("8 bytes")));
    let category = r.text().unwrap_or_default();
    let event_type = r.text().unwrap_or_default();
    let outcome = r.text().unwrap_or_default();
    let subject_user_id = r.uuid();
    let target_table = r.text();
    let target_id = r.text();
    // SAFETY: a palloc'd copy of the jsonb varlena the caller encoded; it lives to the end of
    // the transaction's memory context, past the insert.
    let details = r.field().map(|bytes| unsafe {
        let copy = pg_sys::palloc(bytes.len()) as *mut u8;
        std::ptr::copy_nonoverlapping(bytes.as_ptr(), copy, bytes.len());
        pg_sys::Datum::from(copy)
    });
    let who = Who {
        actor: r.uuid(),
        session: r.uuid(),
        ip_hash: r.field().map(<[u8]>::to_vec),
        db_role: r.text().unwrap_or_default().to_owned(),
    };
    let row = AuditRow {
        category,
        event_type,
        outcome,
        subject_user_id,
        target_table,
        target_id,
        changed_columns: None,
        details,
    };
    writer::append_as(&row, &who, id);
}

/// The check of releases before 0.2.0, whose verify_installation calls it until ALTER EXTENSION
/// UPDATE: NULL when the rows survive a rollback, else why not. Not in the current SQL.
#[pg_extern(sql = false)]
fn durable_audit_problem() -> Option<&'static str> {
    durable_audit_state()
        .find(|(ok, _)| !ok)
        .map(|(_, detail)| detail)
}

/// Whether audit rows of disclosures and failed authentications survive the caller's rollback
/// and can be recorded at all, for verify_installation: `ok` false when not; `detail` says how
/// they are recorded, or why not. Internal.
#[pg_extern]
fn durable_audit_state() -> TableIterator<'static, (name!(ok, bool), name!(detail, &'static str))> {
    let state = if !outbox::in_force() {
        (
            false,
            "vetassist_auth is not in shared_preload_libraries: disclosure and failed-authentication \
             audit rows are written in the caller's transaction and a ROLLBACK removes them",
        )
    } else if !outbox::reserved_here() {
        (
            true,
            "recorded by an audit recorder started on demand, committed before the caller goes on; \
             no recorder is reserved for this database, so it competes with parallel query for \
             max_worker_processes (name the database in vetassist_auth.databases)",
        )
    } else if outbox::reserved_recorder_ran() {
        (
            true,
            "recorded by this database's reserved recorder, committed before the caller goes on",
        )
    } else {
        (
            false,
            "this database's reserved recorder is not running: max_worker_processes is too small \
             for the background workers of shared_preload_libraries (the server log says \"too \
             many background workers\"), so disclosures fail with 53000 when no slot is free",
        )
    };
    TableIterator::once(state)
}

/// Whether audit rows written durably outlive the caller's rollback (the library is preloaded).
/// Internal.
#[pg_extern(stable)]
fn durable_audit_in_force() -> bool {
    outbox::in_force()
}

/// Like write_audit, but the row survives whatever becomes of the caller's transaction: it is
/// committed by the recorder before this returns its id. For PHI and token disclosures and
/// failed authentications. Internal: not granted to any role.
#[pg_extern]
fn write_audit_durably(
    category: &str,
    event_type: &str,
    outcome: &str,
    subject_user_id: default!(Option<Uuid>, "NULL"),
    target_table: default!(Option<&str>, "NULL"),
    target_id: default!(Option<&str>, "NULL"),
    details: default!(Option<writer::JsonbDatum>, "'{}'"),
) -> i64 {
    crate::citus::require_coordinator();
    writer::check_outcome(outcome);
    let row = AuditRow {
        category,
        event_type,
        outcome,
        subject_user_id,
        target_table,
        target_id,
        changed_columns: None,
        details: details.map(|d| d.datum()),
    };
    record(&row).or_raise()
}

/// write_audit_durably for an access by a veteran in one of their sessions, whoever the
/// transaction's actor is (my_disclosures): actor and subject are `user_id`. Internal.
#[pg_extern]
fn write_audit_durably_by_subject(
    user_id: Uuid,
    session_id: Uuid,
    event_type: &str,
    details: default!(Option<writer::JsonbDatum>, "'{}'"),
) -> i64 {
    crate::citus::require_coordinator();
    let row = AuditRow {
        category: "audit",
        event_type,
        outcome: "success",
        subject_user_id: Some(user_id),
        target_table: None,
        target_id: None,
        changed_columns: None,
        details: details.map(|d| d.datum()),
    };
    let who = Who {
        actor: Some(user_id),
        session: Some(session_id),
        ..Who::current()
    };
    record_as(&row, &who).or_raise()
}
