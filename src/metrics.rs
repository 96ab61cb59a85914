//! The extension's health as Prometheus series (docs/operations.md, "Metrics"): `metrics()` for
//! any client, and the queries file of prometheus-postgres-exporter generated from the same list
//! (`exporter_queries()`), so a series is defined in one place. No value is PHI, and nothing
//! scans the audit log: sessions come from the live-session index, the sealing figures from the
//! unsealed tail of the log by its primary key, events from counters in shared memory.

use crate::counters::{self, Counter, Source};
use crate::error::{OrRaise, Result};
use crate::keys;
use crate::pg::{query_failure, read_one};
use crate::{log_redaction, outbox};
use pgrx::prelude::*;
use pgrx::spi::Spi;
use pgrx::JsonB;

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Type {
    Counter,
    Gauge,
}

/// Label values in the order of the metric's labels, and the value.
type Samples = Vec<(Vec<String>, f64)>;

/// One series family. Its Prometheus name is `namespace_column`: the exporter names a query's
/// value columns after the query's key (the namespace), so metrics that share a namespace share
/// its query and must have the same labels (a test checks), and must be present or absent
/// together (a column of a row that has no value is NaN to the exporter).
struct Metric {
    namespace: &'static str,
    column: &'static str,
    kind: Type,
    labels: &'static [&'static str],
    help: &'static str,
    read: fn() -> Result<Samples>,
}

impl Metric {
    fn name(&self) -> String {
        format!("{}_{}", self.namespace, self.column)
    }
}

