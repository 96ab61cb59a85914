//! Tamper evidence (docs/ARCHITECTURE.md, "Audit chain"): sealing audit rows into an HMAC chain, verifying it, and
//! purging its oldest part behind a checkpoint.

use super::PURGING;
use crate::crypto::audit_chain;
use crate::error::{Failure, Kind, OrRaise};
use crate::gucs;
use crate::keys::{self, Purpose};
use crate::pg;
use crate::search_path;
use pgrx::prelude::*;

type Outcome<T> = crate::error::Result<T>;

fn spi_failed(e: pgrx::spi::SpiError) -> Failure {
    Failure::new(
        Kind::NotConfigured,
        format!("vetassist_auth: audit chain query failed: {e}"),
    )
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

struct Verdict {
    ok: bool,
    checked: i64,
    first_bad_seq: Option<i64>,
    problem: Option<String>,
}

/// The lowest-numbered bad seal found so far, and what is wrong with it.
#[derive(Default)]
struct FirstBad(Option<(i64, String)>);

impl FirstBad {
    fn note(&mut self, seq: i64, problem: impl FnOnce() -> String) {
        if self.0.as_ref().is_none_or(|(bad, _)| seq < *bad) {
            self.0 = Some((seq, problem()));
        }
    }
}

/// Whether a seal's hash is the HMAC of its predecessor's hash and its row's text. Internal:
/// called per row by verify_audit_chain, so the rows never leave the executor.
#[pg_extern(strict, stable)]
fn audit_seal_matches(key_id: i32, prev_hash: &[u8], row_text: &str, hash: &[u8]) -> bool {
    let key = keys::key_by_id(key_id as u32)
        .ok()
        .filter(|k| k.purpose == Purpose::Audit)
        .unwrap_or_else(|| {
            Failure::new(
                Kind::DataCorrupted,
                format!("vetassist_auth: a seal names audit key {key_id}, which is not usable"),
            )
            .raise()
        });
    audit_chain::link(key.secret(), prev_hash, row_text)[..] == *hash
}

/// Verification in two passes that need no sort: the links between seals, in seq order over the
/// narrow seal table; then every seal against its row, in audit_id order (a merge join of the two
/// primary keys). Each seal stores the hash it follows, so the rows need not be read in chain
/// order: the first bad seq is the lowest one either pass finds.
fn walk_chain() -> Outcome<Verdict> {
    Spi::connect_mut(|client| -> Outcome<Verdict> {
        // Local to this call (the function's SET clause undoes them): the row text is printed as
        // the sealer printed it, and the planner must not sort a million wide rows when two
        // index scans will do.
        client
            .update(ROW_TEXT_SETTINGS, None, &[])
            .map_err(spi_failed)?;
        client
            .update(
                "SELECT pg_catalog.set_config('enable_sort', 'off', true), \
                        pg_catalog.set_config('enable_hashjoin', 'off', true)",
                None,
                &[],
            )
            .map_err(spi_failed)?;
        let (start_seq, start_hash) = checkpoint(client)?;
        let mut first_bad = FirstBad::default();
        // A checkpoint stands in for the purged seals only together with the audit row of the
        // purge that left it (rows from before 0.1.2 name no hash).
        let recorded = start_seq == 0
            || select_one::<bool>(
                client,
                "SELECT EXISTS (SELECT 1 FROM vetassist_auth.audit_log a \
                   WHERE a.category = 'audit' AND a.event_type = 'audit_log_purged' \
                     AND (a.details ->> 'through_seq')::bigint = $1 \
                     AND coalesce(a.details ->> 'checkpoint_hash', pg_catalog.encode($2, 'hex')) = pg_catalog.encode($2, 'hex'))",
                &[start_seq.into(), start_hash.clone().into()],
            )?
            .unwrap_or(false);
        if !recorded {
            first_bad.note(start_seq + 1, || {
                format!("the purge checkpoint at seal {start_seq} is not recorded by a purge's audit row (forged or its record removed)")
            });
        }

        let link = client
            .select(
                "SELECT seq, prior_seq FROM ( \
                     SELECT seq, prev_hash, \
                            pg_catalog.lag(seq, 1, $1) OVER w AS prior_seq, \
                            pg_catalog.lag(hash, 1, $2) OVER w AS prior_hash \
                     FROM vetassist_auth.audit_seals WINDOW w AS (ORDER BY seq)) links \
                 WHERE seq <> prior_seq + 1 OR prev_hash <> prior_hash \
                 ORDER BY seq LIMIT 1",
                None,
                &[start_seq.into(), start_hash.into()],
            )
            .map_err(spi_failed)?
            .next()
            .map(|row| Ok::<_, pgrx::spi::SpiError>((row.get::<i64>(1)?, row.get::<i64>(2)?)))
            .transpose()
            .map_err(spi_failed)?;
        if let Some((Some(seq), Some(prior))) = link {
            if seq != prior + 1 {
                first_bad.note(prior + 1, || {
                    format!(
                        "seal {} is missing: the chain jumps to seal {seq}",
                        prior + 1
                    )
                });
            } else {
                first_bad.note(seq, || {
                    format!("seal {seq} does not follow seal {prior} (seals inserted, deleted or reordered)")
                });
            }
        }

        // Every seal against its row, in one aggregate: no row leaves the executor. Rows older
        // than the seal horizon that no seal covers were slipped in afterwards.
        let (sealed, deleted, edited, first_stray) = client
            .select(
                "SELECT pg_catalog.count(s.seq), \
                        min(s.seq) FILTER (WHERE a.id IS NULL), \
                        min(s.seq) FILTER (WHERE NOT vetassist_auth.audit_seal_matches( \
                            s.key_id, s.prev_hash, pg_catalog.to_jsonb(a)::text, s.hash)), \
                        min(a.id) FILTER (WHERE s.seq IS NULL) \
                 FROM vetassist_auth.audit_seals s \
                 FULL JOIN vetassist_auth.audit_log a ON a.id = s.audit_id \
                 WHERE s.seq IS NOT NULL \
                    OR (a.occurred_at < coalesce((SELECT scan_from FROM vetassist_auth.audit_seal_state), '-infinity') \
                        AND a.id <= coalesce((SELECT (pg_catalog.to_jsonb(st) ->> 'sealed_through_id')::bigint \
                                              FROM vetassist_auth.audit_seal_state st), 9223372036854775807))",
                None,
                &[],
            )
            .and_then(|table| {
                let row = table.first();
                Ok((row.get::<i64>(1)?, row.get::<i64>(2)?, row.get::<i64>(3)?, row.get::<i64>(4)?))
            })
            .map_err(spi_failed)?;
        let sealed = sealed.unwrap_or(0);
        let audit_id_of = |seq: i64| -> Outcome<i64> {
            Ok(select_one::<i64>(
                client,
                "SELECT audit_id FROM vetassist_auth.audit_seals WHERE seq = $1",
                &[seq.into()],
            )?
            .unwrap_or_default())
        };
        if let Some(seq) = deleted {
            let audit_id = audit_id_of(seq)?;
            first_bad.note(seq, || {
                format!("audit row {audit_id} sealed at seq {seq} was deleted")
            });
        }
        if let Some(seq) = edited {
            let audit_id = audit_id_of(seq)?;
            first_bad.note(seq, || {
                format!("audit row {audit_id} (seq {seq}) was edited, or its seal altered")
            });
        }

        if let Some((seq, problem)) = first_bad.0 {
            return Ok(Verdict {
                ok: false,
                checked: seq - start_seq - 1,
                first_bad_seq: Some(seq),
                problem: Some(problem),
            });
        }
        if let Some(id) = first_stray {
            let next_seq = select_one::<i64>(
                client,
                "SELECT min(seq) FROM vetassist_auth.audit_seals WHERE audit_id > $1",
                &[id.into()],
            )?;
            return Ok(Verdict {
                ok: false,
                checked: sealed,
                first_bad_seq: next_seq,
                problem: Some(format!("audit row {id} is older than the sealed part of the log but not in the chain (inserted afterwards)")),
            });
        }
        Ok(Verdict {
            ok: true,
            checked: sealed,
            first_bad_seq: None,
            problem: None,
        })
    })
}

/// Walks the whole chain: every seal follows the previous one and matches its row. On the
/// coordinator of a distributed installation, every worker's chain too (each verified on its
/// node); a bad one is named by its node, and `first_bad_seq` is that node's.
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
    let mut v = walk_chain().or_raise();
    with_worker_chains(&mut v).or_raise();
    TableIterator::once((v.ok, v.checked, v.first_bad_seq, v.problem))
}

