"""tools/plan_offload.py: the power-law fit against a closed-form least squares, the unique-row count
against a set count of the hashed batches, the model's arithmetic against a hand computation, and the
calibration fit. Its one-line errors are in tests/unit/test_user_errors.py."""

import importlib.util
import math
import os
import random

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def tool():
    spec = importlib.util.spec_from_file_location("plan_offload", os.path.join(ROOT, "tools", "plan_offload.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_power_law_fit_matches_closed_form_least_squares(tool):
    rng = random.Random(3)
    xs = [2 ** k for k in range(4, 14)]
    ys = [37.0 * x ** 0.83 * math.exp(rng.uniform(-0.05, 0.05)) for x in xs]
    # Independent: the normal equations of y' = c + b x' in logs, written out.
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    b = sum((u - mx) * (v - my) for u, v in zip(lx, ly)) / sum((u - mx) ** 2 for u in lx)
    c = my - b * mx
    ss_res = sum((v - (c + b * u)) ** 2 for u, v in zip(lx, ly))
    ss_tot = sum((v - my) ** 2 for v in ly)
    a_fit, b_fit, r2 = tool.fit_power_law(xs, ys)
    assert b_fit == pytest.approx(b, rel=1e-9) and a_fit == pytest.approx(math.exp(c), rel=1e-9)
    assert r2 == pytest.approx(1 - ss_res / ss_tot, rel=1e-9)
    assert abs(b_fit - 0.83) < 0.02   # the noise is small: the exponent is recovered
    fit = tool.UniqueFit(a_fit, b_fit, rows=10_000, max_tokens=xs[-1])
    assert fit(1e12) == 10_000          # never more unique rows than the table has


def test_calibration_fit_recovers_known_costs(tool):
    c0, a, b = 2e-5, 3e-8, 1.5e-9
    samples = [(n, d, c0 + n * (a + b * d)) for n in (2048, 32768) for d in (16, 128)]
    got = tool._fit_cost(samples)
    assert got["c0"] == pytest.approx(c0, rel=1e-6) and got["per_item"] == pytest.approx(a, rel=1e-6)
    assert got["per_float"] == pytest.approx(b, rel=1e-6)
    # Per layer: the fixed cost is paid once per call (a micro-batch's gather, a step's update), by predict.
    assert tool.cpu_time({"gather": got}, "gather", 1000, 80, threads=4) == pytest.approx(1000 * (a + b * 80) / 4)
    # Whole two-layer updates: the optimizer's and the refresh's per-row costs are told apart.
    adam, fresh = dict(c0=1e-3, per_item=3e-7, per_float=1.5e-8), dict(c0=0.0, per_item=2e-8, per_float=3e-9)
    samples = [(r, blk, d, adam["c0"] + 2 * (r * (adam["per_item"] + adam["per_float"] * d)
                                             + blk * (fresh["per_item"] + fresh["per_float"] * d)))
               for r in (2048, 32768) for blk in (r // 8, r) for d in (16, 128)]
    got_adam, got_fresh = tool._fit_update(samples, 2)
    for k in adam:
        assert got_adam[k] == pytest.approx(adam[k], rel=1e-6, abs=1e-15)
        assert got_fresh[k] == pytest.approx(fresh[k], rel=1e-6, abs=1e-15)


def test_unique_rows_of_the_corpus_match_a_set_count(tool, tmp_path):
    import torch

    from engram_train.config.store import compose
    from engram_train.data.loader import _open_split
    from engram_train.data.prepare import prepare_data

    rng = random.Random(0)
    words = [f"w{i}" for i in range(60)]
    (tmp_path / "c.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(200)) for _ in range(40)))
    cfg = compose(["experiment=debug_cpu", "data.corpus=files", f"data.files=[{tmp_path / 'c.txt'}]",
                   f"data.dir={tmp_path / 'd'}", "data.vocab_size=300", "data.seq_length=32",
                   "engram.table_size_per_ngram=[101,103]"])
    prepared = prepare_data(cfg.data, progress=False)
    points, hasher, starts = tool.measure_unique(prepared, cfg, max_tokens=32 * 8, repeats=2)
    samples = _open_split(prepared, "train", 32, cfg.trainer.seed, None)
    for layer, pts in points.items():
        assert [t for t, _ in pts] == [32 * s for s in (1, 2, 4, 8)] * 2
        for r, start in enumerate(starts):
            for i, s in enumerate((1, 2, 4, 8)):
                tokens = torch.stack([samples[g]["tokens"] for g in range(start, start + s)])
                ids = hasher(tokens)[layer].reshape(-1, hasher.num_heads)
                distinct = {(h, int(v)) for row in ids.tolist() for h, v in enumerate(row)}
                assert pts[4 * r + i][1] == len(distinct)


def _cfg(*extra):
    from engram_train.config.store import compose

    return compose(["experiment=debug_cpu", "engram.residency=host", "engram.optimizer=sparse_adam",
                    "data.micro_batch_size=2", "data.global_batch_size=16", *extra])


HW = dict(peak_tflops=1.0, mfu=1.0, pcie_gbps=10.0, host_mem_gbps=1000.0, cores=2, nic_gbps=5.0, nvlink_gbps=50.0,
          hbm_gbps=1000.0, ranks_per_node=2, cuda=True)
COSTS = {"plan": {"c0": 0.0, "per_item": 1e-8, "per_float": 0.0},
         "gather": {"c0": 0.0, "per_item": 1e-7, "per_float": 0.0},
         "adam": {"c0": 1e-4, "per_item": 1e-6, "per_float": 0.0},
         "refresh": {"c0": 0.0, "per_item": 1e-7, "per_float": 0.0}}


def test_model_arithmetic_partition_all_by_hand(tool):
    cfg = _cfg("engram.partition=all")
    fits = {l: tool.UniqueFit(2.0, 0.5, rows=10 ** 9, max_tokens=4096) for l in (1, 3)}
    r = tool.predict(cfg, 4, HW, COSTS, fits, step_time=1.0)
    # By hand: T 256, micro-batch 2 -> 512 tokens, DP 4, accumulation 16 / (2 x 4) = 2; 8 heads of d = 16.
    d, L, n, accum, world = 16, 2, 2 * 256 * 8, 2, 4
    u = 2.0 * 512 ** 0.5                       # a rank's unique rows per layer
    block = 2.0 * (4 * 512) ** 0.5 / world     # the owner's rows: DP micro-batches, a quarter of the rows
    step_rows = 2.0 * (16 * 256) ** 0.5 / world
    assert r["accumulation"] == accum and r["micro_batch"]["block_rows"] == pytest.approx(L * block)
    t_plan = L * (n * 1e-8 + u * 1e-8)
    t_gather = L * block * 1e-7
    h2d = L * (block * 4 * d + 8 * n + 16 * u)  # rows, the ids' inverse, the requests served and their inverse
    t_ids = L * 8 * u * 0.5 / 5e9               # half of the other ranks are on the other node
    t_pf = t_plan + t_gather + h2d / 10e9 + t_ids
    assert r["micro_batch"]["h2d_bytes"] == pytest.approx(h2d)
    assert r["micro_batch"]["t_prefetch"] == pytest.approx(t_pf)
    moved = u * 4 * d * 3 / 4 * 2               # rows back and gradient rows out (TP 1: every rank sends)
    net = u * 4 * d * 0.5 * 2
    assert r["micro_batch"]["t_exchange"] == pytest.approx(L * (net / 5e9 + (moved - net) / 50e9))
    t_adam = 1e-4 + L * max(step_rows * 1e-6 / 2, step_rows * (28 * d + 16) / 1e12)   # one call per step
    t_ts = t_adam + L * block * 1e-7           # + the refresh, bounded by re-reading the block
    assert r["step"]["table_rows"] == pytest.approx(L * step_rows)
    assert r["step"]["t_table_step"] == pytest.approx(t_ts)
    assert r["step"]["written_bytes"] == pytest.approx(L * step_rows * (12 * d + 4))
    d2h = L * step_rows * (4 * d + 8) / 10e9
    window = 0.5 * (1 / 3) * 1 / 4              # micro-batch 0.5 s, forward 1/3, first Engram layer 1 of 4
    expect = 1.0 + accum * max(0, t_pf - 0.5) + max(0, t_ts - window) + d2h + accum * r["micro_batch"]["t_exchange"]
    assert r["step_s"] == pytest.approx(expect)
    assert r["exposed_s"]["table step"] == pytest.approx(max(0, t_ts - window))


def test_model_arithmetic_tp_gradient_all_gather_and_staleness(tool):
    fits = {l: tool.UniqueFit(2.0, 0.5, rows=10 ** 9, max_tokens=4096) for l in (1, 3)}
    r = tool.predict(_cfg("engram.partition=tp", "parallel.tensor_parallel=2", "engram.staleness=1"), 4, HW, COSTS,
                     fits, step_time=1.0)
    # TP 2 x DP 2, accumulation 16 / (2 x 2) = 4; a TP rank reads half of the micro-batch's unique rows.
    d, L, accum = 16, 2, 4
    u = 2.0 * 512 ** 0.5
    pending = accum * (u / 2) * (4 * d + 8)     # per layer: every micro-batch's rows, not deduplicated
    # DP peers: 2, one on this node (2 ranks per node / TP 2 = 1 DP rank per node) -> half off the node.
    assert r["step"]["grad_net_bytes"] == pytest.approx(L * (2 - 1) * pending * 0.5)
    assert r["micro_batch"]["t_exchange"] == pytest.approx(L * 2 * (2 - 1) / 2 * u * 4 * d / 50e9)
    t_pf, t_ts = r["micro_batch"]["t_prefetch"], r["step"]["t_table_step"]
    assert r["step"]["t_refresh"] == 0            # staleness 1: no refresh ...
    assert r["exposed_s"]["table step"] == pytest.approx(max(0, t_ts + t_pf - 0.25))   # ... and a micro-batch's window


def test_device_tables_step_on_hbm(tool):
    fits = {l: tool.UniqueFit(2.0, 0.5, rows=1000, max_tokens=4096) for l in (1, 3)}
    r = tool.predict(_cfg("engram.residency=device", "engram.optimizer=adam"), 1, HW, COSTS, fits, step_time=1.0)
    # adam steps every row of the shard (1000 per layer here), on HBM; nothing crosses PCIe.
    assert r["step"]["t_adam"] == pytest.approx(2 * 1000 * (7 * 64 + 16) / 1e12)
    assert r["micro_batch"]["h2d_bytes"] == 0 and r["step"]["d2h_bytes"] == 0
