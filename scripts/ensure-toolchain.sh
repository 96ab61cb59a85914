#!/usr/bin/env bash
# Installs what building and testing need, skipping whatever is already there:
# Debian's PostgreSQL 15 and build packages, cargo-pgrx 0.18.1, pgrx's config for PG 15,
# and a Python virtualenv (psycopg 3, pytest) under target/venv.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PG_CONFIG=/usr/lib/postgresql/15/bin/pg_config
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

packages=(postgresql-15 postgresql-server-dev-15 libclang-dev clang sudo)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing Debian packages: ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! cargo pgrx --version 2>/dev/null | grep -q '0\.18\.1'; then
    echo "==> installing cargo-pgrx 0.18.1 (about 5 minutes, once)"
    cargo install cargo-pgrx --version 0.18.1 --locked --quiet
fi

if ! grep -qs '^pg15' "${PGRX_HOME:-$HOME/.pgrx}/config.toml"; then
    echo "==> cargo pgrx init --pg15 $PG_CONFIG"
    cargo pgrx init --pg15 "$PG_CONFIG" >/dev/null
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
