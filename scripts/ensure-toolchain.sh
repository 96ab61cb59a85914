#!/usr/bin/env bash
# Installs what building and testing need, skipping whatever is already there: Debian's build
# packages (and PostgreSQL 15, the default), PostgreSQL NN (scripts/ensure-postgres.sh),
# cargo-pgrx 0.18.1, pgrx's config for every version installed so far, and a Python
# virtualenv (psycopg 3, pytest) under target/venv.
# Usage: scripts/ensure-toolchain.sh [NN]   (default 15)
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
version=${1:-15}

"$ROOT/scripts/ensure-debian-packages.sh" postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo

pg_config=$("$ROOT/scripts/ensure-postgres.sh" "$version")

if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.1'; then
    echo "==> installing cargo-pgrx 0.18.1 (about 5 minutes, once)"
    cargo install cargo-pgrx --version 0.18.1 --locked --quiet
fi

# pgrx keeps one config for all versions, and its build checks every pg_config listed: drop
# versions no longer where they were, then add this one.
config="${PGRX_HOME:-$HOME/.pgrx}/config.toml"
if [ -f "$config" ]; then
    while IFS= read -r path; do
        [ -x "$path" ] || sed -i "\|\"$path\"|d" "$config"
    done < <(sed -n 's/^pg[0-9][0-9] = "\(.*\)"$/\1/p' "$config")
fi
if ! grep -qs "^pg$version = \"$pg_config\"" "$config"; then
    echo "==> cargo pgrx init --pg$version $pg_config"
    cargo pgrx init --pg"$version" "$pg_config" >/dev/null
fi

# The venv is rebuilt whenever tests/requirements.txt changes.
stamp="$ROOT/target/venv/.requirements"
if ! cmp -s "$ROOT/tests/requirements.txt" "$stamp"; then
    echo "==> preparing target/venv (psycopg 3, pytest)"
    mkdir -p "$ROOT/target"
    [ -x "$ROOT/target/venv/bin/pip" ] || python3 -m venv "$ROOT/target/venv"
    "$ROOT/target/venv/bin/pip" install --quiet --disable-pip-version-check -r "$ROOT/tests/requirements.txt"
    cp "$ROOT/tests/requirements.txt" "$stamp"
fi
