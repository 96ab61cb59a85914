#!/usr/bin/env bash
# Installs those of the given Debian packages that are not installed yet, with apt-get (as root,
# or through sudo), and prints nothing on stdout: the ensure-*.sh scripts print paths there.
# --no-install-recommends: the packages and their dependencies only.
# Usage: scripts/ensure-debian-packages.sh [--no-install-recommends] PACKAGE...
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
options=()
if [ "${1:-}" = --no-install-recommends ]; then
    options+=("$1")
    shift
fi
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -eq 0 ]; then
    exit 0
fi
echo "==> installing Debian packages: ${missing[*]}" >&2
$SUDO apt-get update -qq >&2
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${options[@]}" "${missing[@]}" >/dev/null
