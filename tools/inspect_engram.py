"""What the Engram layers of a checkpoint learned: gates, table rows touched, row norms.

    python tools/inspect_engram.py runs/quickstart/checkpoints --out inspect/            # the latest checkpoint
    python tools/inspect_engram.py runs/quickstart/checkpoints/step_00000300 --out inspect/
    python tools/inspect_engram.py OLD_RUN/checkpoints --out inspect/ experiment=debug_cpu   # run without config.yaml

CHECKPOINT is a ``step_N`` directory, a run's ``checkpoints/`` (its latest complete checkpoint) or
a run directory.  The configuration is the run's ``config.yaml`` (written by ``engram-train``); any
``key=value`` arguments override it (or, for runs without one, compose it like ``engram-train``).
The checkpoint is loaded, whatever layout wrote it (TP, EP, DP, ``engram.partition``, host
residency), through the trainer's checkpoint code into a one-process model (TP=1, replicated
tables, device residency); docs/checkpoints.md.

Per Engram layer it prints and plots (into ``--out``):
  gates_layer<L>.png   the gate alpha over token positions for ``--sequences`` validation sequences
                       (heatmap), its histogram over the validation batch, and per n-gram order the
                       gated norm of that order's share of the value, alpha * ||W_v[:, order] e_order||
  rows_layer<L>.png    row-norm histograms of touched and untouched table rows, per n-gram order
  report.json          the numbers printed

The gate: one scalar per token and per residual branch (``hc_mult``; 1 here), computed from all
n-gram orders together (docs/engram.md), so there is no gate per n-gram order.  What is per order is
each order's share of the gated value, which the third panel shows instead.

"Touched" (a row some training step updated):
  engram.optimizer=sparse_adam   the row's step count is > 0
  engram.optimizer=adam          the row differs from its initial value (rebuilt from the seed); with
                                 engram.table_weight_decay > 0 every row moves, so then: the row's second
                                 moment is nonzero (until it underflows in fp32: about 1,500 steps
                                 after the row's last update at adam_beta2=0.95, 800 at 0.9)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
from typing import Dict, List, Optional, Tuple

os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _fail(msg: str) -> None:
    from engram_train.errors import UserError

    raise UserError(msg)


def resolve_checkpoint(path: str) -> Tuple[str, str]:
    """(checkpoint step directory, run directory) for a step dir, a checkpoints/ dir or a run dir."""
    from engram_train.train.checkpoint import Checkpointer

    path = os.path.abspath(path)
    if os.path.isfile(os.path.join(path, "meta.json")):
        return path, os.path.dirname(os.path.dirname(path))
    root = path if not os.path.isdir(os.path.join(path, "checkpoints")) else os.path.join(path, "checkpoints")
    if not os.path.isdir(root):
        _fail(f"{path} is not a directory; pass a step_N checkpoint, a run's checkpoints/ or a run directory")
    found = Checkpointer(root).latest_dir()
    if found is None:
        _fail(f"no complete checkpoint under {root}; pass a step_N directory that holds meta.json")
    return found, os.path.dirname(root)


def load_config(run_dir: str, overrides: List[str]):
    from omegaconf import OmegaConf

    from engram_train.config.schema import Config, ConfigError
    from engram_train.config.store import compose

    path = os.path.join(run_dir, "config.yaml")
    try:
        if os.path.isfile(path):
            saved = OmegaConf.to_container(OmegaConf.load(path))
            saved = {k: v for k, v in saved.items() if k not in ("experiment", "overrides")}
            merged = OmegaConf.merge(OmegaConf.structured(Config), saved, OmegaConf.from_dotlist(overrides))
            return OmegaConf.to_object(merged)
        if not overrides:
            _fail(f"no config.yaml in {run_dir} (a run from before engram-train wrote one); pass the run's "
                  "overrides, e.g. experiment=debug_cpu")
        return compose(overrides)
    except ConfigError as e:
        _fail(f"invalid configuration: {e}")


def one_process(cfg, scratch: str):
    """``cfg`` at a one-process layout that any checkpoint loads into (docs/checkpoints.md: resharding)."""
    p, e, t = cfg.parallel, cfg.engram, cfg.trainer
    p.tensor_parallel = p.expert_parallel = 1
    p.sequence_parallel = None
    p.offload_optimizer = "none"
    e.partition, e.residency, e.host_dir, e.staleness = "replicated", "device", None, 0
    t.resume, t.progress = False, False
    t.eval_iters = 1
    cfg.data.micro_batch_size = cfg.data.global_batch_size if cfg.data.global_batch_size < cfg.data.micro_batch_size \
        else cfg.data.micro_batch_size
    cfg.run.dir, cfg.run.wandb_mode = scratch, "disabled"
    return cfg


@contextlib.contextmanager
def loaded_checkpoint(checkpoint: str, overrides: List[str] = (), check=None):
    """The run of ``checkpoint`` in this one process at the checkpoint's state: yields ``(trainer, cfg,
    step_dir, step, init)``, where ``init`` holds each layer's table rows as initialized (what training
    changed is what differs).  ``check(cfg, run_dir)`` may refuse the run before anything is built."""
    step_dir, run_dir = resolve_checkpoint(checkpoint)
    cfg = load_config(run_dir, list(overrides))
    if check is not None:
        check(cfg, run_dir)
    with tempfile.TemporaryDirectory(prefix="engram_train_checkpoint_") as scratch:
        from engram_train.parallel.state import destroy_parallel
        from engram_train.train.trainer import Trainer, seed_everything

        cfg = one_process(cfg, scratch)
        seed_everything(cfg.trainer.seed)
        trainer = Trainer(cfg)
        try:
            store = trainer.table_store
            init = {} if store is None else {l: s.weight.detach().clone() for l, s in store.shards.items()}
            trainer.checkpointer.load(trainer.engine, path=step_dir, table_store=store,
                                      expect={"data_fingerprint": trainer.data.fingerprint})
            with open(os.path.join(step_dir, "meta.json")) as f:
                step = json.load(f)["step"]
            yield trainer, cfg, step_dir, step, init
        finally:
            trainer.logger.close()
            destroy_parallel()


def touched_rows(shard, init, weight_decay: float) -> Tuple[object, str]:
    opt = shard.optimizer
    if hasattr(opt, "row_steps"):
        return opt.row_steps > 0, "row step count > 0 (sparse_adam)"
    if weight_decay == 0:
        return (shard.weight != init).any(dim=1), "row differs from its initial value (adam, no weight decay)"
    return (opt.exp_avg_sq != 0).any(dim=1), "second moment nonzero (adam with weight decay)"


class GateProbe:
    """Captures one block's hidden states and looked-up rows on a forward, and recomputes the gate from them
    with the block's own modules (its forward reads their weights in fused functions)."""

    def __init__(self, block):
        self.block = block
        self.hidden = self.rows = None
        self.handles = [
            block.register_forward_pre_hook(lambda m, args: setattr(self, "hidden", args[0].detach())),
            block.table.register_forward_hook(lambda m, i, o: setattr(self, "rows", o.detach())),
        ]

    def gate(self):
        """alpha [B, T, G], the formula of EngramBlock.fuse (docs/engram.md), checked against the block's own mean."""
        import torch

        from engram_train.engram.fused import GATE_FLOOR

        b = self.block
        G, h = b.hc_mult, b.hidden_size
        e = self.rows.reshape(*self.rows.shape[:2], -1).to(b.value_proj.weight.dtype)
        with torch.no_grad():
            key = b.key_norm(b.key_proj(e).unflatten(-1, (G, h)))
            query = b.query_norm(self.hidden)
        g = (key * query).sum(dim=-1) / math.sqrt(h)
        alpha = (g.abs().clamp_min(GATE_FLOOR).sqrt() * g.sign()).sigmoid().float()
        want = float(self.block.last_gate_mean)
        if abs(float(alpha.mean()) - want) > 1e-4 * max(1.0, abs(want)):
            raise RuntimeError(f"recomputed gate mean {float(alpha.mean())} != the block's {want}: "
                               "EngramBlock.fuse changed; update GateProbe.gate")
        return alpha

    def order_shares(self, alpha):
        """Per n-gram order n: alpha * ||W_v[:, block n] e_n|| per token, [orders, B, T]."""
        b = self.block
        e = self.rows.reshape(*self.rows.shape[:2], -1).to(b.value_proj.weight.dtype)
        d = b.n_embed_per_ngram
        out = []
        for i in range(b.max_ngram - 1):
            part = e[..., i * d:(i + 1) * d] @ b.value_proj.weight[:, i * d:(i + 1) * d].T
            out.append(alpha.mean(dim=-1) * part.norm(dim=-1).float())
        import torch

        return torch.stack(out)

    def remove(self):
        for h in self.handles:
            h.remove()


