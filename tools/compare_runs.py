"""Compare training runs grouped by experiment: a Markdown table and PNG plots.

    python tools/compare_runs.py runs/multirun/2026-11-25_18-00-00 --out cmp/
    python tools/compare_runs.py runs/a runs/b runs/c --out cmp/ --diff debug_cpu moe_baseline_cpu

Each PATH is a run directory (it holds ``metrics.jsonl``) or a directory searched for run
directories (a Hydra sweep: ``engram-train -m ...``).  Runs are grouped by the experiment named in
their ``config.yaml`` (written by ``engram-train``), plus the overrides that differ between runs
(``trainer.seed`` and ``run.dir`` excepted: seeds are what a group averages over).  A run without
``config.yaml`` (older runs) is its own group, named after its directory, and has no token axis.

Writes into ``--out``:
  summary.md         per experiment: seeds, final train loss, final val loss and perplexity,
                     best val loss, tokens trained, tokens/s (mean +- sample std over seeds), and
                     the difference B - A between two experiments with its spread over seeds
  summary.json       the same numbers
  loss_vs_step.png   training and validation loss against step (mean, +-1 std band, each seed thin)
  loss_vs_tokens.png the same against tokens trained
  diff_vs_step.png   B - A of training and validation loss against step, with its spread
  tokens_per_s.png   throughput against step

Definitions (docs/benchmarks.md): "final" is the last step every seed of the group logged;
tokens/s of a run is the mean over its logged steps, the first one excepted when there are several
(its interval includes start-up); the difference is paired by seed when both experiments have the same
seeds (mean and std of the per-seed differences), else the difference of the means with spread
sqrt(sA^2 + sB^2) (the spread of one B run minus one A run).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple

from engram_train.errors import UserError

SKIP_OVERRIDES = ("trainer.seed", "run.dir", "hydra.")


@dataclass
class Run:
    path: str
    experiment: str
    seed: Optional[int]
    tokens_per_step: Optional[int]
    overrides: List[str]
    rows: List[dict] = field(default_factory=list)
    label: str = ""

    def series(self, key: str) -> Dict[int, float]:
        return {int(r["step"]): float(r[key]) for r in self.rows if key in r and r[key] is not None}


# -- reading ---------------------------------------------------------------------------------------
def find_run_dirs(paths: List[str]) -> List[str]:
    found: List[str] = []
    for p in paths:
        if not os.path.isdir(p):
            raise UserError(f"{p} is not a directory; pass run directories or a sweep directory")
        if os.path.isfile(os.path.join(p, "metrics.jsonl")):
            found.append(p)
            continue
        for dirpath, dirnames, files in os.walk(p):
            dirnames[:] = sorted(d for d in dirnames if d not in ("checkpoints", "wandb"))
            if "metrics.jsonl" in files:
                found.append(dirpath)
    if not found:
        raise UserError(f"no metrics.jsonl under {' '.join(paths)}; did the runs start?")
    return found


def _read_jsonl(path: str) -> List[dict]:
    rows = []
    with open(path) as f:
        for line in f:
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except ValueError:   # a line cut short by a crash
                    continue
    return rows


def load_run(path: str) -> Run:
    cfg_path = os.path.join(path, "config.yaml")
    experiment, seed, tps, overrides = os.path.basename(os.path.normpath(path)), None, None, []
    if os.path.isfile(cfg_path):
        from omegaconf import OmegaConf

        cfg = OmegaConf.to_container(OmegaConf.load(cfg_path))
        experiment = cfg.get("experiment") or (cfg.get("run") or {}).get("name") or experiment
        seed = (cfg.get("trainer") or {}).get("seed")
        data = cfg.get("data") or {}
        if "global_batch_size" in data and "seq_length" in data:
            tps = int(data["global_batch_size"]) * int(data["seq_length"])
        overrides = [o for o in cfg.get("overrides") or []
                     if not o.split("=", 1)[0].lstrip("+~").startswith(SKIP_OVERRIDES)
                     and not o.startswith("experiment=")]
    return Run(path=path, experiment=str(experiment), seed=seed, tokens_per_step=tps, overrides=overrides,
               rows=_read_jsonl(os.path.join(path, "metrics.jsonl")))


def group_runs(runs: List[Run]) -> Dict[str, List[Run]]:
    """Experiment name plus the overrides not shared by every run, in first-seen order."""
    shared = set.intersection(*(set(r.overrides) for r in runs)) if runs else set()
    groups: Dict[str, List[Run]] = {}
    for r in runs:
        extra = [o for o in r.overrides if o not in shared]
        r.label = " ".join([r.experiment] + extra)
        groups.setdefault(r.label, []).append(r)
    for label, members in groups.items():
        members.sort(key=lambda r: (r.seed is None, r.seed if r.seed is not None else 0, r.path))
        seeds = [r.seed for r in members if r.seed is not None]
        if len(seeds) != len(set(seeds)):
            print(f"compare_runs: warning: {label} has several runs with the same seed "
                  f"({', '.join(r.path for r in members)})", file=sys.stderr)
    return groups


# -- statistics ------------------------------------------------------------------------------------
def mean_std(values: List[float]) -> Tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value)."""
    n = len(values)
    m = sum(values) / n
    if n < 2:
        return m, 0.0
    return m, math.sqrt(sum((v - m) ** 2 for v in values) / (n - 1))


