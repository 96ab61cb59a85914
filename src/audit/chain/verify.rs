//! Verifying the chain, whole or against an anchor kept outside the database, and telling a
//! recovery to an earlier point from seals removed.

use super::*;

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

// Who may call the functions above (any other function of the extension: no role,
// sql/grants.sql).
extension_sql!(
    r#"
GRANT EXECUTE ON FUNCTION vetassist_auth.verify_audit_chain() TO vetassist_admin, vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.verify_audit_chain(bigint, bytea) TO vetassist_admin, vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.verify_audit_chain(bigint, bytea, integer, text) TO vetassist_admin, vetassist_auditor;
"#,
    name = "verify_audit_chain_grants",
    requires = [
        verify_audit_chain,
        verify_audit_chain_against,
        verify_audit_chain_at_position
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
