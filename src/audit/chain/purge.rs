//! Purging the chain's oldest part behind a checkpoint, never younger than the retention.

use super::*;

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

// Who may call the functions above (any other function of the extension: no role,
// sql/grants.sql).
extension_sql!(
    r#"
GRANT EXECUTE ON FUNCTION vetassist_auth.purge_audit_log(interval) TO vetassist_admin;
"#,
    name = "purge_audit_log_grants",
    requires = [purge_audit_log],
);
