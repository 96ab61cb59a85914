//! Sealing: finished transactions' audit rows linked into the chain, oldest id first.

use super::*;

/// Seals finished transactions' audit rows into the chain, oldest id first, at most
/// `max_rows` per call; returns how many. Writers never wait: rows of transactions still
/// running are invisible here and are sealed by a later call. Only one sealer runs at a time;
/// a concurrent call returns 0 at once.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn seal_audit_log(max_rows: default!(i32, 10000)) -> i32 {
    // The primary's seals arrive on a subscriber; one of its own would collide with them.
    crate::replica::require_primary();
    if max_rows < 1 {
        Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: max_rows must be a positive integer",
        )
        .raise();
    }
    if !lock_audit_chain(false) {
        // Never silent: a call that seals nothing because another one runs must not look idle.
        let holder = chain_holder_note();
        pgrx::warning!(
            "vetassist_auth: another transaction{holder} is sealing or purging the audit log; this call sealed nothing"
        );
        return 0;
    }
    // An empty log needs no seal: a fresh install writes nothing (no audit key, no sealer
    // state), so the sweeper of a node about to subscribe to a primary leaves its tables empty
    // for the initial copy (docs/ARCHITECTURE.md, "Replicas and failover").
    let empty = Spi::get_one::<bool>("SELECT NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_log)")
        .ok()
        .flatten()
        .unwrap_or(false);
    if empty {
        return 0;
    }
    let key = keys::key_for_writing(Purpose::Audit).or_raise();
    Spi::connect_mut(|client| -> Outcome<i32> {
        client.update(ROW_TEXT_SETTINGS, None, &[]).map_err(spi_failed)?;
        // The cost of a call must not depend on statistics (a backlog that autovacuum has not
        // analyzed yet looks tiny): index scans and per-row probes only, whatever the estimates.
        client
            .update(
                "SELECT pg_catalog.set_config(name, 'off', true) FROM pg_catalog.unnest(\
                 ARRAY['enable_seqscan', 'enable_hashjoin', 'enable_mergejoin']) AS name",
                None,
                &[],
            )
            .map_err(spi_failed)?;
        // SAFETY: drops this transaction's cached copy of the backend status table, so the
        // horizon below is read from every backend's current state.
        unsafe { pg_sys::pgstat_clear_snapshot() };
        // Rows of transactions that have not finished yet were inserted at or after this moment.
        // Only this database's transactions can insert here: one left open in another database
        // must not hold the scan start back (a seal of 1,000 rows then reread the whole backlog).
        // NULL when a running transaction's start is unknown: a prepared one (pg_prepared_xacts
        // gives only when it was prepared) or one in a session with track_activities off. The
        // scan then keeps starting where it did (slower, never passing a row by).
        let horizon: Option<TimestampWithTimeZone> = select_one(
            client,
            "SELECT CASE WHEN EXISTS (SELECT 1 FROM pg_catalog.pg_prepared_xacts \
                                      WHERE database = pg_catalog.current_database()) \
                           OR EXISTS (SELECT 1 FROM pg_catalog.pg_stat_activity \
                                      WHERE backend_xid IS NOT NULL AND xact_start IS NULL \
                                        AND datname = pg_catalog.current_database() \
                                        AND pid <> pg_catalog.pg_backend_pid()) THEN NULL \
                         ELSE least((SELECT min(xact_start) FROM pg_catalog.pg_stat_activity \
                                     WHERE xact_start IS NOT NULL AND datname = pg_catalog.current_database() \
                                       AND pid <> pg_catalog.pg_backend_pid()), \
                                    pg_catalog.statement_timestamp()) - interval '1 second' END",
            &[],
        )?;
        let (mut seq, mut prev) = chain_head(client)?;
        // Before 0.1.2 the state had no sealed_through_id: every row then comes from the time
        // range alone, as that release did, until ALTER EXTENSION UPDATE.
        let current_schema = pg::schema_has_column("audit_seal_state", "sealed_through_id");
        let (scan_from, sealed_through) = seal_state(client, current_schema)?;
        // Two cheap sources, so a call costs the same however long the sealed log is: rows
        // above the highest sealed id (never sealed: an id range of max_rows from the first
        // such row, bounded whatever plan is chosen), and rows at or below it that committed
        // late, which all began after the horizon of an earlier call (the tail of the BRIN
        // index: rows of the last second or so, read a block range at a time).
        let rows = client
            .select(
                "SELECT c.id, c.row_text FROM ( \
                     SELECT l.id, pg_catalog.to_jsonb(l)::text AS row_text FROM vetassist_auth.audit_log l \
                     WHERE $3 > 0 AND l.occurred_at >= $2 AND l.id + 0 <= $3 /* the time index, not the key */ \
                       AND NOT EXISTS (SELECT 1 FROM vetassist_auth.audit_seals s WHERE s.audit_id = l.id) \
                     UNION ALL \
                     SELECT l.id, pg_catalog.to_jsonb(l)::text FROM vetassist_auth.audit_log l, \
                         (SELECT pg_catalog.min(n.id) AS first FROM vetassist_auth.audit_log n WHERE n.id > $3) f \
                     WHERE l.id >= f.first AND l.id < f.first + $1) c \
                 ORDER BY c.id LIMIT $1",
                None,
                &[max_rows.into(), scan_from.into(), sealed_through.into()],
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
        let highest = ids.iter().copied().max().unwrap_or(0).max(sealed_through);
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
        // Every late row was taken unless the batch filled up with them alone.
        let late_rows_done = sealed < max_rows || highest > sealed_through;
        // On a snapshot older than this call (repeatable read, serializable), rows committed
        // since that snapshot are invisible here yet absent from the horizon: keep the scan
        // start where it is, and they are found by a later call.
        // SAFETY: reads the transaction's isolation level (IsolationUsesXactSnapshot()).
        let fresh_snapshot = unsafe { pg_sys::XactIsoLevel } < pg_sys::XACT_REPEATABLE_READ as i32;
        let scan_from = match horizon {
            Some(horizon) if late_rows_done && fresh_snapshot => horizon,
            _ => scan_from,
        };
        // Later rows of transactions still running at the horizon began after it, so every
        // row not sealed yet is above `highest` or at or after the new scan start.
        let save_state = if current_schema {
            "INSERT INTO vetassist_auth.audit_seal_state (scan_from, sealed_through_id) VALUES ($1, $2) \
             ON CONFLICT (singleton) DO UPDATE SET scan_from = excluded.scan_from, \
                 sealed_through_id = excluded.sealed_through_id"
        } else {
            "INSERT INTO vetassist_auth.audit_seal_state (scan_from) VALUES ($1) \
             ON CONFLICT (singleton) DO UPDATE SET scan_from = excluded.scan_from"
        };
        let state_args: &[pgrx::datum::DatumWithOid] = if current_schema {
            &[scan_from.into(), highest.into()]
        } else {
            &[scan_from.into()]
        };
        client
            .update(save_state, None, state_args)
            .map_err(spi_failed)?;
        Ok(sealed)
    })
    .or_raise()
}

