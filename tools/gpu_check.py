"""The whole GPU evidence in one command: tests, kernel and offload benchmarks, Engram overhead, a training
run with host tables and its stop/resume; ``gpu_report.json`` and ``gpu_report.md`` at the end.

    bash tools/gpu_check.sh                      # the one command (sets up .venv, then runs this driver)
    python tools/gpu_check.py --out report/      # the driver alone, in an environment already set up
    python tools/gpu_check.py --only env bench_kernels     # a subset of the items

Items, in this order, each in its own process under its own time cap (a failure or a timeout of one
does not stop the rest); the caps sum to under 8 minutes on one CUDA GPU:

=================  ======================================================================================
``env``            device name, torch / triton / megatron-core / deepspeed versions; on CUDA the pinned
                   host-to-device copy bandwidth (256 MiB copies)
``gpu_tests``      the GPU test tier (``tests/gpu``)
``bench_kernels``  ``tools/bench_kernels.py``: each Triton kernel against eager (checked, then timed)
``bench_offload``  ``tools/bench_offload.py --experiment gpu_check``: host- vs device-resident step,
                   prefetch and update wait shares, host-to-device bytes per second of step
``engram_overhead`` ``tools/bench_engram_overhead.py``: the Engram model against its backbone with
                   ``engram=none`` in one process, alternating windows of steps; the step-time ratio, the
                   ratio per active FLOP and the split of Engram's extra time
``train``          ``engram-train experiment=gpu_check`` for 30 steps, host tables (sparse_adam)
``resume``         the same run stopped at step 15 and relaunched: it must resume and reproduce the
                   uninterrupted run's losses
=================  ======================================================================================

Without CUDA the CUDA items are reported as skipped with the reason and the rest runs in a short
CPU form (a tiny model; about two minutes on 2 cores).  Status per item: ``pass``, ``fail`` (a
correctness check failed: a test, a kernel against its reference, a resume against the uninterrupted
losses), ``error`` (it could not finish: a timeout or a crash; reported, with its log) or ``skipped``.
The exit status is 1 only when an item failed.  The report goes to ``--out`` (default ``$OUT`` when
set, else ``./gpu_report/``), with every item's log under ``logs/``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

ITEMS = ["env", "gpu_tests", "bench_kernels", "bench_offload", "engram_overhead", "train", "resume"]
# Seconds per item on a GPU; they sum to 430 s, leaving the environment check and start-up within 8 minutes.
GPU_CAPS = {"env": 20, "gpu_tests": 120, "bench_kernels": 40, "bench_offload": 90, "engram_overhead": 60,
            "train": 45, "resume": 55}
CPU_CAPS = {"env": 20, "gpu_tests": 60, "bench_kernels": 40, "bench_offload": 240, "engram_overhead": 120,
            "train": 90, "resume": 120}
NO_CUDA = "no CUDA device (torch.cuda.is_available() is False)"

# The short CPU form: the model of tools/measure_table_memory.py (2 layers, hidden 64) with host tables.
CPU_MODEL = ["experiment=debug_cpu", "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
             "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=64", "model.max_seq_length=64",
             "engram.layer_ids=[0,1]", "engram.n_embed_per_ngram=64", "engram.heads_per_ngram=4",
             "engram.table_size_per_ngram=[2000,2000]", "data.seq_length=64", "data.micro_batch_size=4",
             "data.global_batch_size=8", "data.vocab_size=512", "trainer.warmup_steps=1"]
RUN_COMMON = ["trainer.log_interval=1", "trainer.eval_interval=100000", "trainer.eval_iters=1",
              "trainer.progress=false", "run.wandb_mode=disabled"]
HOST = ["engram.residency=host", "engram.optimizer=sparse_adam"]


@dataclass
class Result:
    name: str
    status: str = "skipped"          # pass | fail | error | skipped
    reason: str = ""
    wall_s: float = 0.0
    cap_s: float = 0.0
    figures: Dict[str, object] = field(default_factory=dict)
    log: Optional[str] = None


class Check:
    """What the items share: the output folder, the device, the caps and a deadline for the whole run."""

    def __init__(self, out: str, cuda: bool, budget_s: float):
        self.out = out
        self.logs = os.path.join(out, "logs")
        self.work = os.path.join(out, "work")
        os.makedirs(self.logs, exist_ok=True)
        os.makedirs(self.work, exist_ok=True)
        self.cuda = cuda
        self.caps = dict(GPU_CAPS if cuda else CPU_CAPS)
        self.deadline = time.monotonic() + budget_s
        self.results: Dict[str, Result] = {}
        self._corpus: Optional[str] = None

    # -- helpers --------------------------------------------------------------------------------------
    def run(self, name: str, cmd: List[str], cap: float, env: Optional[dict] = None) -> subprocess.CompletedProcess:
        """``cmd`` under ``cap`` seconds, in its own process group (killed whole on timeout); output to
        the item's log.  ``returncode`` is ``None`` after a timeout."""
        log = os.path.join(self.logs, f"{name}.log")
        full_env = dict(os.environ, WANDB_MODE="disabled", PYTHONUNBUFFERED="1", **(env or {}))
        if not self.cuda:
            full_env.setdefault("DS_ACCELERATOR", "cpu")
            # Like the benchmark tools: two OpenMP threads per process on a busy small CPU spin each other out.
            full_env.setdefault("OMP_NUM_THREADS", "1")
        with open(log, "a") as f:
            f.write(f"$ {' '.join(cmd)}\n")
            f.flush()
            proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=f, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            try:
                rc = proc.wait(timeout=max(1.0, cap))
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
                rc = None
                f.write(f"\n[gpu_check] killed after the cap of {cap:.0f} s\n")
        return subprocess.CompletedProcess(cmd, rc)

    def remaining(self) -> float:
        return self.deadline - time.monotonic()

    def corpus(self) -> str:
        """A generated corpus (no network on a GPU machine): Zipf-distributed pseudo-words in documents."""
        if self._corpus is None:
            path = os.path.join(self.work, "corpus.jsonl")
            rng = random.Random(0)
            syll = ["ka", "to", "ri", "an", "el", "mo", "su", "ve", "li", "dor", "en", "th", "is", "qu", "ar", "po"]
            words = ["".join(rng.choice(syll) for _ in range(rng.randint(1, 4))) for _ in range(3000)]
            weights = [1.0 / (i + 1) for i in range(len(words))]
            docs, length = (300, 150) if not self.cuda else (1500, 300)
            with open(path, "w") as f:
                for _ in range(docs):
                    f.write(json.dumps({"text": " ".join(rng.choices(words, weights, k=length))}) + "\n")
            self._corpus = path
        return self._corpus

    def data(self) -> List[str]:
        return ["data.corpus=files", f"data.files=[{self.corpus()}]", f"data.dir={os.path.join(self.work, 'data')}",
                "data.valid_fraction=0.05"]

    def model(self) -> List[str]:
        return ["experiment=gpu_check"] if self.cuda else CPU_MODEL + HOST

    def train_cmd(self, overrides: List[str]) -> List[str]:
        # engram-train's module: the real entry point, one process (a single GPU needs no torchrun).
        return [sys.executable, "-m", "engram_train.train.main", *overrides]