/// Adds the workers' chains (`worker_audit_chains()`, empty on one node) to the coordinator's
/// verdict: counts add up, and the first bad chain (the coordinator's, then by node) speaks.
fn with_worker_chains(v: &mut Verdict) -> Outcome<()> {
    Spi::connect(|client| {
        let workers = client
            .select(
                "SELECT node, ok, checked, first_bad_seq, problem FROM vetassist_auth.worker_audit_chains()",
                None,
                &[],
            )
            .map_err(spi_failed)?;
        for row in workers {
            let node = row
                .get::<String>(1)
                .map_err(spi_failed)?
                .unwrap_or_default();
            let ok = row.get::<bool>(2).map_err(spi_failed)?.unwrap_or(false);
            v.checked += row.get::<i64>(3).map_err(spi_failed)?.unwrap_or(0);
            if !ok && v.ok {
                v.ok = false;
                v.first_bad_seq = row.get::<i64>(4).map_err(spi_failed)?;
                let problem = row
                    .get::<String>(5)
                    .map_err(spi_failed)?
                    .unwrap_or_default();
                v.problem = Some(format!("node {node}: {problem}"));
            }
        }
        Ok(())
    })
}

/// The chain checked against an anchor kept outside the database (audit_chain_head() or the
/// worker's log line, saved earlier): not ok when the chain no longer holds that seal with that
/// hash, because it was cut short or rewritten; an anchor a purge went past cannot be checked
/// any more (a purge's record can be forged with it) and is reported so.
#[pg_extern(security_definer, name = "verify_audit_chain")]
#[search_path(pg_catalog, pg_temp)]
fn verify_audit_chain_against(
    anchor_seq: Option<i64>,
    anchor_hash: Option<&[u8]>,
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(checked, i64),
        name!(first_bad_seq, Option<i64>),
        name!(problem, Option<String>),
    ),