def common_steps(members: List[Run], key: str) -> List[int]:
    sets = [set(r.series(key)) for r in members]
    return sorted(set.intersection(*sets)) if sets else []


def aggregate(members: List[Run], key: str) -> Tuple[List[int], List[float], List[float]]:
    steps = common_steps(members, key)
    series = [r.series(key) for r in members]
    ms = [mean_std([s[t] for s in series]) for t in steps]
    return steps, [m for m, _ in ms], [s for _, s in ms]


def run_tokens_per_s(run: Run) -> Optional[float]:
    vals = [v for _, v in sorted(run.series("tokens_per_s").items())]
    if not vals:
        return None
    if len(vals) > 1:
        vals = vals[1:]
    return sum(vals) / len(vals)


def summarize(members: List[Run]) -> dict:
    out: dict = {"runs": [r.path for r in members], "seeds": [r.seed for r in members], "n": len(members)}
    for key, name in (("loss", "train_loss"), ("val_loss", "val_loss"), ("val_ppl", "val_ppl")):
        steps = common_steps(members, key)
        if steps:
            last = steps[-1]
            out[f"final_{name}"] = mean_std([r.series(key)[last] for r in members])
            out[f"final_{name}_step"] = last
    vals = [r.series("val_loss") for r in members]
    if all(vals):
        out["best_val_loss"] = mean_std([min(v.values()) for v in vals])
    tps = [run_tokens_per_s(r) for r in members]
    if all(t is not None for t in tps):
        out["tokens_per_s"] = mean_std(tps)
    if "final_train_loss_step" in out and all(r.tokens_per_step for r in members):
        out["tokens"] = mean_std([out["final_train_loss_step"] * r.tokens_per_step for r in members])
    return out


def difference(a: List[Run], b: List[Run], key: str) -> Tuple[List[int], List[float], List[float], bool]:
    """B - A of ``key`` at the steps both experiments logged for every seed: (steps, mean, spread, paired)."""
    steps = sorted(set(common_steps(a, key)) & set(common_steps(b, key)))
    seeds_a, seeds_b = [r.seed for r in a], [r.seed for r in b]
    paired = (None not in seeds_a and None not in seeds_b and sorted(seeds_a) == sorted(seeds_b)
              and len(set(seeds_a)) == len(seeds_a))
    means, spreads = [], []
    if paired:
        sa = {r.seed: r.series(key) for r in a}
        sb = {r.seed: r.series(key) for r in b}
        for t in steps:
            m, s = mean_std([sb[seed][t] - sa[seed][t] for seed in sa])
            means.append(m)
            spreads.append(s)
    else:
        for t in steps:
            ma, sa_ = mean_std([r.series(key)[t] for r in a])
            mb, sb_ = mean_std([r.series(key)[t] for r in b])
            means.append(mb - ma)
            # The spread of one B run minus one A run, the same scale as the paired case's std of
            # per-seed differences (not the standard error of the difference of means).
            spreads.append(math.sqrt(sa_ ** 2 + sb_ ** 2))
    return steps, means, spreads, paired


