#!/usr/bin/env bash
# Installs what the Python client's report tests use to look at a rendered page, skipping
# whatever is already there: Debian's chromium (run headless: --dump-dom, --print-to-pdf),
# poppler-utils (pdftotext) and one font (a PDF printed without any font has no text to
# extract). Prints the path of the chromium binary.
# Usage: scripts/ensure-chromium.sh
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo

packages=(chromium poppler-utils fonts-dejavu-core)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "==> installing Debian packages: ${missing[*]}" >&2
    $SUDO apt-get update -qq
    # No recommends: the browser and its libraries, not desktop extras (upower, a notification daemon).
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

chromium=$(command -v chromium || true)
if [ -z "$chromium" ] || ! command -v pdftotext >/dev/null; then
    echo "ensure-chromium.sh: chromium or pdftotext is still missing after installing ${packages[*]}" >&2
    exit 1
fi
echo "$chromium"
