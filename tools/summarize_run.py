"""Print the evaluation history of a run from its metrics.jsonl: python tools/summarize_run.py RUN_DIR"""

import json
import os
import sys

from engram_train.errors import DataError, MissingInputError, run_main


def main(run_dir: str) -> int:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        raise MissingInputError(f"no metrics at {path}: give the run.dir of a run that has started")
    rows = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{lineno}: not a JSON line ({e.msg}); the file is not a metrics.jsonl "
                                "written by engram-train, or it was cut mid-line") from None
    evals = [r for r in rows if "val_loss" in r]
    for r in evals:
        print(f"step {r['step']:>6}  val_loss {r['val_loss']:.4f}  val_ppl {r['val_ppl']:.1f}")
    if len(evals) >= 2:
        first, last = evals[0]["val_loss"], evals[-1]["val_loss"]
        print(f"val_loss {first:.4f} -> {last:.4f} ({100 * (first - last) / first:.1f}% lower)")
    train = [r for r in rows if "tokens_per_s" in r]
    if train:
        print(f"last logged step {train[-1]['step']}: loss {train[-1]['loss']:.4f}, "
              f"{train[-1]['tokens_per_s']:.0f} tokens/s")
    ckpt = os.path.join(run_dir, "checkpoints", "latest")
    if os.path.isfile(ckpt):
        print(f"latest checkpoint: {os.path.join(run_dir, 'checkpoints', open(ckpt).read().strip())}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main, sys.argv[1] if len(sys.argv) > 1 else "runs/quickstart", prog="summarize_run"))
