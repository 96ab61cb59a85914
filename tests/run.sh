#!/usr/bin/env bash
# The whole suite after the extension is installed: pg_regress (SQL behaviour with expected
# output) and pytest (clients, clusters, logs, dumps, concurrency).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
# The PostgreSQL under test (the Makefile exports PG_CONFIG; Debian's 15 by default).
export PG_CONFIG=${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}
BIN=$("$PG_CONFIG" --bindir)
PG_REGRESS="$(dirname "$("$PG_CONFIG" --pgxs)")/../test/regress/pg_regress"
# Only the pg_regress suite, the upgrade test and the integration tests that need no load and
# do need PostgreSQL run (make test on the other supported versions).
COMPAT=${COMPAT:-}

started=$(scripts/cluster.sh start regress auto "shared_preload_libraries = 'vetassist_auth'")
PORT=$(echo "$started" | head -1)
dir=$(echo "$started" | tail -1)
trap 'scripts/cluster.sh stop regress' EXIT

tests=$(cd tests/regress/sql && ls *.sql | sed 's/\.sql$//' | sort)
mkdir -p target/regress
echo "==> pg_regress"
if ! "$PG_REGRESS" --bindir="$BIN" --host="$dir" --port=$PORT --user=postgres --inputdir=tests/regress \
        --outputdir=target/regress --dbname=vetassist_regress $tests; then
    cat target/regress/regression.diffs 2>/dev/null | head -200
    exit 1
fi

# make check: pg_regress only (it runs one pytest file itself).
if [ -n "${REGRESS_ONLY:-}" ]; then
    exit 0
fi

if [ -n "$COMPAT" ]; then
    echo "==> pytest (tests/integration, no load runs) on $("$PG_CONFIG" --version)"
    target/venv/bin/pytest -q --durations=12 -m "not load and not no_pg" tests/integration "$@"
    exit 0
fi
echo "==> pytest (tests/integration) on $("$PG_CONFIG" --version)"
target/venv/bin/pytest -q --durations=20 tests/integration "$@"

# Citus 13.2 supports PostgreSQL 15 to 17; make test runs this on the default version.
if [ "$("$PG_CONFIG" --version | sed -E 's/^PostgreSQL ([0-9]+).*/\1/')" -le 17 ]; then
    echo "==> pytest (tests/citus): a Citus coordinator and two workers"
    scripts/ensure-citus.sh "$PG_CONFIG"
    target/venv/bin/pytest -q tests/citus
fi

echo "==> examples/walkthrough.sql in psql"
"$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p $PORT -U postgres -d postgres \
    -c "DROP DATABASE IF EXISTS walkthrough" -c "CREATE DATABASE walkthrough"
"$BIN/psql" -X -v ON_ERROR_STOP=1 -h "$dir" -p $PORT -U postgres -d walkthrough -f examples/walkthrough.sql > target/walkthrough.out 2>&1 \
    || { cat target/walkthrough.out; exit 1; }
grep -q "permission denied for table va_tokens" target/walkthrough.out
echo "walkthrough ran: $(grep -c '^==' target/walkthrough.out) steps"

echo "==> Python client (clients/python), its printable report checked in headless Chromium"
scripts/ensure-chromium.sh >/dev/null
(cd clients/python && VETASSIST_REQUIRE_CHROMIUM=1 "$ROOT/target/venv/bin/python" -m pytest -q tests)

echo "==> Node client (clients/node)"
scripts/ensure-node.sh
"$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p $PORT -U postgres -d postgres \
    -c "DROP DATABASE IF EXISTS vetassist_node" -c "CREATE DATABASE vetassist_node"
"$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$dir" -p $PORT -U postgres -d vetassist_node \
    -c "CREATE EXTENSION vetassist_auth" \
    -c "DO \$\$ BEGIN
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'node_app') THEN CREATE ROLE node_app LOGIN IN ROLE vetassist_app; END IF;
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'node_auditor') THEN CREATE ROLE node_auditor LOGIN IN ROLE vetassist_auditor; END IF;
          IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'node_admin') THEN CREATE ROLE node_admin LOGIN IN ROLE vetassist_admin; END IF;
        END \$\$"
(cd clients/node && npm ci --no-audit --no-fund --silent \
    && VETASSIST_PG_CONNINFO="postgresql://node_app@/vetassist_node?host=$dir&port=$PORT" \
       VETASSIST_PG_AUDITOR_CONNINFO="postgresql://node_auditor@/vetassist_node?host=$dir&port=$PORT" \
       VETASSIST_PG_ADMIN_CONNINFO="postgresql://node_admin@/vetassist_node?host=$dir&port=$PORT" \
       npm test)
