"""Will Engram tables hide under compute? Bytes and seconds of every table stage per step, predicted.

    python tools/plan_offload.py experiment=engram_100b_host_4node world=32
    python tools/plan_offload.py experiment=engram_27b world=64 --mfu 0.35 --data-dir data_cache/mine
    python tools/plan_offload.py experiment=engram_27b world=64 engram.residency=host engram.optimizer=sparse_adam
    python tools/plan_offload.py --calibrate --json calibration.json     # this machine's CPU constants
    python tools/plan_offload.py --validate                               # predicted vs bench_offload, 2 sizes

``world=N`` is the number of ranks, every other argument a Hydra override (validated as the trainer
does). For each rank and step (``global_batch_size`` sequences) it predicts, per stage:

- **unique rows** per Engram layer, from the corpus: a sample of real batches of the prepared
  directory (``--data-dir``; default the config's data, prepared as the trainer prepares it when
  missing, or for a recipe that names no files the quick-start corpus) is windowed and hashed by the project's loader and hasher, the unique rows of
  nested batches of 1, 2, 4, ... sequences are counted, and a power law ``U = a x^b`` in the batch's
  tokens ``x`` (Heaps' law) is fitted per layer. The fit is used at the micro-batch (prefetch), at
  ``dp`` micro-batches (an owner's block under ``engram.partition=all``) and at the global batch (the
  table step); beyond the largest batch sampled it extrapolates, and the report says by how much.
  The unique fraction depends on the tokenizer: hash the corpus prepared with the tokenizer you
  will train with.
- **prefetch** (host tables, one worker thread per rank, ``memory/host.py``): plan (unique ids),
  gather of the block's rows, copy host to device (PCIe; the int64 index too), and under ``all``
  the id requests to the owners (NIC for off-node owners);
- **exchange in the step** (on the critical path): ``tp``'s all-reduce of ``[U, d]`` over the TP group
  (NVLink), ``all``'s rows and gradient rows to and from owners (NVLink on the node, NIC off it),
  the all-gather of gradient rows over the replica (data-parallel) group of ``replicated``/``tp``,
  and for host tables the copy of the reduced gradient rows to the host (PCIe);
- **table step**: ``sparse_adam`` on the rows the step touched, on ``--cores`` threads, the larger of
  the per-row CPU cost and the bytes over host memory bandwidth (weight, 2 moments and the step
  count read and written, the gradient read); plus the refresh of the next block (read after write,
  bounded by re-reading the whole block). Device tables step on HBM (``adam``: the whole shard).

Compute per step is ``--step-time`` seconds, or ``6 x active parameters x tokens per rank`` (+ the
attention term of ``tools/count_params.py``) over ``--peak-tflops x --mfu``. Verdict: the prefetch of
micro-batch ``i+1`` hides when it fits in micro-batch ``i``'s compute; the host table step (submitted
after the dense optimizer step) hides, with ``engram.staleness=0``, only in the forward up to the
first Engram layer of the next step, with ``staleness=1`` in the next micro-batch's compute. The
report gives each margin, the exposed seconds and the resource that bounds each stage.

Hardware constants: ``HARDWARE`` below, one place, each with its source; any of them can be given
on the command line (``--pcie-gbps`` ...). CPU costs per row: ``CPU_COSTS`` (measured on the
project's 2-core CPU machine by ``--calibrate``; ``--constants FILE`` takes another machine's
``--calibrate --json FILE``).

``--validate`` runs ``tools/bench_offload.py`` (host tables) ``--bench-repeats`` times at each of two
table sizes on this machine, the sizes alternating, each run followed by ``--calibrations`` calibrations of
this machine's CPU costs on a table of its size, all on one CPU (``--cpu``); it compares the predicted
unique rows, prefetch worker time and host table step time per step with the measured ones
(``engram_prefetch/rows``, ``/gather_cpu_s``, ``/update_cpu_s``: CPU seconds of the worker thread) and exits
1 if one is off by more than ``--tolerance`` (25%).  Compared are the least disturbed run and calibration of
each size: a run's ``--quantile`` (default 0.25) of its timed steps, the least over runs, against the
costs fitted to a calibration's quantile of each point's rounds, the least over calibrations.  On a
shared virtual machine a core switches between a fast state and one where the same work costs 1.6-1.7x
the CPU seconds (other tenants), for seconds to minutes at a time, as long as a run: a median mixes the
two in whatever share each run met them (printed alongside, not checked); the prediction is for the
undisturbed core.

A tool of its own rather than a mode of ``tools/plan_memory.py``: that one reads no data and allocates
nothing; this one samples a corpus and times the host. It reuses the same config validation.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import time

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), ".."))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ.setdefault("DS_ACCELERATOR", "cpu")

# One place for the hardware: an 8-GPU H100 SXM node (DGX H100 class), per GPU rank unless said.
HARDWARE = {
    # NVIDIA H100 SXM5 datasheet: 989 TFLOP/s dense BF16 (1,979 with 2:4 sparsity).
    "peak_tflops": 989.0,
    # An assumption, not a measurement: large MoE pretraining reports 35-45% MFU on H100
    # (DeepSeek-V3 / Megatron-scale runs); give yours with --mfu or the measured --step-time.
    "mfu": 0.40,
    # PCIe Gen5 x16 host->device: 40-52 GB/s achieved with copies >= ~28 KiB, 4-7 GB/s with 4-24 KiB
    # copies (vLLM's measurements on H100). A row block is one contiguous copy (MBs): the large rate.
    "pcie_gbps": 50.0,
    # Host DRAM per rank: 2 sockets x 8 channels DDR5-4800 = 2 x 307 GB/s peak, ~65% achievable under
    # random row traffic -> ~400 GB/s per node, shared by its 8 ranks.
    "host_mem_gbps": 50.0,
    # CPU threads per rank for the host table step (engram.host_threads): a DGX H100 has 2 x 56 cores;
    # 8 of the 14 per rank, leaving the rest to the data loader, NCCL proxies and Python.
    "cores": 8,
    # One 400 Gb/s ConnectX-7 NIC per GPU (DGX H100: 8 per node) = 50 GB/s per direction.
    "nic_gbps": 50.0,
    # NVLink 4 on H100 SXM: 900 GB/s bidirectional per GPU = 450 GB/s per direction.
    "nvlink_gbps": 450.0,
    # H100 SXM5 HBM3: 3.35 TB/s.
    "hbm_gbps": 3350.0,
    "ranks_per_node": 8,
}

# CPU cost of the host stages, one thread, seconds, per layer: n * (per_item + per_float * z), z the row width d
# for the row stages and log2(n) for the sort of "plan"; c0 once per call (a micro-batch's gather, a step's
# update). Measured by `python tools/plan_offload.py --calibrate` (2^27 table parameters, cold caches, CPU time;
# the middle of three runs: d=80 rows cost 2.2-2.7 us each to step) on the project's CPU machine (2-core Xeon VM,
# shared with other jobs, 2026-12): a conservative stand-in for a
# server core. --constants FILE takes another host's --calibrate --json FILE.
CPU_COSTS = {
    "plan": {"c0": 4.13e-04, "per_item": 5.11e-08, "per_float": 0.0},      # per id: offset, sort-unique
    "gather": {"c0": 0.0, "per_item": 5.93e-08, "per_float": 2.31e-09},     # per row: index_select + copy
    "adam": {"c0": 1.32e-03, "per_item": 4.54e-07, "per_float": 2.80e-08},  # per row: sparse_adam
    "refresh": {"c0": 0.0, "per_item": 1.62e-07, "per_float": 0.0},        # per row of the block read ahead
    "memcpy_gbps": 5.45,        # one thread, bytes copied per second
}


def fail(message):
    from engram_train.errors import UserError

    raise UserError(message)


# ----------------------------------------------------------------------------- unique rows from the corpus


def fit_power_law(x, y):
    """Least squares of ``log y = log a + b log x``: ``(a, b, r2)``."""
    import numpy as np

    lx, ly = np.log(np.asarray(x, dtype=float)), np.log(np.asarray(y, dtype=float))
    b, la = np.polyfit(lx, ly, 1)
    pred = la + b * lx
    ss = float(((ly - ly.mean()) ** 2).sum())
    r2 = 1.0 - float(((ly - pred) ** 2).sum()) / ss if ss > 0 else 1.0
    return float(math.exp(la)), float(b), r2


class UniqueFit:
    """Unique rows of one Engram layer in a batch of ``x`` tokens: ``min(rows, a x^b)``."""

    def __init__(self, a, b, rows, max_tokens, r2=1.0, points=()):
        self.a, self.b, self.rows, self.max_tokens, self.r2, self.points = a, b, rows, max_tokens, r2, list(points)

    def __call__(self, tokens):
        return min(float(self.rows), self.a * float(tokens) ** self.b)

    def to_dict(self):
        return dict(a=self.a, b=self.b, rows=self.rows, max_tokens_sampled=self.max_tokens, r2=self.r2,
                    points=self.points)


def measure_unique(prepared, cfg, max_tokens=1 << 19, repeats=2, seed=0):
    """``({layer: [(tokens, unique rows), ...]}, hasher, starts)``: nested batches of 1, 2, 4, ... consecutive
    samples of the training order (a real global batch) from each of ``repeats`` random starts, hashed by the
    loader's hasher."""
    import random

    import torch

    from engram_train.data.loader import _open_split, build_engram_hasher

    T = cfg.data.seq_length
    hasher = build_engram_hasher(prepared, cfg.engram)
    samples = _open_split(prepared, "train", T, cfg.trainer.seed, None)
    n = samples.samples_per_epoch
    biggest = max(1, min(max_tokens // T, n))
    sizes = [1 << i for i in range(biggest.bit_length()) if (1 << i) <= biggest]
    offsets = {l: torch.tensor([0] + list(sizes_l[:-1]), dtype=torch.int64).cumsum(0)
               for l, sizes_l in hasher.table_sizes.items()}
    rng = random.Random(seed)
    points = {l: [] for l in hasher.table_sizes}
    starts = [rng.randrange(0, max(1, n - sizes[-1] + 1)) for _ in range(repeats)]
    for start in starts:
        seen = {l: torch.empty(0, dtype=torch.int64) for l in points}
        done = 0
        for s in sizes:
            tokens = torch.stack([samples[g]["tokens"] for g in range(start + done, start + s)])
            for l, ids in hasher(tokens).items():
                seen[l] = torch.unique(torch.cat([seen[l], (ids + offsets[l]).reshape(-1)]))
                points[l].append((s * T, int(seen[l].numel())))
            done = s
    return points, hasher, starts


def fit_unique(points, table_rows, max_tokens):
    fits = {}
    for l, pts in points.items():
        a, b, r2 = fit_power_law([p[0] for p in pts], [p[1] for p in pts])
        fits[l] = UniqueFit(a, b, table_rows[l], max_tokens, r2, pts)
    return fits


# ----------------------------------------------------------------------------- the model


def _scale(op, n, d):
    """The second per-item term of a stage: the row width for row stages, ``log2 n`` for the sort."""
    return math.log2(max(n, 2)) if op == "plan" else d


def cpu_time(costs, op, n, d, threads=1):
    """Seconds of a host stage on ``n`` items of one layer (ids, or rows of ``d`` floats); the stage's
    ``c0`` is paid once per call (a micro-batch's gather, a step's update), not per layer."""
    c = costs[op]
    return 0.0 if n <= 0 else n * (c["per_item"] + c["per_float"] * _scale(op, n, d)) / threads


def predict(cfg, world, hw, costs, fits, step_time=None, flops_per_token=None):
    """Per rank and step: bytes, rows and seconds of every stage, and the verdict (a dict)."""
    e, d_cfg, p = cfg.engram, cfg.data, cfg.parallel
    tp = p.tensor_parallel
    dp = world // tp
    rpn = min(int(hw["ranks_per_node"]), world)
    b, T, G = d_cfg.micro_batch_size, d_cfg.seq_length, d_cfg.global_batch_size
    accum = G // (b * dp)
    from engram_train.memory.layout import resolve_partition

    part = resolve_partition(e.partition, tp)
    host = e.residency == "host"
    cuda = hw.get("cuda", True)
    heads = (e.max_ngram - 1) * e.heads_per_ngram
    d = e.n_embed_per_ngram // e.heads_per_ngram
    n_ids = b * T * heads
    row_b = 4 * d                                     # fp32 rows, the table store's
    x_mb, x_dp, x_step = b * T, dp * b * T, G * T
    off_node = max(0, world - rpn) / world            # share of the other ranks on other nodes (all)
    mb = dict(unique=0.0, block_rows=0.0, ids=n_ids * len(fits), h2d_bytes=0.0, net_bytes=0.0, nvlink_bytes=0.0,
              t_plan=0.0, t_gather=0.0, t_h2d=0.0, t_ids=0.0, t_exchange=0.0)
    step = dict(table_rows=0.0, grad_net_bytes=0.0, d2h_bytes=0.0, written_bytes=0.0, t_adam=0.0, t_refresh=0.0,
                t_grad_net=0.0, t_d2h=0.0, adam_bound="")
    cores = max(1, int(hw["cores"]))
    for l, fit in fits.items():
        u_mb = fit(x_mb)
        if part == "replicated":
            block, step_rows, shard_rows = u_mb, fit(x_step), fit.rows
        elif part == "tp":
            block, step_rows, shard_rows = u_mb / tp, fit(x_step) / tp, fit.rows / tp
        else:
            block, step_rows, shard_rows = fit(x_dp) / world, fit(x_step) / world, fit.rows / world
        mb["unique"] += u_mb
        mb["block_rows"] += block
        # Planning: offset + sort-unique of the ids (under `all` also the owner's unique of the requests).
        mb["t_plan"] += cpu_time(costs, "plan", n_ids, d) + (cpu_time(costs, "plan", u_mb, d) if part == "all" else 0)
        if part == "all":
            mb["net_bytes"] += 8 * u_mb * off_node      # int64 ids to the owners on other nodes (gloo)
            mb["t_ids"] += 8 * u_mb * off_node / (hw["nic_gbps"] * 1e9)
            # Forward: owners send the rows back; backward: TP rank 0 sends the gradient rows (1/tp of ranks).
            moved = u_mb * row_b * (world - 1) / world * (1 + 1 / tp)
            net = u_mb * row_b * off_node * (1 + 1 / tp)
            mb["net_bytes"] += net
            mb["nvlink_bytes"] += moved - net
            mb["t_exchange"] += net / (hw["nic_gbps"] * 1e9) + (moved - net) / (hw["nvlink_gbps"] * 1e9)
        elif part == "tp" and tp > 1:
            ring = 2 * (tp - 1) / tp * u_mb * row_b
            mb["nvlink_bytes"] += ring
            mb["t_exchange"] += ring / (hw["nvlink_gbps"] * 1e9)
        if host:
            mb["t_gather"] += max(cpu_time(costs, "gather", block, d), 2 * block * row_b / (hw["host_mem_gbps"] * 1e9))
            # The plan's tensors (exchange.py): the int64 inverse of every id, and the local rows read (replicated,
            # tp; tp also a bool per unique id), or the requests served and their inverse (all).
            index = 8 * n_ids + {"replicated": 8 * block, "tp": 8 * block + u_mb, "all": 16 * u_mb}[part]
            mb["h2d_bytes"] += block * row_b + index
            if cuda:   # on a CPU the "device" copy is a memcpy, measured inside the gather's cost
                mb["t_h2d"] += (block * row_b + index) / (hw["pcie_gbps"] * 1e9)
        else:   # device tables: the gather reads HBM inside the forward
            mb["t_exchange"] += 2 * block * row_b / (hw["hbm_gbps"] * 1e9)
        # The step: the replicas' gradient rows (replicated/tp: all-gathered over the DP group, not deduplicated
        # before), then the optimizer on the reduced rows.
        step["table_rows"] += step_rows
        if part in ("replicated", "tp") and dp > 1:
            pending = accum * block * (row_b + 8)
            dp_off = max(0, dp - max(1, rpn // tp)) / dp
            sent = (dp - 1) * pending
            step["grad_net_bytes"] += sent * dp_off
            step["t_grad_net"] += sent * dp_off / (hw["nic_gbps"] * 1e9) + sent * (1 - dp_off) / (hw["nvlink_gbps"] * 1e9)
        if host:
            step["d2h_bytes"] += step_rows * (row_b + 8) if cuda else 0
            step["t_d2h"] += step_rows * (row_b + 8) / (hw["pcie_gbps"] * 1e9) if cuda else 0
            step["written_bytes"] += step_rows * (3 * row_b + 4)
            traffic = step_rows * (7 * row_b + 8 + 8)   # read w, m, v, step, grad, id; write w, m, v, step
            t_cpu = cpu_time(costs, "adam", step_rows, d, cores)
            t_mem = traffic / (hw["host_mem_gbps"] * 1e9)
            step["t_adam"] += max(t_cpu, t_mem)
            step["adam_bound"] = "host memory bandwidth" if t_mem > t_cpu else f"CPU ({cores} threads)"
            if not e.staleness:
                step["t_refresh"] += cpu_time(costs, "refresh", block, d)
        else:
            rows = shard_rows if e.optimizer == "adam" else step_rows
            step["stepped_rows"] = step.get("stepped_rows", 0.0) + rows
            step["written_bytes"] += rows * (3 * row_b + 4)
            step["t_adam"] += rows * (7 * row_b + 16) / (hw["hbm_gbps"] * 1e9)
            step["adam_bound"] = "HBM bandwidth" + (" (adam: every row of the shard)" if e.optimizer == "adam" else "")
    if host:   # one worker call per micro-batch (every layer) and one per step: their fixed costs once
        mb["t_plan"] += costs["plan"]["c0"] + costs["gather"]["c0"]
        step["t_adam"] += costs["adam"]["c0"]
        step["t_refresh"] += costs["refresh"]["c0"] if not e.staleness else 0.0
    mb["t_prefetch"] = mb["t_plan"] + mb["t_gather"] + mb["t_h2d"] + mb["t_ids"] if host else 0.0
    step["t_table_step"] = step["t_adam"] + step["t_refresh"]

    if step_time is None:
        tokens_rank = G * T / dp
        step_time = 3 * flops_per_token * tokens_rank / tp / (hw["peak_tflops"] * 1e12 * hw["mfu"])
    t_mb = step_time / accum
    # The forward is ~1/3 of a micro-batch (1/4 with full recompute); the first Engram layer comes after
    # min(layer_ids) of num_layers layers.
    fwd_share = 0.25 if cfg.model.recompute == "full" else 1 / 3
    window = t_mb * fwd_share * min(e.layer_ids) / cfg.model.num_layers
    out = dict(partition=part, residency=e.residency, world=world, tp=tp, dp=dp, ranks_per_node=rpn,
               accumulation=accum, embed_dim=d, heads=heads, micro_batch_tokens=x_mb, step_tokens=x_step,
               step_compute_s=step_time, micro_batch_compute_s=t_mb, micro_batch=mb, step=step,
               extrapolation=x_step / min(f.max_tokens for f in fits.values()))
    exposed = {}
    if host:
        exposed["prefetch"] = accum * max(0.0, mb["t_prefetch"] - t_mb)
        if e.staleness:
            exposed["table step"] = max(0.0, step["t_table_step"] + mb["t_prefetch"] - t_mb)
            out["table_step_window_s"] = t_mb - mb["t_prefetch"]
        else:
            exposed["table step"] = max(0.0, step["t_table_step"] - window)
            out["table_step_window_s"] = window
        exposed["gradient rows to host (PCIe)"] = step["t_d2h"]
        out["worker_busy_s"] = accum * mb["t_prefetch"] + step["t_table_step"]
    else:
        exposed["table step (device)"] = step["t_table_step"]
    exposed["lookup exchange"] = accum * mb["t_exchange"]
    exposed["gradient rows over DP"] = step["t_grad_net"]
    out["exposed_s"] = exposed
    out["step_s"] = step_time + sum(exposed.values())
    out["overhead"] = sum(exposed.values()) / step_time
    out["bottleneck"] = max(exposed, key=exposed.get) if any(exposed.values()) else None
    return out


# ----------------------------------------------------------------------------- calibration (this machine)


def _timed(fn, a, evict=None):
    """``fn(*a)``, which returns the CPU seconds it took (CPU time: other processes on a shared machine do
    not count; the library's own timing, ``HostPrefetcher.gather_timed`` / ``table_step_timed``). With
    ``evict`` (a tensor) the call starts as a worker's call does in a run, after the trainer's work: with
    the caches overwritten. (Not after a sleep: an idle core may slow its clock, which a worker woken while
    the trainer computes does not see.)"""
    if evict is not None:
        evict.add_(1.0)
    return fn(*a)


def _cpu_s(fn):
    """``fn`` returning the calling thread's CPU seconds in it (for :func:`_timed`)."""
    def timed(*a):
        t0 = time.thread_time()
        fn(*a)
        return time.thread_time() - t0
    return timed


def _median_time(fn, args, evict=None):
    """Median of :func:`_timed` over ``args[1:]`` after a warm-up call on ``args[0]``; each call on rows of
    its own, so that they come from memory as in training."""
    fn(*args[0])
    return statistics.median(_timed(fn, a, evict) for a in args[1:])


def _nnls_relative(A, y):
    """Non-negative least squares of the relative error of ``A x ~ y`` (every subset of the columns solved,
    the best non-negative solution kept: a few columns, so exhaustive is cheap)."""
    import itertools

    import numpy as np

    A, y = np.asarray(A, dtype=float), np.asarray(y, dtype=float)
    A, y = A / y[:, None], np.ones_like(y)     # relative: a 10 us call counts as much as a 10 ms one
    k = A.shape[1]
    best = (float("inf"), np.zeros(k))
    for m in range(1, k + 1):
        for cols in itertools.combinations(range(k), m):
            x = np.linalg.lstsq(A[:, cols], y, rcond=None)[0]
            if (x >= 0).all():
                full = np.zeros(k)
                full[list(cols)] = x
                res = float(((A @ full - y) ** 2).sum())
                if res < best[0]:
                    best = (res, full)
    return [float(v) for v in best[1]]


def _fit_cost(samples):
    """``[(n, z, seconds)] -> {c0, per_item, per_float}`` for ``t = c0 + n a + n z b``."""
    c0, a, b = _nnls_relative([[1.0, n, n * z] for n, z, _ in samples], [t for _, _, t in samples])
    return {"c0": c0, "per_item": a, "per_float": b}


def _fit_prefetch(samples, layers):
    """``[(ids, rows, d, seconds)]`` of whole gathers (``layers`` layers of ``ids`` ids and ``rows`` unique rows
    each) -> "plan" (``c0 + n (a + b log2 n)`` per layer) and "gather" (``U (a + b d)`` per layer, the copy
    included) costs."""
    cols = [[1.0, layers * n, layers * n * _scale("plan", n, 0), layers * u, layers * u * d] for n, u, d, _ in samples]
    c0, a, b, ra, rb = _nnls_relative(cols, [t for *_, t in samples])
    return ({"c0": c0, "per_item": a, "per_float": b}, {"c0": 0.0, "per_item": ra, "per_float": rb})


def _fit_update(samples, layers):
    """``[(rows stepped, block rows refreshed, d, seconds)]`` of whole updates (``layers`` layers each) ->
    "adam" (``c0 + R (a + b d)`` per layer) and "refresh" (``B (a + b d)`` per layer) costs."""
    cols = [[1.0, layers * r, layers * r * d, layers * b, layers * b * d] for r, b, d, _ in samples]
    c0, a, b, fa, fb = _nnls_relative(cols, [t for *_, t in samples])
    return ({"c0": c0, "per_item": a, "per_float": b}, {"c0": 0.0, "per_item": fa, "per_float": fb})


_CAL_LAYERS = (0, 1)   # the calibration's two Engram layers, as the paper's models have: one call serves both


def calibrate(table_floats=1 << 27, repeats=9, quantile=0.5):
    """This machine's CPU costs, one thread, on the project's own host pipeline (``memory/host.py``): a
    table store of two host-resident layers of ``table_floats`` parameters in all (the per-row costs depend
    on how much of the table the caches hold: the default, 0.5 GB of weights and 1 GB of moments, is
    larger than any cache); its prefetcher's gather of a
    micro-batch (plan, gather, copy; 2 id counts x 2 unique fractions x 2 row widths) and a table step's
    update (the optimizer's step, then the refresh of a block read ahead; 2 row counts x 2 block sizes x
    2 widths), each call on rows of its own and with cold caches (``_median_time``), fitted by
    ``_fit_prefetch`` / ``_fit_update`` (:func:`costs_from_rounds`); CPU seconds as the library times them
    (``HostPrefetcher.gather_timed`` / ``table_step_timed``), each point's ``quantile`` over its rounds
    (default the median)."""
    import torch

    from engram_train.memory.layout import TableSpec, placement_for
    from engram_train.memory.store import StoreOptions, TableStore

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    heads = 8
    layers = _CAL_LAYERS
    stores = []
    try:
        g = torch.Generator().manual_seed(0)
        src = torch.randn(min(table_floats, 1 << 25), generator=g)
        dst = torch.empty_like(src)
        t = _median_time(_cpu_s(lambda: dst.copy_(src)), [()] * (repeats + 1))
        memcpy = src.numel() * 4 / t
        del src, dst
        points = []   # (kind, (sizes...), fn, [args of each round])
        for d in (16, 128):
            per_head = max(1, table_floats // d // heads // len(layers))
            sizes = (per_head,) * heads
            store = TableStore({l: TableSpec(l, sizes, d) for l in layers}, placement_for("replicated", 1, 0, 1, 0),
                               StoreOptions(optimizer="sparse_adam", residency="host", host_threads=1))
            stores.append(store)
            offsets = torch.tensor(TableSpec(0, sizes, d).offsets)
            for tokens in (256, 4096):
                for pool in (tokens // 8, 16 * tokens):   # few or mostly distinct ids per head
                    p = min(pool, per_head)
                    args = [({l: torch.randint(0, p, (1, tokens, heads), generator=g)
                              + torch.randint(0, per_head - p + 1, (1, 1, heads), generator=g) for l in layers},)
                            for _ in range(repeats + 1)]
                    uniq = statistics.median(int(torch.unique(a[0][0] + offsets).numel()) for a in args)
                    points.append(("prefetch", (tokens * heads, uniq, d),
                                   lambda h, p=store.prefetcher: p.gather_timed(h)[1], args))
            rows = store.shards[0].num_rows
            for r in (1 << 11, 1 << 15):
                r = min(r, rows)
                for b in (r // 8, r):
                    args = []
                    for _ in range(repeats + 1):
                        local = {l: torch.randperm(rows, generator=g)[:r].sort().values for l in layers}
                        # A block read ahead: b of the rows the step changes (all hit).
                        ahead = [{l: _block(store.shards[l], local[l][torch.randperm(r, generator=g)[:b]].sort().values)
                                  for l in layers}]
                        args.append((local, ahead, torch.randn(r, d, generator=g)))

                    def update(local, ahead, grads, store=store):
                        def apply():   # the store's apply(): every layer's optimizer step
                            for l in layers:
                                store.shards[l].optimizer.step(local[l], grads, 1e-3)
                        # As the worker runs it: the step, then the refresh; CPU seconds on every thread it used.
                        return store.prefetcher.table_step_timed(apply, local, ahead)

                    points.append(("update", (r, b, d), update, args))
        # Round-robin over the points, so that a change of the machine's load touches every point alike.
        evict = torch.zeros(1 << 24)   # 64 MiB, more than a core's share of the last-level cache
        times = [[] for _ in points]
        for i in range(repeats + 1):
            for k, (_, _, fn, args) in enumerate(points):
                if i:
                    times[k].append(_timed(fn, args[i], evict))
                else:
                    fn(*args[0])   # warm-up
        rounds = {kind: [(*key, ts) for (k, key, _, _), ts in zip(points, times) if k == kind]
                  for kind in ("prefetch", "update")}
    finally:
        for store in stores:
            store.prefetcher.close()
        torch.set_num_threads(threads)
    return costs_from_rounds(rounds, memcpy, quantile)


def _quantile(xs, q):
    import numpy as np

    return float(np.quantile(np.asarray(xs, dtype=float), q))


def costs_from_rounds(rounds, memcpy, quantile=0.5):
    """The CPU costs fitted to each calibration point's ``quantile`` over its timed rounds (``rounds``:
    ``{"prefetch"|"update": [(sizes..., [seconds of each round])]}``, as :func:`calibrate` keeps them; the
    rounds of several calibrations of one table can be pooled point by point)."""
    layers = len(_CAL_LAYERS)
    prefetch = [(*key, _quantile(ts, quantile)) for *key, ts in rounds["prefetch"]]
    update_samples = [(*key, _quantile(ts, quantile)) for *key, ts in rounds["update"]]
    plan, gather = _fit_prefetch(prefetch, layers)
    adam, refresh = _fit_update(update_samples, layers)
    return {"plan": plan, "gather": gather, "adam": adam, "refresh": refresh,
            "memcpy_gbps": memcpy / 1e9, "host_mem_gbps": 2 * memcpy / 1e9, "quantile": quantile,
            "samples": {"prefetch": prefetch, "update": update_samples}, "rounds": rounds, "memcpy": memcpy}


def _block(shard, local):
    """A row block as the prefetcher makes it (``memory/host.py``), of the rows ``local``."""
    from engram_train.memory.exchange import ReplicatedPlan
    from engram_train.memory.host import RowBlock

    import torch

    rows = shard.weight.index_select(0, local)
    return RowBlock(local + shard.lo, rows, ReplicatedPlan(torch.arange(local.numel()), local.numel(), local),
                    local.numel())


# ----------------------------------------------------------------------------- corpus and config


def _prepared(cfg, data_dir):
    """The corpus to sample: ``--data-dir``; else the config's own data (prepared as the trainer prepares it);
    else, for a recipe that names no files, the default corpus (``DataConfig()``: the quick-start's)."""
    from engram_train.config.schema import DataConfig
    from engram_train.data.prepare import PreparedData, prepare_data

    if data_dir is not None:
        return PreparedData.load(data_dir)
    d = cfg.data
    if d.corpus == "files" and not d.files:
        d = DataConfig()
    return prepare_data(d, progress=False)


def load_fits(cfg, data_dir, max_tokens, repeats):
    from engram_train.memory.layout import table_specs

    if not cfg.engram.enabled or cfg.engram.keys != "hashed":
        fail(f"engram.keys={cfg.engram.keys if cfg.engram.enabled else 'disabled'}: the offload planner needs "
             "hashed Engram tables (addresses known from token ids); use engram.keys=hashed")
    prepared = _prepared(cfg, data_dir)
    points, hasher, _ = measure_unique(prepared, cfg, max_tokens, repeats)
    specs = table_specs(hasher.table_sizes, cfg.engram.n_embed_per_ngram, cfg.engram.heads_per_ngram)
    biggest = max(t for pts in points.values() for t, _ in pts)
    return fit_unique(points, {l: s.rows for l, s in specs.items()}, biggest), prepared


def _parse(overrides):
    worlds = [o for o in overrides if o.startswith("world=")]
    rest = [o for o in overrides if not o.startswith("world=")]
    if len(worlds) != 1 or not worlds[0][6:].isdigit() or int(worlds[0][6:]) < 1:
        fail(f"world: give the number of ranks once, as world=N (got {worlds or 'none'})")
    return int(worlds[0][6:]), rest


def _flops_per_token(overrides):
    from tools.count_params import count

    return count(overrides)["flops_per_token"]


# ----------------------------------------------------------------------------- report


def _s(t):
    return f"{t * 1e3:.2f} ms" if t < 1 else f"{t:.2f} s"


def _b(n):
    return f"{n / 1e9:.2f} GB" if n >= 1e9 else f"{n / 1e6:.1f} MB"


def report(name, r, fits, hw, sources):
    mb, st = r["micro_batch"], r["step"]
    print(f"== {name}: world {r['world']} = TP {r['tp']} x DP {r['dp']}, {r['ranks_per_node']} ranks/node; "
          f"engram.partition={r['partition']}, residency={r['residency']}; {r['accumulation']} micro-batches of "
          f"{r['micro_batch_tokens']:,} tokens per rank, {r['step_tokens']:,} tokens per step")
    for l, f in fits.items():
        print(f"  layer {l}: unique rows = {f.a:.3g} x tokens^{f.b:.3f} (R^2 {f.r2:.4f}, sampled up to "
              f"{f.max_tokens:,} tokens; table {f.rows:,} rows): micro-batch {f(r['micro_batch_tokens']):,.0f}, "
              f"step {f(r['step_tokens']):,.0f}")
    if r["extrapolation"] > 1:
        print(f"  (the step's unique rows extrapolate the fit {r['extrapolation']:.1f}x past the largest batch sampled)")
    print(f"  compute: {_s(r['step_compute_s'])} per step ({sources['compute']}), {_s(r['micro_batch_compute_s'])} "
          "per micro-batch")
    print(f"  per micro-batch and rank (all layers): {mb['ids']:,} ids -> {mb['unique']:,.0f} unique rows; block "
          f"read here {mb['block_rows']:,.0f} rows")
    if r["residency"] == "host":
        print(f"    prefetch {_s(mb['t_prefetch'])} = plan {_s(mb['t_plan'])} + gather {_s(mb['t_gather'])} + "
              f"host-to-device {_b(mb['h2d_bytes'])} in {_s(mb['t_h2d'])}"
              + (f" + id requests {_s(mb['t_ids'])}" if r["partition"] == "all" else ""))
    print(f"    exchange in the step: {_b(mb['nvlink_bytes'])} NVLink + {_b(mb['net_bytes'])} network, "
          f"{_s(mb['t_exchange'])}")
    stepped = f" (adam steps all {st['stepped_rows']:,.0f} rows of the shard)" if "stepped_rows" in st and \
        st["stepped_rows"] != st["table_rows"] else ""
    print(f"  per step and rank: table step on {st['table_rows']:,.0f} touched rows{stepped}, {_s(st['t_table_step'])} "
          f"(optimizer {_s(st['t_adam'])}, bound by {st['adam_bound']}"
          + (f"; refresh <= {_s(st['t_refresh'])}" if st["t_refresh"] else "") + f"); written back "
          f"{_b(st['written_bytes'])}; gradient rows to host {_b(st['d2h_bytes'])} ({_s(st['t_d2h'])}); over the "
          f"network for the gradient all-gather {_b(st['grad_net_bytes'])} ({_s(st['t_grad_net'])})")
    if r["residency"] == "host":
        slack = r["micro_batch_compute_s"] - mb["t_prefetch"]
        print(f"  verdict: prefetch {'hides' if slack >= 0 else 'does NOT hide'} under a micro-batch's compute "
              f"(margin {_s(abs(slack))}, {100 * slack / r['micro_batch_compute_s']:+.1f}%); the table step "
              f"{_s(st['t_table_step'])} vs its window {_s(r['table_step_window_s'])}: "
              + ("hides" if r["exposed_s"]["table step"] == 0 else
                 f"{_s(r['exposed_s']['table step'])} exposed") + f"; worker busy {_s(r['worker_busy_s'])} of "
              f"{_s(r['step_compute_s'])} per step")
    exp = ", ".join(f"{k} {_s(v)}" for k, v in r["exposed_s"].items() if v)
    print(f"  exposed per step: {exp or 'nothing'} -> step {_s(r['step_s'])}, +{100 * r['overhead']:.2f}% over "
          f"compute; largest: {r['bottleneck'] or 'none'}")


def _constants(args):
    hw = dict(HARDWARE)
    sources = {"compute": f"{hw['peak_tflops']:g} TFLOP/s x MFU {hw['mfu']:g}"}
    for k in ("peak_tflops", "mfu", "pcie_gbps", "host_mem_gbps", "cores", "nic_gbps", "nvlink_gbps", "hbm_gbps",
              "ranks_per_node"):
        v = getattr(args, k)
        if v is not None:
            if v <= 0:
                fail(f"--{k.replace('_', '-')}={v}: must be > 0")
            hw[k] = v
    sources["compute"] = f"{hw['peak_tflops']:g} TFLOP/s x MFU {hw['mfu']:g}"
    if args.step_time is not None:
        if args.step_time <= 0:
            fail(f"--step-time={args.step_time}: must be > 0 seconds")
        sources["compute"] = f"--step-time {args.step_time:g}"
    costs = dict(CPU_COSTS)
    if args.constants:
        if not os.path.isfile(args.constants):
            fail(f"--constants {args.constants}: no such file; write one with --calibrate --json FILE")
        with open(args.constants) as f:
            loaded = json.load(f)
        missing = [k for k in ("plan", "gather", "adam", "refresh") if k not in loaded]
        if missing:
            fail(f"--constants {args.constants}: missing {missing}; write it with --calibrate --json FILE")
        costs.update({k: loaded[k] for k in ("plan", "gather", "adam", "refresh")})
    return hw, costs, sources


def plan_one(overrides, args):
    from engram_train.config.store import compose

    world, rest = _parse(overrides)
    cfg = compose(rest)
    cfg.validate(world_size=world)
    hw, costs, sources = _constants(args)
    fits, prepared = load_fits(cfg, args.data_dir, args.max_tokens, args.repeats)
    flops = None if args.step_time is not None else _flops_per_token(rest)
    r = predict(cfg, world, hw, costs, fits, step_time=args.step_time, flops_per_token=flops)
    r["corpus"] = dict(dir=str(prepared.dir), vocab_size=prepared.vocab_size)
    r["fits"] = {str(l): f.to_dict() for l, f in fits.items()}
    r["hardware"] = hw
    return cfg, r, fits, hw, sources


# ----------------------------------------------------------------------------- validation against bench_offload


def _bench_run(args, rows, k, work):
    """The host run's per-step metrics of bench_offload run ``k`` at ``rows`` rows per head (a run already in
    ``work`` is reused), and its directory."""
    from tools import bench_offload

    sub = os.path.join(work, f"rows{rows}" + (f"_r{k + 1}" if k else ""))
    metrics = os.path.join(sub, "host", "metrics.jsonl")
    if os.path.isfile(metrics) and os.path.isfile(os.path.join(sub, "device", "metrics.jsonl")):
        print(f"[plan_offload] reusing the bench_offload run in {sub}: it ran earlier, so the calibration that "
              f"follows is not interleaved with it (the core's state may differ; a fresh --workdir measures both)",
              flush=True)
    else:
        print(f"[plan_offload] bench_offload --rows-per-head {rows} (run {k + 1}) on CPU {args.cpu}, "
              f"load average {_load()} ...", flush=True)
        # One table-step thread, as the prediction assumes (cores=1): summed over a pool's threads, the
        # CPU seconds also count what threads sharing cores cost each other, which is not the model's.
        bench_offload.main(["--rows-per-head", str(rows), "--no-memory", "--steps", str(args.steps),
                            "--workdir", sub, "--cpus", str(args.cpu), "--extra", "engram.host_threads=1",
                            *args.extra])
        for run in ("device", "host"):   # the final checkpoints (1.2 GB a run at 400,000 rows/head): not read
            shutil.rmtree(os.path.join(sub, run, "checkpoints"), ignore_errors=True)
    lines = [m for m in (json.loads(x) for x in open(metrics) if '"loss"' in x) if m["step"] > 2]   # its warm-up
    # A table step counts in the log line where it ends: some lines hold two, the next none. Per table step,
    # each line's seconds over its count (engram_prefetch/table_steps), None in a line without one (the
    # gather's figures of that line still count).
    out = []
    for m in lines:
        n = m.get("engram_prefetch/table_steps", float(m["engram_prefetch/update_cpu_s"] > 0))   # older logs: 0 or 1
        out.append(dict(m, **{"engram_prefetch/update_cpu_s": m["engram_prefetch/update_cpu_s"] / n if n else None}))
    if not any(m["engram_prefetch/update_cpu_s"] is not None for m in out):
        sys.exit(f"plan_offload --validate: {metrics} logs no host table step (engram_prefetch/table_steps); "
                 f"the run needs host tables stepped by the prefetch worker (engram.residency=host, without an "
                 f"engram.host_dir shared by replicas on the node)")
    return out, sub


def _logged(run, key):
    """A run's values of ``key``, its lines without one (a table step logged in the next line) left out."""
    return [m[key] for m in run if m[key] is not None]


def _fmt(quantity: str, v: float) -> str:
    return f"{v:,.0f}" if "rows" in quantity else f"{v * 1e3:.2f} ms"


def _load():
    return " ".join(open("/proc/loadavg").read().split()[:3]) if os.path.isfile("/proc/loadavg") else "n/a"


def validate(args):
    """Bench runs and calibrations interleaved in time, all on one CPU (``--cpu``): on a shared or virtual
    machine a core's speed moves (the same table step costs 1.7x the CPU seconds on one vCPU as on the
    other, or on the same one a minute later), so each run is calibrated right after it, on its core, and
    the two sizes alternate."""
    import tempfile

    from engram_train.config.store import compose
    from tools.measure_table_memory import MODEL, pinned

    work = args.workdir or tempfile.mkdtemp(prefix="engram_plan_offload_")
    keys = {"unique rows fetched": "engram_prefetch/rows", "prefetch worker s": "engram_prefetch/gather_cpu_s",
            "host table step s": "engram_prefetch/update_cpu_s"}
    ok_all, lines, info, calibrations, loads = True, [], [], {}, []
    runs = {rows: [] for rows in args.sizes}
    setup = {}   # rows -> (cfg, fits, params)
    for k in range(args.bench_repeats):
        for rows in (args.sizes if k % 2 == 0 else args.sizes[::-1]):
            loads.append(_load())
            run, sub = _bench_run(args, rows, k, work)
            runs[rows].append(run)
            if rows not in setup:
                corpus = os.path.join(sub, "corpus.jsonl")
                over = MODEL + ["data.corpus=files", f"data.files=[{corpus}]",
                                f"data.dir={os.path.join(sub, 'prepared')}", "engram.optimizer=sparse_adam",
                                "engram.residency=host", f"engram.table_size_per_ngram=[{rows},{rows}]"] + list(args.extra)
                cfg = compose(over)
                fits, _ = load_fits(cfg, os.path.join(sub, "prepared"), args.max_tokens, args.repeats)
                params = sum(f.rows for f in fits.values()) * cfg.engram.n_embed_per_ngram // cfg.engram.heads_per_ngram
                setup[rows] = (cfg, fits, params)
            params = setup[rows][2]
            print(f"[plan_offload] calibrating on CPU {args.cpu}, {params / 1e6:.0f}M table parameters "
                  f"({args.calibrations} times), load average {_load()} ...", flush=True)
            with pinned({args.cpu}):
                for _ in range(args.calibrations):
                    calibrations.setdefault(rows, []).append(calibrate(table_floats=params))
            loads.append(_load())
    q = args.quantile
    medians = []   # the same comparison with medians: (rows, quantity, predicted, measured)
    for rows in args.sizes:
        cfg, fits, params = setup[rows]
        cals = calibrations[rows]

        def prediction(costs):
            # This machine: the "device" is host RAM (the copy is inside the calibrated gather), the trainer pins
            # one thread per rank (OMP_NUM_THREADS=1); the table step's CPU seconds are compared summed over
            # the threads it ran on (engram_prefetch/update_cpu_s), so one core's worth predicts them.
            hw = dict(HARDWARE, cuda=False, pcie_gbps=costs["memcpy_gbps"], host_mem_gbps=costs["host_mem_gbps"],
                      cores=1, ranks_per_node=1)
            r = predict(cfg, 1, hw, costs, fits, step_time=1.0)
            return r, {"unique rows fetched": r["accumulation"] * r["micro_batch"]["block_rows"],
                       "prefetch worker s": r["accumulation"] * r["micro_batch"]["t_prefetch"],
                       "host table step s": r["step"]["t_table_step"]}

        each = [prediction(costs_from_rounds(c["rounds"], c["memcpy"], q)) for c in cals]
        pred = each[0][0]
        each = [e for _, e in each]
        # The least disturbed calibration and run: a state of the core lasts seconds to minutes, as long as
        # a run or a calibration, so the one that met the fast state is each side's estimate of it.
        want = {k: min(e[k] for e in each) for k in keys}
        each_median = [prediction(costs_from_rounds(c["rounds"], c["memcpy"], 0.5))[1] for c in cals]
        waits = [statistics.median(m["engram_prefetch/update_wait_s"] for m in run) for run in runs[rows]]
        info.append(f"rows/head {rows:,}: the trainer waited for the table step (wall clock, median per step) "
                    f"{statistics.median(waits) * 1e3:.2f} ms (runs {min(waits) * 1e3:.2f}-{max(waits) * 1e3:.2f}); "
                    f"predicted exposed {want['host table step s'] * 1e3:.2f} ms (the first Engram layer is "
                    f"layer {min(cfg.engram.layer_ids)}: no window); for rows, "
                    f"{statistics.median(statistics.median(m['engram_prefetch/wait_s'] for m in run) for run in runs[rows]) * 1e3:.2f}"
                    f" ms, predicted {pred['exposed_s']['prefetch'] * 1e3:.2f} ms")
        for k, key in keys.items():
            if key == "engram_prefetch/rows":   # a count, not a time: no fast state to pick, the median
                per_run = [_quantile(_logged(run, key), 0.5) for run in runs[rows]]
                got = statistics.median(per_run)
            else:
                per_run = [_quantile(_logged(run, key), q) for run in runs[rows]]
                got = min(per_run)
            err = want[k] / got - 1 if got else float("inf")
            ok = abs(err) <= args.tolerance
            ok_all &= ok
            lines.append((rows, params, k, want[k], min(e[k] for e in each), max(e[k] for e in each), got,
                          min(per_run), max(per_run), err, ok))
            medians.append((rows, k, statistics.median(e[k] for e in each_median),
                            statistics.median(statistics.median(_logged(run, key)) for run in runs[rows])))
    steps = len(runs[args.sizes[0]][0])
    print(f"\n# Offload planner vs tools/bench_offload.py on this machine: predicted from the costs fitted to each "
          f"calibration point's {q:g} quantile over its rounds, the least of {len(calibrations[args.sizes[0]])} "
          f"calibrations; measured = the {q:g} quantile of a run's {steps} timed steps, the least of "
          f"{args.bench_repeats} runs; runs and calibrations interleaved, all on CPU {args.cpu}\n")
    print("| rows/head | table params | per step | predicted | calibrations (min-max) | measured | runs (min-max) "
          "| error | within |")
    print("|---:|---:|---|---:|---:|---:|---:|---:|---|")
    for rows, params, k, w, wlo, whi, g, lo, hi, err, ok in lines:
        print(f"| {rows:,} | {params / 1e6:.1f}M | {k} | {_fmt(k, w)} | {_fmt(k, wlo)}-{_fmt(k, whi)} | {_fmt(k, g)} "
              f"| {_fmt(k, lo)}-{_fmt(k, hi)} "
              f"| {100 * err:+.1f}% | {'yes' if ok else 'NO'} |")
    print("\nThe same with medians, of the calibrations' predictions and of the runs' medians (not the check: on a "
          "shared machine a median mixes the core's fast and slow states, in whatever share each run met them):\n")
    print("| rows/head | per step | predicted | measured | error |")
    print("|---:|---|---:|---:|---:|")
    for rows, k, w, g in medians:
        print(f"| {rows:,} | {k} | {_fmt(k, w)} | {_fmt(k, g)} | {100 * (w / g - 1):+.1f}% |")
    print(f"\nLoad average (1, 5, 15 min) before and after each run and its calibration: {'; '.join(loads)}")
    print("\nWaits (wall clock on a shared machine; not part of the check):")
    for line in info:
        print("- " + line)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"calibration": calibrations, "cpu": args.cpu, "load_average": loads, "rows": [
                dict(rows_per_head=r, table_params=p, quantity=k, predicted=w, predicted_min=wlo, predicted_max=whi,
                     measured=g, measured_min=lo, measured_max=hi, error=e)
                for r, p, k, w, wlo, whi, g, lo, hi, e, _ in lines]}, f, indent=1)
    return 0 if ok_all else 1


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("overrides", nargs="*", help="world=N (the number of ranks) and Hydra overrides")
    ap.add_argument("--data-dir", default=None, help="a prepared directory whose corpus is sampled "
                    "(default: the config's data.dir, prepared as the trainer would)")
    ap.add_argument("--max-tokens", type=int, default=1 << 19,
                    help="largest batch sampled for the unique-row fit, in tokens (default 524288)")
    ap.add_argument("--repeats", type=int, default=2, help="batches sampled per size (default 2)")
    ap.add_argument("--step-time", type=float, default=None, help="measured compute seconds per step (instead of "
                    "FLOPs / (peak x MFU))")
    for k, v in HARDWARE.items():
        ap.add_argument(f"--{k.replace('_', '-')}", type=type(v), default=None, help=f"default {v:g}")
    ap.add_argument("--constants", default=None, help="CPU costs from --calibrate --json FILE")
    ap.add_argument("--calibrate", action="store_true", help="measure this machine's CPU costs and print them")
    ap.add_argument("--table-params", type=int, default=1 << 27,
                    help="--calibrate: table parameters of the calibration store (default 2^27: larger than caches)")
    ap.add_argument("--validate", action="store_true",
                    help="compare predictions with tools/bench_offload.py at two table sizes on this machine")
    ap.add_argument("--sizes", type=int, nargs=2, default=[100000, 400000],
                    help="--validate: rows per head of the two table sizes (default 100000 400000)")
    ap.add_argument("--steps", type=int, default=20, help="--validate: steps per bench_offload run (default 20)")
    ap.add_argument("--calibrations", type=int, default=1,
                    help="--validate: calibrations right after each bench_offload run, on its CPU; the median of "
                         "a size's predictions is compared (default 1)")
    ap.add_argument("--quantile", type=float, default=0.25,
                    help="--validate: the quantile of a run's timed steps and of each calibration point's rounds; "
                         "the least disturbed run and calibration are compared (default 0.25; a median mixes in "
                         "other tenants' load)")
    ap.add_argument("--cpu", type=int, default=None,
                    help="--validate: the CPU every bench_offload run and calibration runs on (default: the last "
                         "one this process may use)")
    ap.add_argument("--bench-repeats", type=int, default=3,
                    help="--validate: bench_offload runs per size, their medians' median compared (default 3)")
    ap.add_argument("--extra", nargs="*", default=[], help="--validate: more overrides for bench_offload's runs")
    ap.add_argument("--tolerance", type=float, default=0.25, help="--validate: largest relative error (0.25)")
    ap.add_argument("--workdir", default=None, help="--validate: where bench_offload runs (runs already there "
                    "are reused)")
    ap.add_argument("--json", default=None, help="also write the numbers to this file")
    args = ap.parse_args(argv)
    if min(args.max_tokens, args.repeats, args.bench_repeats, args.calibrations) < 1:
        fail(f"--max-tokens={args.max_tokens} --repeats={args.repeats} --bench-repeats={args.bench_repeats} "
             f"--calibrations={args.calibrations}: each must be >= 1")
    if args.calibrate:
        c = calibrate(table_floats=args.table_params)
        print(json.dumps({k: v for k, v in c.items() if k != "rounds"}, indent=1))   # every round: in --json
        if args.json:
            with open(args.json, "w") as f:
                json.dump(c, f, indent=1)
        return 0
    if args.validate:
        if not 0 < args.quantile < 1:
            fail(f"--quantile={args.quantile}: give a quantile between 0 and 1 (e.g. 0.25, or 0.5 for medians)")
        allowed = sorted(os.sched_getaffinity(0))
        args.cpu = allowed[-1] if args.cpu is None else args.cpu
        if args.cpu not in allowed:
            fail(f"--cpu={args.cpu}: this process may run on CPUs {allowed}; pick one of them")
        return validate(args)
    cfg, r, fits, hw, sources = plan_one(args.overrides, args)
    name = next((o.split("=", 1)[1] for o in args.overrides if o.startswith("experiment=")), "config")
    report(name, r, fits, hw, sources)
    print(f"  corpus: {r['corpus']['dir']} (tokenizer vocabulary {r['corpus']['vocab_size']:,})")
    print("  constants: " + ", ".join(f"{k} {v:g}" for k, v in hw.items() if k != "cuda"))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(r, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    from engram_train.errors import run_main

    sys.exit(run_main(main, prog="plan_offload"))