# -- output ----------------------------------------------------------------------------------------
def _fmt(ms, digits: int = 4) -> str:
    if ms is None:
        return "-"
    m, s = ms
    return f"{m:.{digits}f} ± {s:.{digits}f}"


def _fmt_big(ms) -> str:
    if ms is None:
        return "-"
    m, s = ms
    return f"{m:,.0f} ± {s:,.0f}"


def markdown(groups: Dict[str, List[Run]], summaries: Dict[str, dict], diffs: List[dict]) -> str:
    lines = ["# Run comparison", "",
             "Mean ± sample standard deviation over seeds. \"final\": the last step every seed of the "
             "experiment logged (step in brackets).", "",
             "| experiment | seeds | final step | final train loss | final val loss | final val ppl "
             "| best val loss | tokens | tokens/s |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for label, s in summaries.items():
        seeds = ",".join("?" if x is None else str(x) for x in s["seeds"])
        lines.append(
            f"| {label} | {s['n']} ({seeds}) | {s.get('final_train_loss_step', '-')} "
            f"| {_fmt(s.get('final_train_loss'))} "
            f"| {_fmt(s.get('final_val_loss'))} [{s.get('final_val_loss_step', '-')}] "
            f"| {_fmt(s.get('final_val_ppl'), 2)} | {_fmt(s.get('best_val_loss'))} "
            f"| {_fmt_big(s.get('tokens'))} | {_fmt_big(s.get('tokens_per_s'))} |")
    for d in diffs:
        lines += ["", f"## {d['b']} − {d['a']}", "",
                  ("Paired by seed: mean ± std of the per-seed differences." if d["paired"] else
                   "Seeds differ: difference of the means, spread sqrt(sA² + sB²)."),
                  "Negative: B has the lower loss.", "",
                  "| metric | step | B − A |", "|---|---:|---:|"]
        for key in ("loss", "val_loss"):
            if d[key]["steps"]:
                lines.append(f"| {'train loss' if key == 'loss' else 'val loss'} | {d[key]['steps'][-1]} "
                             f"| {d[key]['mean'][-1]:+.4f} ± {d[key]['spread'][-1]:.4f} |")
    return "\n".join(lines) + "\n"


def _title(groups: Dict[str, List[Run]], what: str) -> str:
    names = " vs ".join(f"{label} ({len(m)} seed{'s' if len(m) != 1 else ''})" for label, m in groups.items())
    return f"{what}: {names}"


def plot(groups: Dict[str, List[Run]], diffs: List[dict], out: str) -> List[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from matplotlib.ticker import MaxNLocator

    plt.rcParams.update({"font.size": 11, "axes.grid": True, "grid.alpha": 0.3, "figure.dpi": 110})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    written = []

    def band(ax, xs, mean, std, color, label):
        ax.plot(xs, mean, color=color, lw=2, label=label)
        if any(std):
            ax.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)],
                            color=color, alpha=0.2, lw=0)

    for axis in ("step", "tokens"):
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        drawn = False
        for i, (label, members) in enumerate(groups.items()):
            c = colors[i % len(colors)]
            if axis == "tokens" and not all(r.tokens_per_step for r in members):
                continue
            for ax, key, name in ((axes[0], "loss", "training loss"), (axes[1], "val_loss", "validation loss")):
                steps, mean, std = aggregate(members, key)
                if not steps:
                    continue
                tps = members[0].tokens_per_step if axis == "tokens" else 1
                xs = [t * tps for t in steps]
                for r in members:
                    s = r.series(key)
                    ax.plot([t * (r.tokens_per_step if axis == "tokens" else 1) for t in sorted(s)],
                            [s[t] for t in sorted(s)], color=c, lw=0.6, alpha=0.35)
                band(ax, xs, mean, std, c, f"{label} (n={len(members)}, mean ± std)")
                drawn = True
        if not drawn:
            plt.close(fig)
            continue
        for ax, name in ((axes[0], "training loss"), (axes[1], "validation loss")):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("optimizer step" if axis == "step" else "tokens trained")
            ax.set_ylabel(f"{name} (nats/token)")
            ax.set_title(name)
            if ax.lines:
                ax.legend(fontsize=9)
        fig.suptitle(_title(groups, f"Loss against {axis}"))
        fig.tight_layout()
        path = os.path.join(out, f"loss_vs_{axis}.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    for d in diffs:
        fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
        for ax, key, name in ((axes[0], "loss", "training loss"), (axes[1], "val_loss", "validation loss")):
            dd = d[key]
            if dd["steps"]:
                band(ax, dd["steps"], dd["mean"], dd["spread"], colors[0],
                     f"{d['b']} − {d['a']} ({'paired by seed' if d['paired'] else 'unpaired'})")
                ax.legend(fontsize=9)
            ax.axhline(0.0, color="k", lw=0.8)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.set_xlabel("optimizer step")
            ax.set_ylabel(f"Δ {name} (nats/token)")
            ax.set_title(f"Δ {name} (below 0: {d['b']} is better)")
        fig.suptitle(f"Difference {d['b']} − {d['a']} ({d['n_a']} vs {d['n_b']} seeds, ± std)")
        fig.tight_layout()
        path = os.path.join(out, "diff_vs_step.png" if len(diffs) == 1 else
                            f"diff_vs_step_{len(written)}.png")
        fig.savefig(path)
        plt.close(fig)
        written.append(path)

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for i, (label, members) in enumerate(groups.items()):
        steps, mean, std = aggregate(members, "tokens_per_s")
        if steps:
            band(ax, steps, mean, std, colors[i % len(colors)], f"{label} (n={len(members)})")
    if ax.lines:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("throughput (tokens/s, whole job)")
        ax.legend(fontsize=9)
        fig.suptitle(_title(groups, "Throughput"), fontsize=11)
        fig.tight_layout()
        path = os.path.join(out, "tokens_per_s.png")
        fig.savefig(path)
        written.append(path)
    plt.close(fig)
    return written


def compare(paths: List[str], out: str, diff: Optional[List[str]] = None, plots: bool = True) -> dict:
    runs = [load_run(p) for p in find_run_dirs(paths)]
    groups = group_runs(runs)
    summaries = {label: summarize(members) for label, members in groups.items()}
    pairs: List[Tuple[str, str]] = []
    if diff:
        for name in diff:
            if name not in groups:
                raise UserError(f"--diff {name!r} is not an experiment here; "
                                 f"choose among {', '.join(repr(g) for g in groups)}")
        pairs = [(diff[0], diff[1])]
    elif len(groups) >= 2:
        labels = list(groups)
        pairs = [(labels[0], labels[1])]
    diffs = []
    for a, b in pairs:
        d = {"a": a, "b": b, "n_a": len(groups[a]), "n_b": len(groups[b])}
        for key in ("loss", "val_loss"):
            steps, mean, spread, paired = difference(groups[a], groups[b], key)
            d[key] = {"steps": steps, "mean": mean, "spread": spread}
            d["paired"] = paired
        diffs.append(d)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "summary.md"), "w") as f:
        f.write(markdown(groups, summaries, diffs))
    with open(os.path.join(out, "summary.json"), "w") as f:
        json.dump({"experiments": summaries, "differences": diffs}, f, indent=2)
    written = plot(groups, diffs, out) if plots else []
    return {"summaries": summaries, "differences": diffs, "plots": written}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("paths", nargs="+", help="run directories, or directories holding them (a sweep)")
    ap.add_argument("--out", required=True, help="directory for summary.md, summary.json and the plots")
    ap.add_argument("--diff", nargs=2, metavar=("A", "B"),
                    help="plot and tabulate B - A (default: the first two experiments found)")
    args = ap.parse_args(argv)
    res = compare(args.paths, args.out, args.diff)
    with open(os.path.join(args.out, "summary.md")) as f:
        print(f.read())
    print("plots: " + ", ".join(res["plots"]))
    return 0


if __name__ == "__main__":
    from engram_train.errors import run_main

    sys.exit(run_main(main, prog="compare_runs"))
