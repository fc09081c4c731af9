"""tools/bench_engram_overhead.py without its minutes of training: the timers it sets on an Engram block
change nothing the block computes and time each part, and its summary is the arithmetic it documents."""

from __future__ import annotations

import statistics

import pytest
import torch

from engram_train.engram.block import EngramBlock
from tools.bench_engram_overhead import PARTS, _instrument_block, _Split, summarize


def _block():
    torch.manual_seed(0)
    blk = EngramBlock(16, 2, [11, 13, 17, 19], 8, 2, 3, table_init_std=0.1)
    torch.nn.init.normal_(blk.conv.weight, std=0.3)   # zero-initialized by the paper's policy: make it count
    return blk


def test_timers_change_nothing_and_time_each_part():
    ids = torch.randint(0, 11, (2, 6, 4))
    hidden = torch.randn(2, 6, 2, 16)
    results = []
    for instrumented in (False, True):
        blk = _block()
        split = _Split(cuda=False)
        if instrumented:
            _instrument_block(blk, split)
            split.on = True
        h = hidden.clone().requires_grad_(True)
        out = blk(h, ids)
        out.square().sum().backward()
        results.append((out.detach(), h.grad, blk.key_proj.weight.grad, blk.conv.weight.grad, blk.table.weight.grad))
        parts = split.pop()
    for a, b in zip(*results):
        assert torch.equal(a, b)
    assert set(parts) == set(PARTS)
    for part in ("gather_exchange", "projections_gate", "conv"):
        assert parts[part] > 0, part
    assert parts["hashing"] == parts["table_step"] == 0.0   # not the block's


def test_timers_record_nothing_while_off():
    blk, split = _block(), _Split(cuda=False)
    _instrument_block(blk, split)
    blk(torch.randn(1, 4, 2, 16, requires_grad=True), torch.zeros(1, 4, 4, dtype=torch.int64)).sum().backward()
    assert all(v == 0.0 for v in split.pop().values())


def test_summary_is_the_median_over_window_pairs_of_each_pairs_median_ratio():
    p = {k: 0.001 * (i + 1) for i, k in enumerate(PARTS)}      # 1..5 ms
    m = {"windows": {"engram": [[0.30, 0.32, 0.31], [0.40, 0.42, 0.41], [0.33, 0.33, 0.33]],
                     "no_engram": [[0.20, 0.21, 0.22], [0.25, 0.26, 0.27], [0.30, 0.30, 0.30]]},
         "parts": [p, p], "device": "cpu", "clock": "cpu", "torch_threads": 1, "tokens_per_step": 1000}
    s = summarize(m, {"engram": 105.0, "no_engram": 100.0})
    ratios = [0.31 / 0.21, 0.41 / 0.26, 0.33 / 0.30]
    assert s["step_time_ratio"] == pytest.approx(statistics.median(ratios))
    assert s["step_time_ratio_spread"] == pytest.approx([min(ratios), max(ratios)])
    engram_ms = 1e3 * statistics.median([0.30, 0.32, 0.31, 0.40, 0.42, 0.41, 0.33, 0.33, 0.33])
    base_ms = 1e3 * statistics.median([0.20, 0.21, 0.22, 0.25, 0.26, 0.27, 0.30, 0.30, 0.30])
    assert s["engram_extra_ms"] == pytest.approx(engram_ms - base_ms)
    assert s["split_ms"]["conv"] == pytest.approx(4.0)
    assert s["split_ms"]["other"] == pytest.approx(engram_ms - base_ms - 15.0)
    assert s["ratio_per_active_flop"] == pytest.approx(statistics.median(ratios) / 1.05)
    assert s["tokens_per_s"]["no_engram"] == pytest.approx(1000 / (base_ms / 1e3))
    assert s["timed_steps"] == {"engram": 9, "no_engram": 9} and s["window_pairs"] == 3


def test_bench_engram_block_builds_the_model_s_block_at_the_experiment_s_shape(capsys):
    from engram_train.config.store import compose
    from tools import bench_engram_block

    cfg = compose(["experiment=debug_cpu", "model.hc_mult=2"])
    block, (hidden, rows, cot), _ = bench_engram_block.build("debug_cpu", ["model.hc_mult=2"])
    assert (block.hc_mult, block.hidden_size, block.max_ngram) == (2, cfg.model.hidden_size, cfg.engram.max_ngram)
    B, T = cfg.data.micro_batch_size, cfg.data.seq_length
    assert hidden.shape == cot.shape == (B, T, 2, cfg.model.hidden_size) and not hidden.is_contiguous()
    assert rows.shape == (B, T, (cfg.engram.max_ngram - 1) * cfg.engram.n_embed_per_ngram)
    assert bench_engram_block.call(block.fuse, (hidden, rows, cot)) > 0 and hidden.grad is not None
    bench_engram_block.main(["--calls", "1"])
    assert "eager     median" in capsys.readouterr().out
