#!/usr/bin/env bash
# Installs what the Python client's report tests use to look at a rendered page, skipping
# whatever is already there: Debian's chromium (run headless: --dump-dom, --print-to-pdf),
# poppler-utils (pdftotext) and one font (a PDF printed without any font has no text to
# extract). Prints the path of the chromium binary.
# Usage: scripts/ensure-chromium.sh
set -euo pipefail

packages=(chromium poppler-utils fonts-dejavu-core)
# No recommends: the browser and its libraries, not desktop extras (upower, a notification daemon).
"$(dirname "$0")/ensure-debian-packages.sh" --no-install-recommends "${packages[@]}"

chromium=$(command -v chromium || true)
if [ -z "$chromium" ] || ! command -v pdftotext >/dev/null; then
    echo "ensure-chromium.sh: chromium or pdftotext is still missing after installing ${packages[*]}" >&2
    exit 1
fi
echo "$chromium"
