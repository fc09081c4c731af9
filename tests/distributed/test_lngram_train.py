"""Lngram end to end through the real entry point: one process is the oracle for TP=2 (table rows
split over TP, counterfactual reads through its all-reduce) and for ``engram.partition=all`` on
DP=2 (all-to-all lookups and counterfactual reads); a run stopped at one layout resumes at another
with the uninterrupted losses.  Tables start non-zero so the router's surrogate is live at step 1."""

from __future__ import annotations

import json

import pytest

from tests.distributed.test_train import (TINY, _assert_close, data_overrides, launch, logged_steps,  # noqa: F401
                                          losses, val_losses)

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

LNGRAM = [o for o in TINY if not o.startswith("engram.")] + [
    "experiment=lngram_cpu", "engram.layer_ids=[0,1]", "engram.latent.routes=4", "engram.latent.bits=3",
    "engram.latent.orders=[2,3]", "engram.latent.memory_dim=16", "engram.table_init_std=0.02",
    "engram.optimizer=sparse_adam", "trainer.max_steps=5",
]
LNGRAM = [o for o in LNGRAM if o != "experiment=debug_cpu"]


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, data_overrides):  # noqa: F811
    run_dir = tmp_path_factory.mktemp("lngram_single")
    launch(1, LNGRAM + data_overrides + [f"run.dir={run_dir}"])
    return run_dir


def test_lngram_trains_in_one_process(oracle):
    ls = losses(oracle)
    assert sorted(ls) == [1, 2, 3, 4, 5] and ls[5] < ls[1]
    rows = [json.loads(line) for line in open(oracle / "metrics.jsonl")]
    # the readout's mass on the routes (1 - sink) is logged like Engram's gate
    assert all(0.0 < r["engram_gate_mean"] < 1.0 for r in rows if "loss" in r)


@pytest.mark.parametrize("name, extra", [
    ("tp2", ["parallel.tensor_parallel=2"]),         # rows split over TP (engram.partition=auto -> tp)
    ("all_dp2", ["engram.partition=all"]),           # rows split over both DP ranks
])
def test_lngram_parallel_matches_single_process(tmp_path, oracle, data_overrides, name, extra):  # noqa: F811
    run_dir = tmp_path / name
    launch(2, LNGRAM + data_overrides + extra + [f"run.dir={run_dir}"])
    _assert_close(losses(run_dir), losses(oracle), rtol=1e-4)
    _assert_close(val_losses(run_dir), val_losses(oracle), rtol=1e-4)


def test_lngram_resumes_at_another_layout(tmp_path, oracle, data_overrides):  # noqa: F811
    run_dir = tmp_path / "all_dp2_to_tp2"
    common = LNGRAM + data_overrides + [f"run.dir={run_dir}"]
    launch(2, common + ["engram.partition=all", "trainer.stop_at_step=2"])
    assert logged_steps(run_dir) == [0, 1, 2]
    out = launch(2, common + ["parallel.tensor_parallel=2"])
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} (step 2)" in out
    assert logged_steps(run_dir) == [0, 1, 2, 3, 4, 5]     # continued, not started over
    _assert_close(losses(run_dir), losses(oracle), rtol=1e-4)


def test_inspect_lngram_reports_symbols_rows_and_sink(oracle, tmp_path):
    """tools/inspect_lngram.py on the oracle's last checkpoint: symbol counts cover the validation
    batch on every route, dead codes and row counts agree with the counts and the table layout."""
    import subprocess
    import sys
    from pathlib import Path

    import torch

    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "tools" / "inspect_lngram.py"), str(oracle / "checkpoints"),
                           "--out", str(tmp_path / "insp")], capture_output=True, text=True, timeout=600,
                          env=dict(__import__("os").environ, DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "insp" / "report.json").read_text())
    assert report["step"] == 5 and sorted(report["layers"]) == ["0", "1"]
    B, T = report["tokens"]
    for layer in report["layers"].values():
        counts = torch.tensor(layer["symbol_counts"])                      # [routes=4, K=8]
        assert counts.shape == (4, 8) and counts.sum(1).tolist() == [B * T] * 4
        assert all(0.0 <= e <= 3.0 + 1e-9 for e in layer["symbol_entropy_bits"])
        assert layer["dead_codes"] == (counts == 0).sum(1).tolist()
        assert 0.0 < layer["sink_mass_mean"] < 1.0
        rows = {n: o["rows"] for n, o in layer["orders"].items()}
        assert rows == {"2": 4 * 8 ** 2, "3": 4 * 8 ** 3}
        # 5 steps of 8 x 64 tokens touch some rows of each order, never all of order 3
        assert 0 < layer["orders"]["2"]["touched_rows"] <= rows["2"]
        assert 0 < layer["orders"]["3"]["touched_rows"] < rows["3"]
    assert (tmp_path / "insp" / "symbols_layer0.png").is_file()
    assert "Lngram layer 0: readout mass on the sink" in proc.stdout