> {
    let v = against_anchor(anchor_seq, anchor_hash, None);
    TableIterator::once((v.ok, v.checked, v.first_bad_seq, v.problem))
}

/// As verify_audit_chain(seq, hash), with the WAL position the worker's log line gives with the
/// anchor (`timeline=T lsn=X/Y`): a chain that ends before the anchor because the database was
/// recovered to an earlier point (point-in-time recovery, a promoted standby) is reported as
/// that recovery, not as seals removed from its end. Still not ok: the anchor is not in the chain.
#[pg_extern(security_definer, name = "verify_audit_chain")]
#[search_path(pg_catalog, pg_temp)]
fn verify_audit_chain_at_position(
    anchor_seq: Option<i64>,
    anchor_hash: Option<&[u8]>,
    anchor_timeline: Option<i32>,
    anchor_lsn: Option<&str>,
) -> TableIterator<
    'static,
    (
        name!(ok, bool),
        name!(checked, i64),
        name!(first_bad_seq, Option<i64>),
        name!(problem, Option<String>),
    ),
> {
    let position = match (anchor_timeline, anchor_lsn.map(parse_lsn)) {
        (Some(timeline), Some(Some(lsn))) if timeline > 0 => (timeline as u32, lsn),
        _ => Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: an anchor's position is a timeline and an LSN (X/Y)",
        )
        .with_hint("Take them from the worker's log line: timeline=T lsn=X/Y.")
        .raise(),
    };
    let v = against_anchor(anchor_seq, anchor_hash, Some(position));
    TableIterator::once((v.ok, v.checked, v.first_bad_seq, v.problem))
}

fn against_anchor(
    anchor_seq: Option<i64>,
    anchor_hash: Option<&[u8]>,
    position: Option<(u32, u64)>,
) -> Verdict {
    let (Some(anchor_seq), Some(anchor_hash)) = (anchor_seq.filter(|seq| *seq > 0), anchor_hash)
    else {
        Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: an anchor is a positive seq and its hash",
        )
        .with_hint("Take one from audit_chain_head() or the worker's log line.")
        .raise();
    };
    let mut v = walk_chain().or_raise();
    if let Some(mut problem) = anchor_problem(anchor_seq, anchor_hash).or_raise() {
        // After a recovery the sealer goes on from the recovered head: the anchor's seq may
        // be sealed again, with another hash.
        if problem == CHAIN_ENDS_BEFORE_ANCHOR || problem == ANCHOR_SEAL_REWRITTEN {
            if let Some(recovery) = position.and_then(|(tli, lsn)| recovered_before(tli, lsn)) {
                problem = recovery;
            }
        }
        if v.first_bad_seq.is_none_or(|bad| anchor_seq < bad) {
            v.first_bad_seq = Some(anchor_seq);
            v.problem = Some(problem);
        }
        v.ok = false;
    }
    v
}

