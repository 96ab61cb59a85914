#!/usr/bin/env bash
# Installs what the Node client's tests need, skipping whatever is already there: Debian's
# nodejs and npm (Node >= 18; Debian 12 ships 18). A Node found on PATH (nodesource, nvm) is
# kept. Fails when node or npm is still missing or older than 18; prints node's version.
# Usage: scripts/ensure-node.sh
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

missing=()
command -v node >/dev/null || missing+=(nodejs)
command -v npm >/dev/null || missing+=(npm)
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing Debian packages: ${missing[*]}" >&2
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v node >/dev/null || ! command -v npm >/dev/null; then
    echo "ensure-node.sh: node or npm is still missing after installing ${missing[*]}" >&2
    exit 1
fi
major=$(node -p 'process.versions.node.split(".")[0]')
if [ "$major" -lt 18 ]; then
    echo "ensure-node.sh: node $(node --version) is older than 18" >&2
    exit 1
fi
node --version