def inspect(checkpoint: str, out: str, overrides: List[str] = (), sequences: int = 4) -> Dict:
    import torch

    from engram_train.train.evaluate import forward_per_token, to_device

    def check(cfg, run_dir):
        if not cfg.engram.enabled:
            _fail(f"the run in {run_dir} has no Engram layers (engram.enabled=false): nothing to inspect")
        os.makedirs(out, exist_ok=True)

    with loaded_checkpoint(checkpoint, overrides, check) as (trainer, cfg, step_dir, step, init):
        store = trainer.table_store
        model = trainer.model
        probes = {l: GateProbe(b) for l, b in model.engram_blocks().items()}
        model.eval()
        batch = to_device(trainer.valid_batches[0], trainer.device)
        with torch.no_grad():
            forward_per_token(model, batch)
        report = {"checkpoint": step_dir, "step": step, "tokens": list(batch["tokens"].shape),
                  "layers": {}}
        for layer_id, probe in probes.items():
            alpha = probe.gate()
            with torch.no_grad():
                shares = probe.order_shares(alpha)
            probe.remove()
            shard = store.shards[layer_id]
            touched, rule = touched_rows(shard, init[layer_id], cfg.engram.table_weight_decay)
            norms = shard.weight.norm(dim=1)
            sizes = list(shard.spec.table_sizes)
            k = cfg.engram.heads_per_ngram
            order_of_row = torch.repeat_interleave(
                torch.tensor([2 + j // k for j in range(len(sizes))]), torch.tensor(sizes))
            orders = {}
            for n in range(2, cfg.engram.max_ngram + 1):
                sel = order_of_row == n
                orders[str(n)] = {
                    "rows": int(sel.sum()), "touched_fraction": float(touched[sel].float().mean()),
                    "gated_value_norm_mean": float(shares[n - 2].mean()),
                }
            report["layers"][str(layer_id)] = {
                "gate_mean": float(alpha.mean()), "gate_std": float(alpha.std()),
                "gate_quantiles": {q: float(alpha.flatten().quantile(float(q))) for q in ("0.05", "0.5", "0.95")},
                "rows": int(touched.numel()), "touched_rows": int(touched.sum()),
                "touched_fraction": float(touched.float().mean()), "touched_rule": rule,
                "row_norm_touched_mean": float(norms[touched].mean()) if touched.any() else None,
                "row_norm_untouched_mean": float(norms[~touched].mean()) if (~touched).any() else None,
                "orders": orders,
            }
            _plot_layer(out, layer_id, step, alpha, shares, norms, touched, order_of_row, sequences, rule)
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump(report, f, indent=2)
    return report


def _plot_layer(out, layer_id, step, alpha, shares, norms, touched, order_of_row, sequences, rule):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.rcParams.update({"font.size": 10})
    a = alpha.mean(dim=-1).cpu().numpy()   # [B, T] (mean over residual branches; one with hc_mult=1)
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5), gridspec_kw={"width_ratios": [2.2, 1, 1]})
    im = axes[0].imshow(a[:sequences], aspect="auto", interpolation="nearest", cmap="viridis", vmin=0, vmax=1)
    axes[0].set_yticks(range(min(sequences, a.shape[0])))
    axes[0].set_xlabel("token position")
    axes[0].set_ylabel("validation sequence")
    axes[0].set_title("gate α per token")
    fig.colorbar(im, ax=axes[0], label="α (sigmoid gate)")
    axes[1].hist(a.flatten(), bins=50, range=(0, 1), color="C0")
    axes[1].set_xlabel("gate α")
    axes[1].set_ylabel("tokens")
    axes[1].set_title(f"gate over the batch (mean {a.mean():.3f})")
    orders = list(range(2, 2 + shares.shape[0]))
    axes[2].bar([f"{n}-gram" for n in orders], [float(s.mean()) for s in shares], color="C1")
    axes[2].set_ylabel("mean α·‖W_v e_n‖")
    axes[2].set_title("gated value norm per n-gram order")
    fig.suptitle(f"Engram layer {layer_id} (0-based), checkpoint step {step}")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"gates_layer{layer_id}.png"))
    plt.close(fig)

    n_orders = shares.shape[0]
    fig, axes = plt.subplots(1, n_orders, figsize=(6 * n_orders, 4.2), squeeze=False)
    hi = float(norms.max())
    for i, n in enumerate(orders):
        ax = axes[0][i]
        sel = order_of_row == n
        for mask, name, color in ((touched & sel, "touched", "C3"), (~touched & sel, "untouched", "C7")):
            vals = norms[mask].cpu().numpy()
            if len(vals):
                ax.hist(vals, bins=60, range=(0, hi), alpha=0.6, color=color, density=True,
                        label=f"{name}: {len(vals):,} rows")
        ax.set_xlabel("row L2 norm")
        ax.set_ylabel("density")
        frac = float(touched[sel].float().mean())
        ax.set_title(f"{n}-gram rows: {100 * frac:.2f}% touched")
        ax.legend(fontsize=9)
    fig.suptitle(f"Engram layer {layer_id}: table row norms, checkpoint step {step} (touched: {rule})")
    fig.tight_layout()
    fig.savefig(os.path.join(out, f"rows_layer{layer_id}.png"))
    plt.close(fig)