const ANCHOR_SEAL_REWRITTEN: &str =
    "the seal at the anchor's seq has another hash: the chain was rewritten";
const CHAIN_ENDS_BEFORE_ANCHOR: &str =
    "the chain ends before the anchor's seq: seals were removed from its end";

/// `X/Y` (two 32-bit hexadecimal halves, as Postgres prints an LSN).
fn parse_lsn(text: &str) -> Option<u64> {
    let half = |digits: &str| {
        let hex = !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_hexdigit());
        hex.then(|| u32::from_str_radix(digits, 16).ok()).flatten()
    };
    let (high, low) = text.trim().split_once('/')?;
    Some((u64::from(half(high)?) << 32) | u64::from(half(low)?))
}

fn format_lsn(lsn: u64) -> String {
    format!("{:X}/{:X}", lsn >> 32, lsn & 0xFFFF_FFFF)
}

/// Why an anchor logged at `lsn` on timeline `tli` is not in this history, when that is a
/// recovery: this server's timeline history (pg_wal/<timeline>.history, written by every
/// recovery that ends on a new timeline) says it left `tli` at a point before `lsn`.
fn recovered_before(tli: u32, lsn: u64) -> Option<String> {
    // SAFETY: reads the shared timeline of WAL insertion; no lock is needed for a read.
    let current = unsafe { pg_sys::GetWALInsertionTimeLine() };
    if tli >= current {
        return None;
    }
    // A backend's working directory is the data directory.
    let history = std::fs::read_to_string(format!("pg_wal/{current:08X}.history")).ok()?;
    let (left_at, reason) = history.lines().find_map(|line| {
        let mut fields = line.splitn(3, '\t');
        let parent: u32 = fields.next()?.trim().parse().ok()?;
        let switch = parse_lsn(fields.next()?)?;
        (parent == tli).then(|| (switch, fields.next().unwrap_or("").trim().to_owned()))
    })?;
    (lsn > left_at).then(|| {
        format!(
            "the database was recovered to before this anchor: this server's timeline history \
             says it left timeline {tli} at {} ({reason}), before the anchor's position {}, so the \
             seals after that point are missing with the recovery; a superuser can write that \
             history file too: check it against the archived WAL and the record of the recovery",
            format_lsn(left_at),
            format_lsn(lsn)
        )
    })
}