const METRICS: &[Metric] = &[
    Metric {
        namespace: "vetassist",
        column: "sessions",
        kind: Type::Gauge,
        labels: &["status"],
        help: "Sessions in force: live, or past their time-out and waiting for expire_sessions (overdue)",
        read: sessions,
    },
    Metric {
        namespace: "vetassist_signins",
        column: "total",
        kind: Type::Counter,
        labels: &[],
        help: "Sign-ins committed (upsert_va_user: an account created or signed in again) since server start",
        read: || counted(Counter::Signins),
    },
    Metric {
        namespace: "vetassist_session",
        column: "expirations_total",
        kind: Type::Counter,
        labels: &[],
        help: "Sessions ended by their idle or absolute time-out since server start",
        read: || counted(Counter::SessionExpirations),
    },
    Metric {
        namespace: "vetassist_mfa",
        column: "failures_total",
        kind: Type::Counter,
        labels: &[],
        help: "Failed MFA verifications since server start",
        read: || counted(Counter::MfaFailures),
    },
    Metric {
        namespace: "vetassist_mfa",
        column: "lockouts_total",
        kind: Type::Counter,
        labels: &[],
        help: "MFA lock-outs since server start",
        read: || counted(Counter::MfaLockouts),
    },
    Metric {
        namespace: "vetassist_refresh",
        column: "reuse_total",
        kind: Type::Counter,
        labels: &[],
        help: "Reuses of a replaced refresh token outside the grace (possible theft) since server start",
        read: || counted(Counter::RefreshReuse),
    },
    Metric {
        namespace: "vetassist_disclosures",
        column: "total",
        kind: Type::Counter,
        labels: &["source"],
        help: "Disclosures on record since server start, by audit category (disclosure, phi, phi_access, va_token)",
        read: disclosures,
    },
    Metric {
        namespace: "vetassist_recorder",
        column: "queue_depth",
        kind: Type::Gauge,
        labels: &[],
        help: "Audit rows of this database in the outbox, queued or being written",
        read: || Ok(queue().map(|(depth, _)| depth as f64).into_iter().map(unlabelled).collect()),
    },
    Metric {
        namespace: "vetassist_recorder",
        column: "wait_seconds",
        kind: Type::Gauge,
        labels: &[],
        help: "How long the oldest queued audit row of this database has waited for the recorder",
        read: || Ok(queue().map(|(_, waited)| waited).into_iter().map(unlabelled).collect()),
    },
    Metric {
        namespace: "vetassist_recorder",
        column: "refusals_total",
        kind: Type::Counter,
        labels: &[],
        help: "Calls refused with 53000 because the recorder could not take their audit row, since server start",
        read: || counted(Counter::RecorderRefusals),
    },
    Metric {
        namespace: "vetassist_audit",
        column: "unsealed_rows",
        kind: Type::Gauge,
        labels: &[],
        help: "Audit rows above the sealed part of the chain",
        read: || one("SELECT count(*)::float8 FROM vetassist_auth.audit_log a WHERE a.id > (SELECT coalesce(max(sealed_through_id), 0) FROM vetassist_auth.audit_seal_state)"),
    },
    Metric {
        namespace: "vetassist_audit",
        column: "seal_lag_seconds",
        kind: Type::Gauge,
        labels: &[],
        help: "Age of the oldest unsealed audit row (0 when every row is sealed)",
        read: || one("SELECT coalesce((SELECT extract(epoch FROM clock_timestamp() - a.occurred_at)::float8 FROM vetassist_auth.audit_log a \
                      WHERE a.id > (SELECT coalesce(max(sealed_through_id), 0) FROM vetassist_auth.audit_seal_state) ORDER BY a.id LIMIT 1), 0)"),
    },
    Metric {
        namespace: "vetassist_audit_chain",
        column: "head_age_seconds",
        kind: Type::Gauge,
        labels: &[],
        help: "Time since the last seal of the audit chain (absent before the first)",
        read: || one("SELECT extract(epoch FROM clock_timestamp() - s.sealed_at)::float8 FROM vetassist_auth.audit_seals s ORDER BY s.seq DESC LIMIT 1"),
    },
    Metric {
        namespace: "vetassist_key",
        column: "encryptions",
        kind: Type::Gauge,
        labels: &["purpose"],
        help: "Encryptions under each purpose's active data key (the budget counts random nonces)",
        read: || key_budget(|count| count),
    },
    Metric {
        namespace: "vetassist_key",
        column: "budget_used_ratio",
        kind: Type::Gauge,
        labels: &["purpose"],
        help: "Share of the active key's encryption budget used: 0.5 is the automatic rotation mark, 1 the refusal",
        read: || key_budget(|count| count / keys::ENCRYPTION_LIMIT as f64),
    },
    Metric {
        namespace: "vetassist_reencrypt",
        column: "pending_values",
        kind: Type::Gauge,
        labels: &[],
        help: "Stored values still under a decrypt_only key: what reencrypt() has left to move",
        // Only while a rotation is being moved: with no decrypt_only key nothing is read. The
        // audit log's branches of key_usage are left out (reencrypt never rewrites it; a
        // constant used_by per branch lets the planner skip them).
        read: || one("SELECT CASE WHEN EXISTS (SELECT 1 FROM vetassist_auth.keys d WHERE d.status = 'decrypt_only') \
                      THEN (SELECT count(*) FROM vetassist_auth.key_usage u \
                            WHERE u.used_by NOT LIKE 'audit\\_%' \
                              AND u.key_id IN (SELECT k.key_id FROM vetassist_auth.keys k WHERE k.status = 'decrypt_only')) \
                      ELSE 0 END::float8"),
    },
    Metric {
        namespace: "vetassist_data",
        column: "keys",
        kind: Type::Gauge,
        labels: &["purpose", "status"],
        help: "Data keys by purpose and status (active, decrypt_only, retired)",
        read: data_keys,
    },
    Metric {
        namespace: "vetassist_unredactable",
        column: "log_channels",
        kind: Type::Gauge,
        labels: &[],
        help: "Log settings in force that show the extension's arguments unredacted (verify_installation names them)",
        read: || {
            let count = log_redaction::unsafe_log_channels().len();
            Ok(vec![unlabelled(count as f64)])
        },
    },
];

fn unlabelled(value: f64) -> (Vec<String>, f64) {
    (Vec::new(), value)
}

fn counted(counter: Counter) -> Result<Samples> {
    Ok(counters::read(counter)
        .map(|n| unlabelled(n as f64))
        .into_iter()
        .collect())
}

fn disclosures() -> Result<Samples> {
    Ok(Source::ALL
        .into_iter()
        .filter_map(|source| {
            counters::read(Counter::Disclosures(source))
                .map(|n| (vec![source.label().to_owned()], n as f64))
        })
        .collect())
}

fn queue() -> Option<(usize, f64)> {
    outbox::queue_state().map(|(depth, waited_us)| (depth, waited_us as f64 / 1e6))
}

