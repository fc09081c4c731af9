#!/usr/bin/env bash
# Sets up (or reuses) .venv and runs the test suite: unit, distributed (gloo, several processes)
# and GPU tiers (the GPU tier skips without CUDA). Extra arguments go to pytest.
# Test files run on ENGRAM_TEST_WORKERS pytest-xdist workers (default 2; 0 runs in one process).
# --dist loadfile keeps a file's tests on one worker, so module-scoped oracle runs are shared.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/tools/setup_env.sh"
cd "$ROOT"
exec python -m pytest -q -ra --timeout=900 -n "${ENGRAM_TEST_WORKERS:-2}" --dist loadfile "$@" tests