def _tail(path: Optional[str], n: int = 300) -> str:
    if not path or not os.path.exists(path):
        return ""
    text = open(path, errors="replace").read().strip().splitlines()
    return (text[-1] if text else "")[:n]


def _metrics(run_dir: str) -> List[dict]:
    path = os.path.join(run_dir, "metrics.jsonl")
    if not os.path.exists(path):
        return []
    return [json.loads(line) for line in open(path) if line.strip()]


def _step_times(rows: List[dict], tokens_per_step: int, warmup: int) -> List[float]:
    return [tokens_per_step / r["tokens_per_s"] for r in rows if "tokens_per_s" in r and r["step"] > warmup]


def _tokens_per_step(overrides: List[str]) -> int:
    from engram_train.config.store import compose

    cfg = compose(overrides)
    return int(cfg.data.global_batch_size) * int(cfg.data.seq_length)


# ---- items ------------------------------------------------------------------------------------------

def item_env(c: Check, r: Result) -> None:
    from importlib import metadata

    import torch

    versions = {}
    for pkg in ("torch", "triton", "megatron-core", "deepspeed", "hydra-core"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    r.figures.update(python=platform.python_version(), versions=versions, cuda_available=c.cuda,
                     cpu_count=os.cpu_count())
    if not c.cuda:
        r.figures["device"] = f"CPU ({platform.processor() or platform.machine()})"
        r.figures["h2d_pinned_gb_per_s"] = None
        r.status, r.reason = "pass", f"{NO_CUDA}: no host-to-device copy to measure"
        return
    dev = torch.device("cuda")
    props = torch.cuda.get_device_properties(dev)
    r.figures.update(device=torch.cuda.get_device_name(dev), cuda_version=torch.version.cuda,
                     gpu_count=torch.cuda.device_count(), gpu_memory_gib=round(props.total_memory / 2**30, 1))
    try:
        from tools.bench_kernels import peak_gbs

        r.figures["hbm_peak_gb_per_s"] = peak_gbs(dev)
    except Exception as e:   # a figure, not a check
        r.figures["hbm_peak_gb_per_s"] = f"unknown ({type(e).__name__})"
    # Pinned host -> device in large copies: the ceiling the host-table prefetch can reach.
    src = torch.empty(256 * 2**20, dtype=torch.uint8, pin_memory=True)
    dst = torch.empty_like(src, device=dev)
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        dst.copy_(src, non_blocking=True)
    end.record()
    end.synchronize()
    r.figures["h2d_pinned_gb_per_s"] = round(5 * src.numel() / (start.elapsed_time(end) / 1e3) / 1e9, 2)
    r.status = "pass"


def item_gpu_tests(c: Check, r: Result) -> None:
    if not c.cuda:
        r.status, r.reason = "skipped", f"{NO_CUDA}: the GPU tier would skip every test"
        return
    xml = os.path.join(c.work, "gpu_tests.xml")
    p = c.run("gpu_tests", [sys.executable, "-m", "pytest", "-q", "-ra", "-p", "no:cacheprovider",
                            f"--junitxml={xml}", "tests/gpu"], r.cap_s)
    if os.path.exists(xml):
        import xml.etree.ElementTree as ET

        suite = ET.parse(xml).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        n = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
        r.figures.update(n, passed=n["tests"] - n["failures"] - n["errors"] - n["skipped"])
    if p.returncode is None:
        r.status, r.reason = "error", f"timed out after {r.cap_s:.0f} s"
    elif p.returncode == 0:
        r.status = "pass"
    elif p.returncode == 1:
        r.status, r.reason = "fail", f"{r.figures.get('failures', '?')} failed, {r.figures.get('errors', '?')} errors"
    else:
        r.status, r.reason = "error", f"pytest exit status {p.returncode}: {_tail(r.log)}"


def item_bench_kernels(c: Check, r: Result) -> None:
    out = os.path.join(c.work, "bench_kernels.json")
    cmd = [sys.executable, "tools/bench_kernels.py", "--json", out]
    if not c.cuda:   # torch paths and the C hashing kernel only, small sizes
        cmd += ["--tokens", "2048", "--rows-per-head", "5000", "--repeats", "1", "--iters", "1"]
        r.reason = f"{NO_CUDA}: timed the torch paths and the C hashing kernel only (Triton needs CUDA)"
    p = c.run("bench_kernels", cmd, r.cap_s)
    text = open(r.log).read() if r.log and os.path.exists(r.log) else ""
    if os.path.exists(out):
        data = json.load(open(out))
        r.figures["peak_gb_per_s"] = data.get("peak_gb_per_s")
        r.figures["fused"] = data.get("fused")
        r.figures["rows"] = [{k: row[k] for k in ("kernel", "impl", "inputs", "ms_per_call", "gb_per_s",
                                                 "share_of_peak", "speedup_vs_eager")} for row in data["rows"]]
    if p.returncode is None:
        r.status, r.reason = "error", f"timed out after {r.cap_s:.0f} s"
    elif "differs from eager" in text:
        r.status, r.reason = "fail", _tail(r.log)
    elif p.returncode != 0:
        r.status, r.reason = "error", f"exit status {p.returncode}: {_tail(r.log)}"
    else:
        r.status = "pass"


def item_bench_offload(c: Check, r: Result) -> None:
    if not c.cuda:
        r.status, r.reason = "skipped", (f"{NO_CUDA}: host- vs device-resident is a GPU comparison (run "
                                         "tools/bench_offload.py for the CPU figures, ~3 minutes)")
        return
    out = os.path.join(c.work, "bench_offload.json")
    p = c.run("bench_offload", [sys.executable, "tools/bench_offload.py", "--experiment", "gpu_check",
                                "--corpus", c.corpus(), "--rows-per-head", "100000", "--steps", "10",
                                "--warmup", "3", "--no-memory",
                                "--workdir", os.path.join(c.work, "offload"), "--json", out], r.cap_s)
    if os.path.exists(out):
        r.figures.update(json.load(open(out)))
    if p.returncode is None:
        r.status, r.reason = "error", f"timed out after {r.cap_s:.0f} s"
    elif p.returncode != 0:
        r.status, r.reason = "error", f"exit status {p.returncode}: {_tail(r.log)}"
    else:
        r.status = "pass"


def item_engram_overhead(c: Check, r: Result) -> None:
    """tools/bench_engram_overhead.py: both variants in one process, alternating windows of steps, and the
    split of Engram's extra time (hashing, gather/exchange, projections and gate, conv, table step)."""
    model = c.model()
    experiment = next(o.split("=", 1)[1] for o in model if o.startswith("experiment="))
    extra = [o for o in model if not o.startswith("experiment=")] + c.data() + RUN_COMMON + [
        "engram.residency=device", "trainer.save_interval=100000",
        "trainer.resume=false"]
    out = os.path.join(c.work, "engram_overhead.json")
    windows, split = (4, 4) if c.cuda else (2, 2)
    p = c.run("engram_overhead", [sys.executable, "tools/bench_engram_overhead.py", "--experiment", experiment,
                                  "--windows", str(windows), "--split-steps", str(split), "--json", out,
                                  "--workdir", os.path.join(c.work, "overhead"), "--extra", *extra], r.cap_s)
    if p.returncode != 0 or not os.path.exists(out):
        r.status = "error"
        r.reason = "timed out" if p.returncode is None else f"exit status {p.returncode}: {_tail(r.log)}"
        return
    s = json.load(open(out))
    r.figures.update({k: s[k] for k in ("step_time_ratio", "step_time_ratio_spread", "step_ms", "tokens_per_s",
                                        "split_ms", "flops_per_token", "active_flops_ratio",
                                        "ratio_per_active_flop", "window_pairs", "timed_steps")})
    r.status = "pass"
    if not c.cuda:
        r.reason = f"{NO_CUDA}: measured on the CPU with a tiny model (short form)"


def _train_overrides(c: Check, run_dir: str) -> List[str]:
    return c.model() + c.data() + RUN_COMMON + ["trainer.max_steps=30", "trainer.save_interval=15",
                                                f"run.dir={run_dir}"]


def item_train(c: Check, r: Result) -> None:
    run_dir = os.path.join(c.work, "train")
    over = _train_overrides(c, run_dir) + ["trainer.resume=false"]
    p = c.run("train", c.train_cmd(over), r.cap_s)
    rows = _metrics(run_dir)
    losses = {x["step"]: x["loss"] for x in rows if "loss" in x}
    if p.returncode != 0:
        r.status = "error"
        r.reason = "timed out" if p.returncode is None else f"exit status {p.returncode}: {_tail(r.log)}"
        return
    times = _step_times(rows, _tokens_per_step(over), warmup=3)
    wait = sum(x.get("engram_prefetch/wait_s", 0.0) for x in rows if x.get("step", 0) > 3)
    h2d = [x["engram_prefetch/h2d_bytes"] for x in rows if "engram_prefetch/h2d_bytes" in x]
    r.figures.update(steps=len(losses), first_loss=losses.get(1), last_loss=losses.get(30),
                     median_step_ms=round(1e3 * statistics.median(times), 2) if times else None,
                     prefetch_wait_share=round(wait / sum(times), 4) if times else None,
                     h2d_bytes_per_step=statistics.median(h2d) if h2d else None)
    if sorted(losses) != list(range(1, 31)):
        r.status, r.reason = "fail", f"logged loss steps {sorted(losses)[:3]}..{sorted(losses)[-3:]}, not 1..30"
    elif not all(math.isfinite(v) for v in losses.values()):
        r.status, r.reason = "fail", "a non-finite loss"
    else:
        r.status = "pass"
        if not c.cuda:
            r.reason = f"{NO_CUDA}: the short CPU form (tiny model, host tables on the CPU)"


def item_resume(c: Check, r: Result) -> None:
    """Stop at step 15 (a checkpoint), relaunch: the run must resume there and give the train item's losses."""
    want = {x["step"]: x["loss"] for x in _metrics(os.path.join(c.work, "train")) if "loss" in x}
    if sorted(want) != list(range(1, 31)):
        r.status, r.reason = "skipped", "the train item did not finish 30 steps: nothing to compare with"
        return
    run_dir = os.path.join(c.work, "resume")
    over = _train_overrides(c, run_dir)
    end = time.monotonic() + r.cap_s
    for stage, extra in (("stop", ["trainer.resume=false", "trainer.stop_at_step=15"]), ("continue", [])):
        p = c.run("resume", c.train_cmd(over + extra), end - time.monotonic())
        if p.returncode != 0:
            r.status = "error"
            r.reason = f"{stage}: " + ("timed out" if p.returncode is None else
                                       f"exit status {p.returncode}: {_tail(r.log)}")
            return
    text = open(r.log).read()
    got = {}
    steps = []
    for x in _metrics(run_dir):
        if "loss" in x:
            steps.append(x["step"])
            got[x["step"]] = x["loss"]
    # CUDA sums with float atomics (MoE token scatter, index_add_) are not bit-reproducible run to run.
    rtol = 5e-3 if c.cuda else 1e-4
    worst = max((abs(got[s] - want[s]) / abs(want[s]) for s in want if s in got), default=float("inf"))
    r.figures.update(max_rel_loss_diff=worst, rtol=rtol, resumed_message="(step 15)" in text)
    if not re.search(r"resumed from \S+ \(step 15\)", text):
        r.status, r.reason = "fail", "the relaunch did not resume from the step-15 checkpoint"
    elif steps != list(range(1, 31)):
        r.status, r.reason = "fail", f"logged steps {steps}: the run started over or skipped steps"
    elif worst > rtol:
        r.status, r.reason = "fail", f"losses differ from the uninterrupted run by up to {worst:.2e} (rtol {rtol})"
    else:
        r.status = "pass"


RUNNERS: Dict[str, Callable[[Check, Result], None]] = {
    "env": item_env, "gpu_tests": item_gpu_tests, "bench_kernels": item_bench_kernels,
    "bench_offload": item_bench_offload, "engram_overhead": item_engram_overhead, "train": item_train,
    "resume": item_resume}


def run_items(c: Check, names: List[str], runners: Dict[str, Callable] = RUNNERS) -> Dict[str, Result]:
    for name in names:
        r = Result(name, cap_s=float(min(c.caps.get(name, 60), max(0.0, c.remaining()))))
        r.log = os.path.join(c.logs, f"{name}.log")
        c.results[name] = r
        if r.cap_s < 5:
            r.status, r.reason = "skipped", "the total time budget is spent"
            continue
        print(f"[gpu_check] {name} (cap {r.cap_s:.0f} s) ...", flush=True)
        t0 = time.monotonic()
        try:
            runners[name](c, r)
        except Exception as e:   # one item's crash is its own error, never the end of the check
            r.status, r.reason = "error", f"{type(e).__name__}: {e}"
        r.wall_s = round(time.monotonic() - t0, 2)
        if not os.path.exists(r.log):
            r.log = None
        print(f"[gpu_check] {name}: {r.status} in {r.wall_s:.1f} s{' - ' + r.reason if r.reason else ''}",
              flush=True)
    return c.results


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, dict):
        return ", ".join(f"{k} {_fmt(x)}" for k, x in v.items())
    return str(v)