fn anchor_problem(anchor_seq: i64, anchor_hash: &[u8]) -> Outcome<Option<String>> {
    Spi::connect(|client| {
        let (checkpoint_seq, checkpoint_hash) = checkpoint(client)?;
        let sealed = select_one::<Vec<u8>>(
            client,
            "SELECT (SELECT hash FROM vetassist_auth.audit_seals WHERE seq = $1)",
            &[anchor_seq.into()],
        )?;
        let problem = match sealed {
            Some(hash) if hash == anchor_hash => None,
            Some(_) => Some(ANCHOR_SEAL_REWRITTEN),
            None if anchor_seq == checkpoint_seq && checkpoint_hash == anchor_hash => None,
            None if anchor_seq == checkpoint_seq => {
                Some("the purge checkpoint at the anchor's seq has another hash: the chain was rewritten")
            }
            // Its seal is gone and its hash cannot be checked: whoever can forge a purge can
            // forge its record too. Anchors younger than audit_min_retention are never purged.
            None if anchor_seq < checkpoint_seq => {
                Some("the anchor's seal was purged (the chain now starts after it): its hash cannot be checked; use a newer anchor")
            }
            None => Some(CHAIN_ENDS_BEFORE_ANCHOR),
        };
        Ok(problem.map(str::to_owned))
    })
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

/// Removes sealed rows older than `older_than` from the start of the chain, keeps a checkpoint
/// (seq and hash of the last removed seal) so verification still works, and is audited.
/// Returns the number of audit rows removed.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn purge_audit_log(older_than: Interval) -> i64 {
    // Compared as the cut-off times they give (an interval compares months as 30 days, the
    // calendar does not: '-6000 months 182190 days' is "longer" than 6 years yet in the future).
    let negative = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.now() - $1 > pg_catalog.now()",
        &[older_than.into()],
    )
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
    let too_young = Spi::get_one_with_args::<bool>(
        "SELECT pg_catalog.now() - $1 > pg_catalog.now() - pg_catalog.make_interval(secs => $2)",
        &[older_than.into(), gucs::AUDIT_MIN_RETENTION.get().into()],
    )
    .ok()
    .flatten()
    .unwrap_or(true);
    if too_young {
        Failure::new(
            Kind::InvalidArgument,
            "vetassist_auth: older_than is shorter than the minimum audit retention",
        )
        .with_hint("vetassist_auth.audit_min_retention (6 years by default, HIPAA 164.316(b)(2)) is set by a superuser.")
        .raise();
    }
    let removed = Spi::connect_mut(|client| -> Outcome<i64> {
        if !lock_audit_chain(false) {
            let holder = chain_holder_note();
            pgrx::warning!("vetassist_auth: waiting for another transaction{holder} that is sealing or purging the audit log");
            lock_audit_chain(true);
        }
        // The longest prefix of the chain whose rows are all older than the cut-off: the seals
        // walked in seq order up to the first row at or after it, so a call costs the prefix it
        // removes (one row when there is nothing to purge), not the whole log.
        let through: Option<i64> = select_one(
            client,
            "SELECT coalesce((SELECT s.seq - 1 FROM vetassist_auth.audit_seals s \
                              WHERE (SELECT a.occurred_at FROM vetassist_auth.audit_log a \
                                     WHERE a.id = s.audit_id) >= pg_catalog.now() - $1 \
                              ORDER BY s.seq LIMIT 1), \
                             (SELECT max(seq) FROM vetassist_auth.audit_seals))",
            &[older_than.into()],
        )?;
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
                        pg_catalog.jsonb_build_object('rows', $1, 'through_seq', $2, 'checkpoint_hash', \
                            (SELECT pg_catalog.encode(checkpoint_hash, 'hex') FROM vetassist_auth.audit_seal_state), \
                            'older_than', $3::text, 'cut_off', pg_catalog.now() - $3))",
                None,
                &[removed.into(), through.into(), older_than.into()],
            )
            .map_err(spi_failed)?;
        Ok(removed)
    })
    .or_raise();
    // On a Citus coordinator, every worker's log too (each under its own lock); 0 elsewhere.
    let on_workers = Spi::get_one_with_args::<i64>(
        "SELECT vetassist_auth.purge_worker_audit_logs($1)",
        &[older_than.into()],
    )
    .map_err(spi_failed)
    .or_raise()
    .unwrap_or(0);
    removed + on_workers
}

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
    search_path::pinned(|| Spi::get_one_with_args::<i32>(
        "SELECT pid FROM pg_catalog.pg_locks WHERE locktype = 'object' AND granted \
           AND database = (SELECT oid FROM pg_catalog.pg_database WHERE datname = pg_catalog.current_database()) \
           AND classid = $1 AND objid = 0 AND (objsubid::integer & 65535) = $2 AND pid <> pg_catalog.pg_backend_pid() LIMIT 1",
        &[keys::keys_relid().into(), (keys::AUDIT_CHAIN as i32).into()],
    ))
    .ok()
    .flatten()
}

// Who may call the functions above (any other function of the extension: no role,
// sql/grants.sql).
extension_sql!(
    r#"
GRANT EXECUTE ON FUNCTION vetassist_auth.seal_audit_log(integer) TO vetassist_admin;
GRANT EXECUTE ON FUNCTION vetassist_auth.audit_seal_status() TO vetassist_admin, vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.verify_audit_chain() TO vetassist_admin, vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.verify_audit_chain(bigint, bytea) TO vetassist_admin, vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.verify_audit_chain(bigint, bytea, integer, text) TO vetassist_admin, vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.purge_audit_log(interval) TO vetassist_admin;
"#,
    name = "chain_grants",
    requires = [
        seal_audit_log,
        audit_seal_status,
        verify_audit_chain,
        verify_audit_chain_against,
        verify_audit_chain_at_position,
        purge_audit_log
    ],
);

#[cfg(test)]
mod tests {
    use super::{format_lsn, parse_lsn};

    #[test]
    fn an_lsn_reads_back_as_postgres_prints_it() {
        for text in ["0/0", "0/3000060", "1A/FF00AB12", "FFFFFFFF/FFFFFFFF"] {
            assert_eq!(parse_lsn(text).map(format_lsn).as_deref(), Some(text));
        }
        assert_eq!(parse_lsn("1/0"), Some(1 << 32));
        for malformed in [
            "",
            "3000060",
            "0/",
            "/1",
            "g/1",
            "0/1/2",
            "100000000/0",
            "+1/0",
        ] {
            assert_eq!(parse_lsn(malformed), None, "{malformed}");
        }
    }
}
