#!/usr/bin/env bash
# Throw-away PostgreSQL clusters under target/clusters/NAME, run as the postgres OS user
# (initdb refuses root), of the PostgreSQL whose pg_config $PG_CONFIG names (Debian's 15 when
# unset). Sockets live in the cluster directory; nothing listens on TCP except loopback on the
# chosen port (`auto`: a free one, printed on the line before the directory).
#
#   scripts/cluster.sh start NAME PORT|auto [extra postgresql.conf lines...]
#   scripts/cluster.sh stop NAME
#   scripts/cluster.sh keyfile NAME         # prints the path of the cluster's master key file
#
# MASTER_KEY_FROM=FILE gives the new cluster a copy of that master key file instead of a fresh
# key (the nodes of a Citus cluster share one master key).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
BIN=$("${PG_CONFIG:-/usr/lib/postgresql/15/bin/pg_config}" --bindir)
action=$1 name=$2

as_pg() { if [ "$(id -u)" = 0 ]; then sudo -u postgres "$@"; else "$@"; fi; }

# Clusters live under target/clusters, unless the postgres user cannot reach the checkout
# (a clone under /root, say): then under /tmp, keyed by the checkout's path.
base="$ROOT/target/clusters"
mkdir -p "$base"
chmod 755 "$ROOT/target" "$base" 2>/dev/null || true
if [ "$(id -u)" = 0 ] && ! sudo -u postgres test -x "$base"; then
    base="/tmp/vetassist_auth-clusters-$(echo "$ROOT" | md5sum | cut -c1-8)"
    mkdir -p "$base"; chmod 755 "$base"
fi
dir="$base/$name"

case "$action" in
start)
    port=$3; shift 3
    if [ "$port" = auto ]; then
        port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
        echo "$port"
    fi
    as_pg "$BIN/pg_ctl" -D "$dir/data" -m fast stop >/dev/null 2>&1 || true
    rm -rf "$dir"; mkdir -p "$dir"
    chown postgres: "$dir" 2>/dev/null || true
    as_pg "$BIN/initdb" -D "$dir/data" -U postgres -A trust --no-sync >/dev/null
    # A fresh random master key (or MASTER_KEY_FROM's), readable by the server's OS user only.
    if [ -n "${MASTER_KEY_FROM:-}" ]; then
        as_pg bash -c "umask 077; cat '$MASTER_KEY_FROM' > '$dir/master.key'"
    else
        as_pg bash -c "umask 077; od -An -tx1 -N32 /dev/urandom | tr -d ' \n' > '$dir/master.key'"
    fi
    {
        echo "port = $port"
        echo "listen_addresses = '127.0.0.1'"
        echo "unix_socket_directories = '$dir'"
        echo "vetassist_auth.master_key_file = '$dir/master.key'"
        echo "fsync = off"
        echo "logging_collector = off"
        for line in "$@"; do echo "$line"; done
    } | as_pg tee -a "$dir/data/postgresql.conf" >/dev/null
    as_pg "$BIN/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 start >/dev/null
    echo "$dir"
    ;;
stop)
    [ -d "$dir/data" ] && as_pg "$BIN/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null 2>&1 || true
    ;;
keyfile)
    echo "$dir/master.key"
    ;;
*)
    echo "usage: $0 start|stop|keyfile NAME [PORT [conf lines...]]" >&2; exit 2 ;;
esac
