#!/usr/bin/env bash
# A throw-away Citus cluster on localhost: a coordinator and N workers, each a cluster of
# scripts/cluster.sh (under target/clusters/NAME-*), all with the coordinator's master key and
# shared_preload_libraries = 'citus,vetassist_auth', database DB with citus created in it on
# every node and the workers added to the coordinator. Prints one line per node:
# "coordinator|worker PORT SOCKET_DIR". Only the coordinator runs the sweeper.
#
#   scripts/citus-cluster.sh start NAME WORKERS DB
#   scripts/citus-cluster.sh add-worker NAME INDEX DB   # one more worker, not yet rebalanced
#   scripts/citus-cluster.sh stop NAME
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN=$("${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}" --bindir)
action=$1 name=$2

conf=(
    "shared_preload_libraries = 'citus,vetassist_auth'"
    # Localhost only; a real cluster keeps Citus' default (TLS between nodes).
    "citus.node_conninfo = 'sslmode=disable'"
    # Shard moves copy with logical replication.
    "wal_level = logical"
    "max_worker_processes = 32"
)
psql_at() { "$BIN/psql" -X -q -v ON_ERROR_STOP=1 -h "$1" -p "$2" -U postgres "${@:3}"; }

start_worker() {  # index db
    local key started port dir
    key=$("$ROOT/scripts/cluster.sh" keyfile "$name-coordinator")
    started=$(MASTER_KEY_FROM="$key" "$ROOT/scripts/cluster.sh" start "$name-worker$1" auto "${conf[@]}")
    port=$(echo "$started" | head -1) dir=$(echo "$started" | tail -1)
    psql_at "$dir" "$port" -d postgres -c "CREATE DATABASE $2" >/dev/null
    psql_at "$dir" "$port" -d "$2" -c "CREATE EXTENSION citus" >/dev/null
    echo "worker $port $dir"
}

case "$action" in
start)
    workers=$3 db=$4
    started=$("$ROOT/scripts/cluster.sh" start "$name-coordinator" auto "${conf[@]}" \
              "vetassist_auth.sweep_database = '$db'")
    cport=$(echo "$started" | head -1) cdir=$(echo "$started" | tail -1)
    psql_at "$cdir" "$cport" -d postgres -c "CREATE DATABASE $db" >/dev/null
    psql_at "$cdir" "$cport" -d "$db" -c "CREATE EXTENSION citus" \
        -c "SELECT citus_set_coordinator_host('127.0.0.1', $cport)" >/dev/null
    echo "coordinator $cport $cdir"
    for i in $(seq 1 "$workers"); do
        line=$(start_worker "$i" "$db")
        echo "$line"
        psql_at "$cdir" "$cport" -d "$db" -c "SELECT citus_add_node('127.0.0.1', $(echo "$line" | cut -d' ' -f2))" >/dev/null
    done
    ;;
add-worker)
    index=$3 db=$4
    line=$(start_worker "$index" "$db")
    echo "$line"
    ;;
stop)
    for d in "$ROOT"/target/clusters/"$name"-* /tmp/vetassist_auth-clusters-*/"$name"-*; do
        if [ -d "$d" ]; then "$ROOT/scripts/cluster.sh" stop "$(basename "$d")"; fi
    done
    ;;
*)
    echo "usage: $0 start NAME WORKERS DB | add-worker NAME INDEX DB | stop NAME" >&2; exit 2 ;;
esac
