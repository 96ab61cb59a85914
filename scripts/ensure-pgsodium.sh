#!/usr/bin/env bash
# Installs pgsodium 3.1.9 (the crypto benchmark's reference) into the PostgreSQL of the given
# pg_config, once: built with PGXS from vendor/pgsodium-3.1.9.tar.gz against Debian's
# libsodium-dev. Usage: scripts/ensure-pgsodium.sh <pg_config>
set -euo pipefail
PG_CONFIG=${1:?usage: ensure-pgsodium.sh <pg_config>}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
version=3.1.9
control="$("$PG_CONFIG" --sharedir)/extension/pgsodium.control"
if [ -f "$control" ] && grep -q "default_version = '$version'" "$control" \
        && [ -f "$("$PG_CONFIG" --pkglibdir)/pgsodium.so" ]; then
    exit 0
fi
echo "==> building pgsodium $version for $("$PG_CONFIG" --version) (seconds, once)" >&2
"$ROOT/scripts/ensure-debian-packages.sh" libsodium-dev
(cd "$ROOT/vendor" && sha256sum --quiet -c SHA256SUMS) >&2
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar xzf "$ROOT/vendor/pgsodium-$version.tar.gz" -C "$build"
# make of a wheel's PostgreSQL must not inherit our make's settings (see ensure-postgres.sh).
env -u MAKELEVEL -u MAKEFLAGS make -C "$build/pgsodium-$version" -s PG_CONFIG="$PG_CONFIG" >&2
env -u MAKELEVEL -u MAKEFLAGS $SUDO make -C "$build/pgsodium-$version" -s PG_CONFIG="$PG_CONFIG" install >&2
