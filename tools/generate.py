#!/usr/bin/env python
"""Sample text from a checkpoint: what the model says after a prompt.

    python tools/generate.py runs/quickstart --prompt "ROMEO:"                      # the latest checkpoint
    python tools/generate.py runs/quickstart/checkpoints/step_00000300 --prompt "To be" --temperature 0.7 --top-k 40
    python tools/generate.py OLD_RUN --prompt "Hi" experiment=debug_cpu             # run without config.yaml

CHECKPOINT is a ``step_N`` directory, a run's ``checkpoints/`` (its latest) or a run directory.
Whatever layout wrote it (TP, EP, DP, ``engram.partition``, host residency), it is loaded into one
process (TP=1, replicated device tables) through the trainer's checkpoint code, as
``tools/inspect_engram.py`` does.  The model runs by plain recompute (no KV cache); Engram hash ids
are kept incrementally (engram_train/generate.py).  Temperature 0 is greedy decoding.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys

os.environ.setdefault("DS_ACCELERATOR", "cpu")
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))


def sample(checkpoint: str, prompt: str, overrides=(), max_new_tokens: int = 64, temperature: float = 0.8,
           top_k: int = 50, top_p: float = 0.95, seed: int = 0) -> dict:
    from inspect_engram import loaded_checkpoint

    from engram_train.errors import UserError
    from engram_train.generate import generate

    with loaded_checkpoint(checkpoint, overrides) as (trainer, cfg, step_dir, step, _):
        tok = trainer.data.tokenizer
        prompt_ids = tok.encode(prompt)
        if not prompt_ids:
            raise UserError(f"--prompt={prompt!r} encodes to no token; give some text")
        out = generate(trainer.model, trainer.hasher, prompt_ids, max_new_tokens=max_new_tokens,
                       max_seq_length=cfg.model.max_seq_length, vocab_size=tok.vocab_size,
                       temperature=temperature, top_k=top_k, top_p=top_p, eos_id=tok.eos_id, seed=seed,
                       device=trainer.device)
    return {"checkpoint": step_dir, "step": step, "prompt": prompt, "text": tok.decode(out["ids"]),
            "new_tokens": len(out["ids"]), "tokens_per_s": out["tokens_per_s"], "device": str(trainer.device)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a step_N directory, a run's checkpoints/ (its latest) or a run directory")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the run's configuration")
    ap.add_argument("--prompt", required=True)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--temperature", type=float, default=0.8, help="0: greedy")
    ap.add_argument("--top-k", type=int, default=50, help="0: off")
    ap.add_argument("--top-p", type=float, default=0.95, help="1: off")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    args = ap.parse_intermixed_args(argv)
    from engram_train.errors import UserError

    if args.max_new_tokens < 1 or args.temperature < 0 or args.top_k < 0 or not 0 < args.top_p <= 1:
        raise UserError(f"--max-new-tokens={args.max_new_tokens} (>= 1), --temperature={args.temperature} (>= 0), "
                        f"--top-k={args.top_k} (>= 0), --top-p={args.top_p} (in (0, 1]): one is out of range")
    logging.basicConfig(level=logging.WARNING)
    r = sample(args.checkpoint, args.prompt, args.overrides, args.max_new_tokens, args.temperature, args.top_k,
               args.top_p, args.seed)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        print(f"[step {r['step']}, {r['new_tokens']} tokens at {r['tokens_per_s']:.1f} tokens/s on {r['device']}, "
              f"plain recompute]\n{r['prompt']}{r['text']}")
    return 0


if __name__ == "__main__":
    from engram_train.errors import run_main

    sys.exit(run_main(main, prog="generate"))
