#!/usr/bin/env bash
# One command for a newcomer: set up .venv, prepare the Shakespeare corpus, train the debug_cpu
# Engram-MoE model, evaluate it, and leave metrics, checkpoints and W&B files under runs/quickstart.
# Extra arguments are Hydra overrides, e.g.  bash launchers/quickstart.sh trainer.max_steps=50
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
source "$ROOT/tools/setup_env.sh"
cd "$ROOT"
echo "[quickstart] preparing data"
python tools/prepare_data.py   # the debug_cpu data settings are the defaults; the trainer re-prepares if overrides change them
echo "[quickstart] training"
# A fresh quick-start each time: pass trainer.resume=true to continue the last one instead.
engram-train experiment=debug_cpu trainer.resume=false "$@"
RUN_DIR="$(python -c "
import sys
from engram_train.config.store import compose
print(compose(['experiment=debug_cpu'] + sys.argv[1:]).run.dir)" "$@")"
python tools/summarize_run.py "$RUN_DIR"
echo "[quickstart] what the model says (tools/generate.py)"
python tools/generate.py "$RUN_DIR" --prompt "ROMEO:" --max-new-tokens 32 --seed 0