/// One value from a query; none when it returns no row or NULL.
fn one(sql: &str) -> Result<Samples> {
    Ok(read_one::<f64>(sql, &[])
        .map_err(query_failure(sql))?
        .map(unlabelled)
        .into_iter()
        .collect())
}

fn labelled(sql: &str, labels: usize) -> Result<Samples> {
    Spi::connect(|client| {
        let mut samples = Vec::new();
        for row in client.select(sql, None, &[]).map_err(query_failure(sql))? {
            let mut values = Vec::with_capacity(labels);
            for i in 1..=labels {
                values.push(
                    row.get::<String>(i)
                        .map_err(query_failure(sql))?
                        .unwrap_or_default(),
                );
            }
            let value = row
                .get::<f64>(labels + 1)
                .map_err(query_failure(sql))?
                .unwrap_or_default();
            samples.push((values, value));
        }
        Ok(samples)
    })
}

fn sessions() -> Result<Samples> {
    // One pass over the partial index of ACTIVE sessions by live_until.
    labelled(
        "SELECT t.status, CASE t.status WHEN 'live' THEN c.live ELSE c.overdue END::float8 \
         FROM (SELECT count(*) FILTER (WHERE s.live_until > clock_timestamp()) AS live, \
                      count(*) FILTER (WHERE s.live_until <= clock_timestamp()) AS overdue \
               FROM vetassist_auth.sessions s WHERE s.status = 'ACTIVE') c, \
              (VALUES ('live'), ('overdue')) t(status)",
        1,
    )
}

fn data_keys() -> Result<Samples> {
    labelled(
        "SELECT k.purpose, k.status, count(*)::float8 FROM vetassist_auth.keys k GROUP BY 1, 2 ORDER BY 1, 2",
        2,
    )
}

/// Per purpose with an encryption counter, `value` of its active key's encryptions.
fn key_budget(value: fn(f64) -> f64) -> Result<Samples> {
    let counted = labelled(
        "SELECT k.purpose, c.counted::float8 FROM vetassist_auth.counted_encryptions() c \
         JOIN vetassist_auth.keys k ON k.key_id = c.key_id ORDER BY 1",
        1,
    )?;
    Ok(counted
        .into_iter()
        .map(|(labels, count)| (labels, value(count)))
        .collect())
}

/// The extension's metrics now: one row per series (its labels as a JSON object). `names`: only
/// these metrics (the exporter's queries ask for theirs). Readable by pg_monitor and
/// vetassist_auditor; no value is PHI. Event counters need the library preloaded.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn metrics(
    names: default!(Option<Vec<String>>, "NULL"),
) -> TableIterator<
    'static,
    (
        name!(metric, String),
        name!(labels, JsonB),
        name!(value, f64),
    ),
> {
    let mut rows = Vec::new();
    for metric in METRICS {
        let name = metric.name();
        if names.as_ref().is_some_and(|wanted| !wanted.contains(&name)) {
            continue;
        }
        for (values, value) in (metric.read)().or_raise() {
            let labels: serde_json::Map<String, serde_json::Value> = metric
                .labels
                .iter()
                .zip(values)
                .map(|(label, value)| (label.to_string(), serde_json::Value::String(value)))
                .collect();
            rows.push((
                name.clone(),
                JsonB(serde_json::Value::Object(labels)),
                value,
            ));
        }
    }
    TableIterator::new(rows)
}

