"""What the Lngram layers of a checkpoint learned: route symbols, table rows touched, readout mass on the sink.

    python tools/inspect_lngram.py runs/lngram_cpu/checkpoints --out inspect_lngram/
    python tools/inspect_lngram.py runs/lngram_cpu/checkpoints/step_00000300 --out inspect_lngram/

CHECKPOINT and the configuration are found as by ``tools/inspect_engram.py`` (any layout loads into
one process).  On one validation batch, per Lngram layer (docs/lngram.md):

  symbols    per route, the distribution of its symbols over the batch's tokens: entropy in bits
             (at most engram.latent.bits; low = the route says little) and dead codes (symbols of
             the K = 2^bits that no token used)
  rows       per n-gram order, table rows touched by training (sparse_adam: step count > 0; adam:
             changed from their initial value) out of R K^n
  sink       the readout's mean mass on the zero sink (1 - mass on the routes)

and writes ``symbols_layer<L>.png`` (symbol counts per route) and ``report.json`` into ``--out``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("DS_ACCELERATOR", "cpu")

from inspect_engram import _fail, loaded_checkpoint, touched_rows  # noqa: E402


def symbol_stats(symbols, bits: int) -> Dict:
    """Per route of ``symbols [tokens, R]``: counts of each of the 2^bits symbols, entropy (bits), dead codes."""
    import torch

    K = 1 << bits
    R = symbols.shape[-1]
    counts = torch.stack([torch.bincount(symbols.reshape(-1, R)[:, r], minlength=K) for r in range(R)])   # [R, K]
    p = counts.double() / counts.sum(dim=1, keepdim=True).clamp_min(1)
    entropy = -(p * torch.where(p > 0, p.log2(), torch.zeros_like(p))).sum(dim=1)
    return {"counts": counts.tolist(), "entropy_bits": entropy.tolist(), "dead_codes": (counts == 0).sum(1).tolist()}


def inspect(checkpoint: str, out: str, overrides: List[str] = ()) -> Dict:
    import torch

    from engram_train.lngram.keys import order_offsets, table_layout
    from engram_train.train.evaluate import forward_per_token, to_device

    def check(cfg, run_dir):
        if not cfg.engram.enabled or cfg.engram.keys != "latent":
            _fail(f"the run in {run_dir} has no Lngram layers (engram.keys={cfg.engram.keys!r}, enabled="
                  f"{cfg.engram.enabled}); tools/inspect_engram.py inspects Engram's")
        os.makedirs(out, exist_ok=True)

    with loaded_checkpoint(checkpoint, overrides, check) as (trainer, cfg, step_dir, step, init):
        store = trainer.table_store
        lt = cfg.engram.latent
        model = trainer.model
        model.eval()
        batch = to_device(trainer.valid_batches[0], trainer.device)
        with torch.no_grad():
            forward_per_token(model, batch)
        report = {"checkpoint": step_dir, "step": step, "tokens": list(batch["tokens"].shape), "layers": {}}
        offsets = order_offsets(lt.routes, lt.bits, lt.orders)
        for layer_id, block in model.engram_blocks().items():
            stats = symbol_stats(block.last_symbols.cpu(), lt.bits)
            touched, rule = touched_rows(store.shards[layer_id], init[layer_id], cfg.engram.table_weight_decay)
            orders = {}
            for n, rows in zip(lt.orders, table_layout(lt.routes, lt.bits, lt.orders)):
                sel = touched[offsets[n]:offsets[n] + rows]
                orders[str(n)] = {"rows": rows, "touched_rows": int(sel.sum()),
                                  "touched_fraction": float(sel.float().mean())}
            report["layers"][str(layer_id)] = {
                "sink_mass_mean": 1.0 - float(block.last_gate_mean), "touched_rule": rule,
                "symbol_entropy_bits": stats["entropy_bits"], "dead_codes": stats["dead_codes"],
                "symbol_counts": stats["counts"], "orders": orders,
            }
            _plot(out, layer_id, step, stats["counts"])
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _plot(out, layer_id, step, counts):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 3))
    im = ax.imshow(counts, aspect="auto", cmap="viridis")
    ax.set_xlabel("symbol")
    ax.set_ylabel("route")
    ax.set_title(f"Lngram layer {layer_id}, step {step}: symbol counts on a validation batch")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"symbols_layer{layer_id}.png"), dpi=100)
    plt.close(fig)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a step_N directory, a run's checkpoints/ (its latest) or a run directory")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the run's configuration")
    ap.add_argument("--out", required=True, help="directory for the plots and report.json")
    args = ap.parse_intermixed_args(argv)
    import logging

    logging.basicConfig(level=logging.WARNING)
    report = inspect(args.checkpoint, args.out, args.overrides)
    print(f"checkpoint {report['checkpoint']} (step {report['step']}), validation batch {report['tokens']}")
    for layer_id, r in report["layers"].items():
        ent = r["symbol_entropy_bits"]
        print(f"Lngram layer {layer_id}: readout mass on the sink {r['sink_mass_mean']:.4f}; symbol entropy per "
              f"route {min(ent):.2f}..{max(ent):.2f} bits (mean {sum(ent) / len(ent):.2f}); dead codes per route "
              f"{r['dead_codes']}")
        for n, o in r["orders"].items():
            print(f"  {n}-gram: {o['touched_rows']:,} / {o['rows']:,} rows touched "
                  f"({100 * o['touched_fraction']:.2f}%) [{r['touched_rule']}]")
    print(f"plots and report.json in {args.out}")
    return 0


if __name__ == "__main__":
    from engram_train.errors import run_main

    sys.exit(run_main(main, prog="inspect_lngram"))
