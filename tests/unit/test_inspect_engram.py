"""tools/inspect_engram.py on checkpoints of 2-step tiny training runs.

The touched fraction is checked against a count made here from the checkpoint's own tensors, read
with torch.distributed.checkpoint's format converter (not through the tool or the table store):
``row_steps > 0`` for sparse_adam (written by 2 ranks with rows split over both), and a nonzero
second moment for adam (the tool uses "moved from its initial value" there: a different criterion)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from tests.distributed.test_train import TINY, _write_corpus

pytestmark = pytest.mark.slow

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "inspect_engram.py")


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled", MPLBACKEND="Agg")


def _train(run_dir, nproc, overrides):
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    cmd = [sys.executable, *launcher, "-m", "engram_train.train.main", *TINY, *overrides, "trainer.max_steps=2", f"run.dir={run_dir}"]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-6000:]


def _checkpoint_tensors(step_dir):
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    out = os.path.join(step_dir, "..", "..", "tables.pt")
    dcp_to_torch_save(step_dir, out)
    return torch.load(out, weights_only=False)["tables"]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    _write_corpus(str(root / "corpus.jsonl"))
    return [f"data.corpus=files", f"data.files=[{root / 'corpus.jsonl'}]", f"data.dir={root / 'prepared'}"]


@pytest.mark.parametrize("optimizer,nproc,extra", [
    ("sparse_adam", 2, ["engram.partition=all"]),
    ("adam", 1, []),
])
def test_touched_fraction_matches_the_checkpoint(tmp_path, data, optimizer, nproc, extra):
    run_dir = tmp_path / "run"
    _train(run_dir, nproc, data + extra + [f"engram.optimizer={optimizer}"])
    out = tmp_path / "inspect"
    proc = subprocess.run([sys.executable, TOOL, str(run_dir / "checkpoints"), "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    report = json.loads((out / "report.json").read_text())
    assert report["step"] == 2 and report["checkpoint"].endswith("step_00000002")
    sd = _checkpoint_tensors(report["checkpoint"])
    assert sorted(report["layers"]) == ["0", "1"]
    for layer_id, r in report["layers"].items():
        key = f"engram_tables.layer{layer_id}" if f"engram_tables.layer{layer_id}.weight" in sd else \
            next(k[:-len(".weight")] for k in sd if k.endswith(f"layer{layer_id}.weight"))
        if optimizer == "sparse_adam":
            touched = sd[f"{key}.row_steps"] > 0
        else:
            touched = (sd[f"{key}.exp_avg_sq"] != 0).any(dim=1)
        assert r["rows"] == touched.numel()
        assert r["touched_rows"] == int(touched.sum())
        assert 0 < r["touched_rows"] < r["rows"]
        norms = sd[f"{key}.weight"].norm(dim=1)
        assert r["row_norm_touched_mean"] == pytest.approx(float(norms[touched].mean()), rel=1e-5)
        assert 0.0 < r["gate_mean"] < 1.0
        assert (out / f"gates_layer{layer_id}.png").is_file() and (out / f"rows_layer{layer_id}.png").is_file()
    assert "rows touched" in proc.stdout