/// Where the sealer's scan starts: rows at or after `scan_from` may be unsealed, and so may
/// every row above `sealed_through_id`.
fn seal_state(
    client: &pgrx::spi::SpiClient<'_>,
    current_schema: bool,
) -> Outcome<(TimestampWithTimeZone, i64)> {
    let query = if current_schema {
        "SELECT scan_from, sealed_through_id FROM vetassist_auth.audit_seal_state"
    } else {
        // Every row counts as at or below the highest sealed id: the time range alone decides.
        "SELECT scan_from, 9223372036854775807::bigint FROM vetassist_auth.audit_seal_state"
    };
    let state = client.select(query, None, &[]).map_err(spi_failed)?;
    let (scan_from, through) = match state.into_iter().next() {
        Some(row) => (
            row.get::<TimestampWithTimeZone>(1).map_err(spi_failed)?,
            row.get::<i64>(2).map_err(spi_failed)?,
        ),
        None => (None, None),
    };
    let no_row_yet = if current_schema { 0 } else { i64::MAX };
    Ok((
        scan_from.unwrap_or(TimestampWithTimeZone::negative_infinity()),
        through.unwrap_or(no_row_yet),
    ))
}

/// Where sealing stands, for administrators and auditors: the chain head, the committed rows
/// waiting above the highest sealed id, and the backend sealing or purging right now, if any.
// pgrx reads the column names from this signature, so it cannot hide behind a type alias.
#[allow(clippy::type_complexity)]
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn audit_seal_status() -> TableIterator<
    'static,
    (
        name!(head_seq, Option<i64>),
        name!(head_sealed_at, Option<TimestampWithTimeZone>),
        name!(sealed_through_id, Option<i64>),
        name!(waiting_rows, Option<i64>),
        name!(sealer_pid, Option<i32>),
    ),
> {
    let sealer_pid = audit_chain_holder();
    let status = Spi::connect(|client| -> Outcome<_> {
        let rows = client
            .select(
                "SELECT h.seq, h.sealed_at, st.sealed_through_id, \
                        (SELECT pg_catalog.count(*) FROM vetassist_auth.audit_log a \
                         WHERE a.id > coalesce(st.sealed_through_id, 0)) \
                 FROM (SELECT 1) one \
                 LEFT JOIN (SELECT seq, sealed_at FROM vetassist_auth.audit_seals ORDER BY seq DESC LIMIT 1) h ON true \
                 LEFT JOIN vetassist_auth.audit_seal_state st ON true",
                None,
                &[],
            )
            .map_err(spi_failed)?;
        let row = rows.first();
        Ok((
            row.get::<i64>(1).map_err(spi_failed)?,
            row.get::<TimestampWithTimeZone>(2).map_err(spi_failed)?,
            row.get::<i64>(3).map_err(spi_failed)?,
            row.get::<i64>(4).map_err(spi_failed)?,
        ))
    });
    let (head_seq, head_sealed_at, sealed_through_id, waiting_rows) = status.or_raise();
    TableIterator::once((
        head_seq,
        head_sealed_at,
        sealed_through_id,
        waiting_rows,
        sealer_pid,
    ))
}

// Who may call the functions above (any other function of the extension: no role,
// sql/grants.sql).
extension_sql!(
    r#"
GRANT EXECUTE ON FUNCTION vetassist_auth.seal_audit_log(integer) TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.audit_seal_status() TO vetassist_admin, vetassist_auditor;
"#,
    name = "seal_audit_log_grants",
    requires = [seal_audit_log, audit_seal_status],
);