def write_report(c: Check, total_s: float) -> dict:
    env = c.results.get("env")
    report = {"device": env.figures.get("device") if env else None,
              "versions": env.figures.get("versions") if env else None,
              "cuda": c.cuda, "total_wall_s": round(total_s, 2),
              "failed": [n for n, r in c.results.items() if r.status == "fail"],
              "items": [asdict(r) for r in c.results.values()]}
    with open(os.path.join(c.out, "gpu_report.json"), "w") as f:
        json.dump(report, f, indent=1)
    lines = [f"# GPU check: {report['device'] or 'device not queried (env not run)'}", "",
             f"Versions: {_fmt(report['versions'] or {})}. Total wall time {total_s:.1f} s.", "",
             "| item | status | wall s | cap s | reason |", "|---|---|---:|---:|---|"]
    for r in c.results.values():
        lines.append(f"| {r.name} | {r.status} | {r.wall_s:.1f} | {r.cap_s:.0f} | {r.reason.replace('|', '/')} |")
    for r in c.results.values():
        if not r.figures:
            continue
        lines += ["", f"## {r.name}", ""]
        for k, v in r.figures.items():
            if k == "rows":
                lines += ["", "| kernel | impl | ms/call | GB/s | of peak | vs eager | inputs |",
                          "|---|---|---:|---:|---:|---:|---|"]
                for row in v:
                    share = f"{row['share_of_peak']:.0%}" if row.get("share_of_peak") is not None else "-"
                    lines.append(f"| {row['kernel']} | {row['impl']} | {row['ms_per_call']:.3f} | "
                                 f"{row['gb_per_s']:.1f} | {share} | {row['speedup_vs_eager']:.2f}x | "
                                 f"{row['inputs']} |")
            else:
                lines.append(f"- {k}: {_fmt(v)}")
    with open(os.path.join(c.out, "gpu_report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    return report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.environ.get("OUT") or "gpu_report",
                   help="where gpu_report.json/.md and the logs go (default: $OUT if set, else ./gpu_report)")
    p.add_argument("--only", nargs="+", choices=ITEMS, default=None, help="run these items only (in order)")
    p.add_argument("--budget-s", type=float, default=450.0,
                   help="the whole run's wall-time budget; an item gets min(its cap, what is left)")
    args = p.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    os.makedirs(args.out, exist_ok=True)
    c = Check(os.path.abspath(args.out), cuda=cuda, budget_s=args.budget_s)
    t0 = time.monotonic()
    names = [n for n in ITEMS if args.only is None or n in args.only]
    run_items(c, names)
    report = write_report(c, time.monotonic() - t0)
    print(f"[gpu_check] wrote {os.path.join(c.out, 'gpu_report.md')} and gpu_report.json; "
          + ("FAILED: " + ", ".join(report["failed"]) if report["failed"] else "no correctness check failed"))
    return 1 if report["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
