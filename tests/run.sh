#!/usr/bin/env bash
# The whole suite after the extension is installed: pg_regress (SQL behaviour with expected
# output) and pytest (clients, clusters, logs, dumps, concurrency).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
PG_REGRESS=/usr/lib/postgresql/15/lib/pgxs/src/test/regress/pg_regress
PORT=28816

dir=$(scripts/cluster.sh start regress $PORT "shared_preload_libraries = 'vetassist_auth'")
trap 'scripts/cluster.sh stop regress' EXIT

tests=$(cd tests/regress/sql && ls *.sql | sed 's/\.sql$//' | sort)
mkdir -p target/regress
echo "==> pg_regress"
if ! $PG_REGRESS --host="$dir" --port=$PORT --user=postgres --inputdir=tests/regress \
        --outputdir=target/regress --dbname=vetassist_regress $tests; then
    cat target/regress/regression.diffs 2>/dev/null | head -200
    exit 1
fi

echo "==> pytest (tests/integration)"
target/venv/bin/pytest -q tests/integration "$@"

echo "==> examples/walkthrough.sql in psql"
psql -X -q -v ON_ERROR_STOP=1 -h "$dir" -p $PORT -U postgres -d postgres \
    -c "DROP DATABASE IF EXISTS walkthrough" -c "CREATE DATABASE walkthrough"
psql -X -v ON_ERROR_STOP=1 -h "$dir" -p $PORT -U postgres -d walkthrough -f examples/walkthrough.sql > target/walkthrough.out 2>&1 \
    || { cat target/walkthrough.out; exit 1; }
grep -q "permission denied for table va_tokens" target/walkthrough.out
echo "walkthrough ran: $(grep -c '^==' target/walkthrough.out) steps"

echo "==> Python client (clients/python)"
(cd clients/python && "$ROOT/target/venv/bin/python" -m pytest -q tests)

if command -v node >/dev/null && command -v npm >/dev/null; then
    echo "==> Node example (clients/node)"
    psql -X -q -v ON_ERROR_STOP=1 -h "$dir" -p $PORT -U postgres -d postgres \
        -c "DROP DATABASE IF EXISTS vetassist_node" -c "CREATE DATABASE vetassist_node"
    psql -X -q -v ON_ERROR_STOP=1 -h "$dir" -p $PORT -U postgres -d vetassist_node \
        -c "CREATE EXTENSION vetassist_auth" \
        -c "DO \$\$ BEGIN IF NOT EXISTS (SELECT 1 FROM pg_roles WHERE rolname = 'node_app') THEN CREATE ROLE node_app LOGIN IN ROLE vetassist_app; END IF; END \$\$"
    (cd clients/node && { [ -d node_modules/pg ] || npm install --no-audit --no-fund --silent; } \
        && VETASSIST_PG_CONNINFO="postgresql://node_app@/vetassist_node?host=$dir&port=$PORT" node --test)
else
    echo "==> Node example skipped: node/npm not installed"
fi
