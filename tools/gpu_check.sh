#!/usr/bin/env bash
# The whole GPU evidence in one command (docs/benchmarks.md): sets up (or reuses) .venv, then runs
# tools/gpu_check.py, which writes gpu_report.json and gpu_report.md to $OUT (else ./gpu_report/).
# Exits non-zero only when a correctness check failed. Extra arguments go to the driver.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/tools/setup_env.sh"
cd "$ROOT"
exec python tools/gpu_check.py "$@"
