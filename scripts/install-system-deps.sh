#!/usr/bin/env bash
# System packages the tests need (Prometheus, Alertmanager, promtool, amtool, systemd-analyze).
# Idempotent: skips apt when everything is already there.
set -euo pipefail
need=()
for bin in prometheus promtool alertmanager amtool; do
  command -v "$bin" >/dev/null 2>&1 || need+=("$bin")
done
if [ ${#need[@]} -eq 0 ]; then exit 0; fi
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends prometheus prometheus-alertmanager >/dev/null
