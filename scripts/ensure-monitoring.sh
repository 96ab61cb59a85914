#!/usr/bin/env bash
# Installs Debian's Prometheus (promtool) and prometheus-postgres-exporter 0.11, once, for the
# metrics tests (tests/integration/test_metrics.py). Prints nothing on stdout.
set -euo pipefail
# No service is started: the tests run their own exporter and only use promtool.
"$(dirname "$0")/ensure-debian-packages.sh" --no-install-recommends prometheus prometheus-postgres-exporter