/// What `metrics()` can return: each metric's name, type, labels and help.
#[pg_extern(security_definer)]
#[search_path(pg_catalog, pg_temp)]
fn metric_definitions() -> TableIterator<
    'static,
    (
        name!(metric, String),
        name!(kind, &'static str),
        name!(labels, Vec<String>),
        name!(help, &'static str),
    ),
> {
    TableIterator::new(METRICS.iter().map(|m| {
        (
            m.name(),
            match m.kind {
                Type::Counter => "counter",
                Type::Gauge => "gauge",
            },
            m.labels.iter().map(|l| l.to_string()).collect(),
            m.help,
        )
    }))
}

/// The queries file of prometheus-postgres-exporter (`--extend.query-path`) for these metrics:
/// one query per namespace, each reading only its metrics from `metrics()`.
#[pg_extern(immutable)]
fn exporter_queries() -> String {
    queries_yaml()
}

fn queries_yaml() -> String {
    let mut out = String::from(
        "# prometheus-postgres-exporter queries for vetassist_auth, generated by\n\
         # SELECT vetassist_auth.exporter_queries(); the exporter's role needs pg_monitor.\n",
    );
    let mut namespaces: Vec<&str> = METRICS.iter().map(|m| m.namespace).collect();
    namespaces.dedup();
    for namespace in namespaces {
        let members: Vec<&Metric> = METRICS
            .iter()
            .filter(|m| m.namespace == namespace)
            .collect();
        let labels = members[0].labels;
        let mut columns: Vec<String> = labels
            .iter()
            .map(|l| format!("m.labels ->> '{l}' AS {l}"))
            .collect();
        for m in &members {
            columns.push(format!(
                "max(m.value) FILTER (WHERE m.metric = '{}') AS {}",
                m.name(),
                m.column
            ));
        }
        let names: Vec<String> = members.iter().map(|m| m.name()).collect();
        // No row at all when the namespace's series are absent (an aggregate without GROUP BY
        // has a row even over no input).
        let group = if labels.is_empty() {
            " HAVING count(*) > 0".to_owned()
        } else {
            format!(
                " GROUP BY {}",
                (1..=labels.len())
                    .map(|i| i.to_string())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        };
        out.push_str(&format!(
            "{namespace}:\n  query: \"SELECT {} FROM vetassist_auth.metrics(ARRAY['{}']) m{group}\"\n  metrics:\n",
            columns.join(", "),
            names.join("', '"),
        ));
        for label in labels {
            out.push_str(&format!(
                "    - {label}:\n        usage: \"LABEL\"\n        description: \"{label}\"\n"
            ));
        }
        for m in &members {
            let usage = match m.kind {
                Type::Counter => "COUNTER",
                Type::Gauge => "GAUGE",
            };
            out.push_str(&format!(
                "    - {}:\n        usage: \"{usage}\"\n        description: \"{}\"\n",
                m.column, m.help
            ));
        }
    }
    out
}

/// Internal: counts audit rows written without the audit writer (expire_sessions inserts its
/// rows in one statement), as the writer counts its own.
#[pg_extern]
fn count_audit_rows(category: &str, event_type: &str, outcome: &str, rows: i64) {
    if let (Some(counter), Ok(rows)) = (
        Counter::of_audit_row(category, event_type, outcome),
        u64::try_from(rows),
    ) {
        counters::count_at_commit(counter, rows);
    }
}

// Who may read them (any other function of the extension: no role, sql/grants.sql).
extension_sql!(
    r#"
-- pg_monitor (an exporter's role) reaches these functions and nothing else of the schema.
GRANT USAGE ON SCHEMA vetassist_auth TO pg_monitor;
GRANT EXECUTE ON FUNCTION vetassist_auth.metrics(text[]) TO pg_monitor, vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.metric_definitions() TO pg_monitor, vetassist_auditor;
GRANT EXECUTE ON FUNCTION vetassist_auth.exporter_queries() TO pg_monitor, vetassist_auditor;
"#,
    name = "metrics_grants",
    requires = [metrics, metric_definitions, exporter_queries],
);

/// In a backend (`cargo pgrx test`): the list holds the readers, which call into Postgres.
#[cfg(any(test, feature = "pg_test"))]
#[pgrx::pg_schema]
mod tests {
    use super::*;

    #[pg_test]
    fn a_namespace_has_one_label_set_and_names_are_unique() {
        let mut names: Vec<String> = METRICS.iter().map(Metric::name).collect();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), METRICS.len());
        for m in METRICS {
            let first = METRICS.iter().find(|o| o.namespace == m.namespace).unwrap();
            assert_eq!(m.labels, first.labels, "{}", m.name());
            // The queries file lists a namespace's metrics together.
            let last = METRICS
                .iter()
                .rposition(|o| o.namespace == m.namespace)
                .unwrap();
            let first_at = METRICS
                .iter()
                .position(|o| o.namespace == m.namespace)
                .unwrap();
            assert!(METRICS[first_at..=last]
                .iter()
                .all(|o| o.namespace == m.namespace));
            assert!(m.name().starts_with("vetassist_"));
            assert_eq!(
                m.kind == Type::Counter,
                m.name().ends_with("_total"),
                "{}",
                m.name()
            );
        }
        assert!(queries_yaml().contains("vetassist_data:\n"));
    }
}
