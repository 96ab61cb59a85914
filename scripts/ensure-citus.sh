#!/usr/bin/env bash
# Installs Citus 13.2.2 (the scale-out engine, docs/citus.md "Scale-out on Citus") into the PostgreSQL
# of the given pg_config, once: built from vendor/citus-13.2.2.tar.gz. Citus 13.2 supports
# PostgreSQL 15, 16 and 17. Usage: scripts/ensure-citus.sh <pg_config>
set -euo pipefail
PG_CONFIG=${1:?usage: ensure-citus.sh <pg_config>}
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
version=13.2.2
control="$("$PG_CONFIG" --sharedir)/extension/citus.control"
if [ -f "$control" ] && grep -q "default_version = '13.2-1'" "$control" \
        && [ -f "$("$PG_CONFIG" --pkglibdir)/citus.so" ]; then
    exit 0
fi
echo "==> building Citus $version for $("$PG_CONFIG" --version) (about 2 minutes on 2 cores, once)" >&2
"$ROOT/scripts/ensure-debian-packages.sh" flex liblz4-dev libzstd-dev libcurl4-openssl-dev libkrb5-dev libssl-dev
(cd "$ROOT/vendor" && sha256sum --quiet -c SHA256SUMS) >&2
build=$(mktemp -d)
trap 'rm -rf "$build"' EXIT
tar xzf "$ROOT/vendor/citus-$version.tar.gz" -C "$build"
src=$(find "$build" -mindepth 1 -maxdepth 1 -type d | head -1)
# PostgreSQL 15.20 (Debian's) declares have_createdb_privilege() extern in
# commands/dbcommands.h; Citus's static copy for older 15.x then fails to compile.
if grep -q 'have_createdb_privilege' "$("$PG_CONFIG" --includedir-server)/commands/dbcommands.h"; then
    python3 - "$src/src/include/pg_version_compat.h" <<'PY'
import re, sys
path = sys.argv[1]
text = open(path).read()
text, n = re.subn(r"static inline bool\s+have_createdb_privilege\(void\)\s*\{.*?\n\}\n", "", text, flags=re.S)
open(path, "w").write(text)
PY
fi
# make of a wheel's PostgreSQL must not inherit our make's settings (see ensure-postgres.sh).
(cd "$src" && env -u MAKELEVEL -u MAKEFLAGS ./configure --quiet PG_CONFIG="$PG_CONFIG" >&2)
env -u MAKELEVEL -u MAKEFLAGS make -C "$src" -s -j"$(nproc)" >&2
env -u MAKELEVEL -u MAKEFLAGS $SUDO make -C "$src" -s install >&2
