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

echo "==> pytest"
target/venv/bin/pytest -q tests/integration "$@"
