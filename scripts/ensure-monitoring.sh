#!/usr/bin/env bash
# Installs Debian's Prometheus (promtool) and prometheus-postgres-exporter 0.11, once, for the
# metrics tests (tests/integration/test_metrics.py). Prints nothing on stdout.
set -euo pipefail
SUDO=""; [ "$(id -u)" = 0 ] || SUDO=sudo
installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q "install ok installed"; }
if ! installed prometheus || ! installed prometheus-postgres-exporter; then
    echo "==> installing prometheus and prometheus-postgres-exporter from Debian" >&2
    $SUDO apt-get update -qq >&2 || true
    # No service is started: the tests run their own exporter and only use promtool.
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends \
        prometheus prometheus-postgres-exporter >&2
fi
