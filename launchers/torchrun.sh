#!/usr/bin/env bash
# Multi-process training on one node: bash launchers/torchrun.sh NPROC [hydra overrides...]
#   bash launchers/torchrun.sh 2 experiment=debug_cpu parallel.tensor_parallel=2
# CPU machines use gloo, CUDA machines NCCL (parallel.backend=auto).
# Preemption: SIGTERM or SIGUSR1 to this process stops every rank after the step in flight with a
# checkpoint and exits 0; the same command resumes (trainer.resume=true, the default).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
NPROC="${1:?usage: launchers/torchrun.sh NPROC [overrides...]}"
shift
source "$ROOT/tools/setup_env.sh"
cd "$ROOT"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
exec python -m engram_train.torchrun --standalone --nproc-per-node "$NPROC" -m engram_train.train.main "$@"
