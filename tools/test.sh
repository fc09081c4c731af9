#!/usr/bin/env bash
# Sets up (or reuses) .venv and runs the test suite: unit, distributed (gloo, several processes)
# and GPU tiers (the GPU tier skips without CUDA). Extra arguments go to pytest.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/tools/setup_env.sh"
cd "$ROOT"
exec python -m pytest -q -ra --timeout=900 "$@" tests