def _num(x) -> str:
    return "-" if x is None else f"{x:.4f}"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint", help="a step_N directory, a run's checkpoints/ (its latest) or a run directory")
    ap.add_argument("overrides", nargs="*", help="key=value overrides of the run's configuration")
    ap.add_argument("--out", required=True, help="directory for the plots and report.json")
    ap.add_argument("--sequences", type=int, default=4, help="validation sequences in the gate heatmap")
    args = ap.parse_intermixed_args(argv)   # overrides may come after --out
    import logging

    logging.basicConfig(level=logging.WARNING)
    report = inspect(args.checkpoint, args.out, args.overrides, args.sequences)
    print(f"checkpoint {report['checkpoint']} (step {report['step']}), validation batch {report['tokens']}")
    for layer_id, r in report["layers"].items():
        print(f"Engram layer {layer_id}: gate mean {r['gate_mean']:.4f} (std {r['gate_std']:.4f}); "
              f"rows touched {r['touched_rows']:,} / {r['rows']:,} = {100 * r['touched_fraction']:.2f}% "
              f"[{r['touched_rule']}]; mean row norm touched {_num(r['row_norm_touched_mean'])}, "
              f"untouched {_num(r['row_norm_untouched_mean'])}")
        for n, o in r["orders"].items():
            print(f"  {n}-gram: {o['rows']:,} rows, {100 * o['touched_fraction']:.2f}% touched, "
                  f"mean gated value norm {o['gated_value_norm_mean']:.4f}")
    print(f"plots and report.json in {args.out}")
    return 0


if __name__ == "__main__":
    from engram_train.errors import run_main

    sys.exit(run_main(main, prog="inspect_engram"))
