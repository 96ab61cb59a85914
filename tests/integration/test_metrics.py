"""The extension's health as Prometheus series (docs/operations.md, "Metrics"): metrics() for
pg_monitor and the auditor, counters that count committed events only, and a real
prometheus-postgres-exporter 0.11 (Debian's) scraping the queries file generated from the same
list; the alert rules checked and unit-tested with promtool, the Grafana dashboard parsed. Every
rule and panel names only series that exist."""
import json
import re
import subprocess
import urllib.request
import uuid

import pytest

from vetassist_testing import ROOT, expect_sqlstate, free_port, veteran, wait_for, wrong_code, enrolled_mfa

MONITORING = ROOT / "monitoring"


def exporter_command(port, queries):
    """Debian's exporter as docs/operations.md runs it, on a loopback port, only its own
    metrics besides ours."""
    return ["/usr/bin/prometheus-postgres-exporter", f"--web.listen-address=127.0.0.1:{port}",
            f"--extend.query-path={queries}", "--disable-default-metrics", "--disable-settings-metrics",
            # 0.11's bgwriter collector reads columns PostgreSQL 17 moved (an error per scrape).
            "--no-collector.bgwriter"]


@pytest.fixture(scope="module")
def tools():
    subprocess.run([str(ROOT / "scripts/ensure-monitoring.sh")], check=True)


def new_icn():
    return f"10{uuid.uuid4().int % 10**8:08d}V{uuid.uuid4().int % 10**6:06d}"


def add_monitor(cluster, dbname="vetassist"):
    """A login role in pg_monitor (what an exporter connects as) and nothing else; its name."""
    cluster.psql("DO $$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'monitor_user') THEN "
                 "CREATE ROLE monitor_user LOGIN IN ROLE pg_monitor; END IF; END $$", dbname)
    return "monitor_user"


@pytest.fixture(scope="module")
def monitor(cluster):
    return add_monitor(cluster)


def definitions(conn):
    return {name: (kind, labels) for name, kind, labels, _help in
            conn.execute("SELECT metric, kind, labels, help FROM vetassist_auth.metric_definitions()").fetchall()}


def value(conn, name, **labels):
    rows = conn.execute("SELECT labels, value FROM vetassist_auth.metrics(ARRAY[%s])", (name,)).fetchall()
    found = [v for l, v in rows if all(l.get(k) == str(w) for k, w in labels.items())]
    return found[0] if found else None


def test_metrics_are_for_pg_monitor_and_the_auditor_only(cluster, monitor, app):
    with cluster.connect("vetassist", monitor) as m:
        assert m.execute("SELECT count(*) FROM vetassist_auth.metrics()").fetchone()[0] > 0
        assert "vetassist_sessions" in m.execute("SELECT vetassist_auth.exporter_queries()").fetchone()[0]
    with cluster.connect("vetassist", "auditor_user") as auditor:
        assert auditor.execute("SELECT count(*) FROM vetassist_auth.metric_definitions()").fetchone()[0] > 0
    for role in ("app_user", "outsider"):
        with cluster.connect("vetassist", role) as conn:
            expect_sqlstate("42501", conn, "SELECT * FROM vetassist_auth.metrics()")


def test_counters_count_committed_events_only(cluster, monitor, app):
    with cluster.connect("vetassist", monitor) as m:
        signins = value(m, "vetassist_signins_total")
        icn = new_icn()
        with cluster.connect("vetassist", "app_user", autocommit=False) as rolled_back:
            rolled_back.execute("SELECT vetassist_auth.upsert_va_user(%s, 'veteran', NULL, 'A', 'B')", (icn,))
            rolled_back.rollback()
        assert value(m, "vetassist_signins_total") == signins
        uid = veteran(app, icn)
        assert value(m, "vetassist_signins_total") == signins + 1

        # Failed MFA codes are recorded by the recorder (they survive a rollback): counted at its commit.
        failures, lockouts = value(m, "vetassist_mfa_failures_total"), value(m, "vetassist_mfa_lockouts_total")
        uri = enrolled_mfa(app, uid)
        app.execute("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 hour')", (uid, f"jti-{icn}"))
        limit = int(cluster.connect("vetassist").execute("SHOW vetassist_auth.mfa_max_failures").fetchone()[0])
        for _ in range(limit):
            app.execute("SELECT vetassist_auth.mfa_verify(%s, %s)", (f"jti-{icn}", wrong_code(uri)))
        assert value(m, "vetassist_mfa_failures_total") == failures + limit
        assert value(m, "vetassist_mfa_lockouts_total") == lockouts + 1

        # A VA token returned to the caller is a disclosure of source va_token.
        disclosed = value(m, "vetassist_disclosures_total", source="va_token")
        assert app.execute("SELECT vetassist_auth.va_access_token(%s)", (uid,)).fetchone()[0]
        assert value(m, "vetassist_disclosures_total", source="va_token") == disclosed + 1


def test_gauges_read_the_database(cluster, monitor, app, admin):
    uid = veteran(app, new_icn())
    app.execute("SELECT vetassist_auth.create_session(%s, %s, now() + interval '1 hour')", (uid, f"live-{uid}"))
    with cluster.connect("vetassist", monitor) as m:
        live = value(m, "vetassist_sessions", status="live")
        assert live >= 1
        with cluster.connect("vetassist") as su:
            keys = dict(((p, s), n) for p, s, n in su.execute(
                "SELECT purpose, status, count(*) FROM vetassist_auth.keys GROUP BY 1, 2").fetchall())
        assert {(l["purpose"], l["status"]): v for l, v in m.execute(
            "SELECT labels, value FROM vetassist_auth.metrics(ARRAY['vetassist_data_keys'])").fetchall()} == keys
        ratio = value(m, "vetassist_key_budget_used_ratio", purpose="token")
        encryptions = value(m, "vetassist_key_encryptions", purpose="token")
        assert encryptions > 0 and ratio == pytest.approx(encryptions / 2**31)
        admin.execute("SELECT vetassist_auth.seal_audit_log(100000)")
        assert value(m, "vetassist_audit_chain_head_age_seconds") >= 0
        assert value(m, "vetassist_unredactable_log_channels") == 0


def scrape(port):
    with urllib.request.build_opener(urllib.request.ProxyHandler({})).open(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        return r.read().decode()


def series(text):
    """name -> list of label dicts of the samples in an exposition text."""
    found = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})? (\S+)$", line)
        if m:
            labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group(2) or ""))
            found.setdefault(m.group(1), []).append((labels, float(m.group(3))))
    return found


def test_the_exporter_serves_every_series_from_the_generated_queries(cluster, monitor, app, admin, tools, tmp_path):
    # State for every series: a sign-in, a session, a token key, a seal.
    veteran(app, new_icn())
    admin.execute("SELECT vetassist_auth.seal_audit_log(100000)")
    with cluster.connect("vetassist", monitor) as m:
        queries = m.execute("SELECT vetassist_auth.exporter_queries()").fetchone()[0]
        defined = definitions(m)
    path = tmp_path / "queries.yaml"
    path.write_text(queries)
    port = free_port()
    env = {"DATA_SOURCE_NAME": f"host={cluster.dir} port={cluster.port} user={monitor} dbname=vetassist sslmode=disable",
           "PATH": "/usr/bin:/bin"}
    exporter = subprocess.Popen(exporter_command(port, path),
                                env=env, stdout=subprocess.DEVNULL, stderr=open(tmp_path / "exporter.log", "w"))
    try:
        def ready():
            try:
                text = scrape(port)
            except OSError:
                return None
            return text if "vetassist_sessions" in text else None
        text = wait_for("the exporter's vetassist series", ready, 60)
        exposed = series(text)
    finally:
        exporter.terminate()
        exporter.wait(30)
    log = (tmp_path / "exporter.log").read_text()
    assert "error" not in log.lower(), log
    for name, (kind, labels) in defined.items():
        assert name in exposed, f"{name} not exported:\n{log}"
        for sample_labels, sample in exposed[name]:
            assert set(labels) <= set(sample_labels), (name, sample_labels)
            assert sample == sample  # not NaN: every query row has every column
        assert f"# TYPE {name} {kind}" in text
    assert {l["status"] for l, _ in exposed["vetassist_sessions"]} == {"live", "overdue"}
    assert {l["source"] for l, _ in exposed["vetassist_disclosures_total"]} == {"disclosure", "phi", "phi_access", "va_token"}


def names_in(expr_texts):
    return {n for text in expr_texts for n in re.findall(r"\bvetassist_[a-z_]+\b", text)}


def test_alert_rules_pass_promtool_and_name_only_real_series(cluster, monitor, tools):
    subprocess.run(["promtool", "check", "rules", str(MONITORING / "alerts.yml")], check=True, capture_output=True)
    tested = subprocess.run(["promtool", "test", "rules", "alerts_test.yml"], cwd=MONITORING, capture_output=True, text=True)
    assert tested.returncode == 0, tested.stdout + tested.stderr
    with cluster.connect("vetassist", monitor) as m:
        defined = set(definitions(m))
    exprs = re.findall(r"^\s*expr:\s*(.+)$", (MONITORING / "alerts.yml").read_text(), re.M)
    assert exprs and names_in(exprs) <= defined, names_in(exprs) - defined


def test_the_dashboard_parses_and_charts_only_real_series(cluster, monitor):
    dashboard = json.loads((MONITORING / "grafana-dashboard.json").read_text())
    exprs = [t["expr"] for p in dashboard["panels"] for t in p["targets"]]
    with cluster.connect("vetassist", monitor) as m:
        defined = set(definitions(m))
    assert names_in(exprs) <= defined, names_in(exprs) - defined
    # Every series is on the dashboard.
    assert defined <= names_in(exprs), defined - names_in(exprs)
    assert len({p["id"] for p in dashboard["panels"]}) == len(dashboard["panels"])
