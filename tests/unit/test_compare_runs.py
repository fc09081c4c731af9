"""tools/compare_runs.py on synthetic run directories with known metrics.

The expected numbers are computed here with numpy from the values written, not by the tool."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys

import numpy as np
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TOOL = os.path.join(ROOT, "tools", "compare_runs.py")
GBS, SEQ = 8, 64

# experiment -> seed -> (train loss per step 1..6, val loss at steps 0, 3, 6, tokens/s per logged step)
rng = np.random.default_rng(0)
METRICS = {
    exp: {seed: (base + 0.1 * rng.standard_normal(6) - 0.2 * np.arange(6),
                 base + 0.5 + 0.05 * rng.standard_normal(3) - 0.3 * np.arange(3),
                 1000 * (1 + i) + 50 * rng.standard_normal(6))
          for seed in (1, 2, 3)}
    for i, (exp, base) in enumerate((("debug_cpu", 8.0), ("moe_baseline_cpu", 8.2)))
}


def write_run(d, exp: str, seed: int, overrides=(), config=True) -> None:
    os.makedirs(d, exist_ok=True)
    train, val, tps = METRICS[exp][seed]
    rows = [{"step": 0, "val_loss": float(val[0]), "val_ppl": float(np.exp(val[0]))}]
    for s in range(1, 7):
        r = {"step": s, "loss": float(train[s - 1]), "lr": 1e-3, "tokens_per_s": float(tps[s - 1]), "grad_norm": 1.0}
        if s % 3 == 0:
            r.update(val_loss=float(val[s // 3]), val_ppl=float(np.exp(val[s // 3])))
        rows.append(r)
    with open(os.path.join(d, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)
    if config:
        with open(os.path.join(d, "config.yaml"), "w") as f:
            ov = "\n".join(f"- {o}" for o in [f"experiment={exp}", f"trainer.seed={seed}", *overrides])
            f.write(f"experiment: {exp}\noverrides:\n{ov}\ntrainer:\n  seed: {seed}\n"
                    f"data:\n  global_batch_size: {GBS}\n  seq_length: {SEQ}\nrun:\n  name: {exp}\n")


@pytest.fixture
def sweep(tmp_path):
    """A Hydra-sweep-like directory: one numbered job directory per (experiment, seed)."""
    root = tmp_path / "sweep"
    job = 0
    for exp in METRICS:
        for seed in (1, 2, 3):
            write_run(str(root / str(job)), exp, seed, overrides=["trainer.max_steps=6"])
            job += 1
    return root


def _cells(md: str, first: str):
    for line in md.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if cells[0] == first:
            return cells
    raise AssertionError(f"no row {first!r} in\n{md}")


def _pm(cell: str):
    m, s = re.match(r"([-+\d.,]+) ± ([\d.,]+)", cell).groups()
    return float(m.replace(",", "")), float(s.replace(",", ""))


def test_table_matches_independent_statistics(sweep, tmp_path):
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, TOOL, str(sweep), "--out", str(out)], capture_output=True, text=True,
                          env=dict(os.environ, MPLBACKEND="Agg"), timeout=120)
    assert proc.returncode == 0, proc.stderr
    md = (out / "summary.md").read_text()
    for exp, seeds in METRICS.items():
        train = np.array([seeds[s][0] for s in (1, 2, 3)])   # [seed, step]
        val = np.array([seeds[s][1] for s in (1, 2, 3)])
        tps = np.array([seeds[s][2][1:].mean() for s in (1, 2, 3)])   # first logged interval excluded
        cells = _cells(md, exp)
        assert cells[1].startswith("3 (1,2,3)")
        assert cells[2] == "6"
        np.testing.assert_allclose(_pm(cells[3]), (train[:, -1].mean(), train[:, -1].std(ddof=1)), atol=6e-5)
        np.testing.assert_allclose(_pm(cells[4].split("[")[0]), (val[:, -1].mean(), val[:, -1].std(ddof=1)),
                                   atol=6e-5)
        assert cells[4].endswith("[6]")
        ppl = np.exp(val[:, -1])
        np.testing.assert_allclose(_pm(cells[5]), (ppl.mean(), ppl.std(ddof=1)), atol=6e-3)
        best = val.min(axis=1)
        np.testing.assert_allclose(_pm(cells[6]), (best.mean(), best.std(ddof=1)), atol=6e-5)
        assert _pm(cells[7]) == (6 * GBS * SEQ, 0.0)
        np.testing.assert_allclose(_pm(cells[8]), (tps.mean(), tps.std(ddof=1)), atol=0.51)
    # B - A paired by seed at the last common step
    a, b = METRICS["debug_cpu"], METRICS["moe_baseline_cpu"]
    d_val = np.array([b[s][1][-1] - a[s][1][-1] for s in (1, 2, 3)])
    d_train = np.array([b[s][0][-1] - a[s][0][-1] for s in (1, 2, 3)])
    assert "moe_baseline_cpu − debug_cpu" in md and "Paired by seed" in md
    np.testing.assert_allclose(_pm(_cells(md, "val loss")[2]), (d_val.mean(), d_val.std(ddof=1)), atol=6e-5)
    np.testing.assert_allclose(_pm(_cells(md, "train loss")[2]), (d_train.mean(), d_train.std(ddof=1)), atol=6e-5)
    for name in ("loss_vs_step.png", "loss_vs_tokens.png", "diff_vs_step.png", "tokens_per_s.png"):
        with open(out / name, "rb") as f:
            assert f.read(8) == b"\x89PNG\r\n\x1a\n", name


def test_unpaired_difference_and_groups_by_differing_overrides(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("compare_runs", TOOL)
    cr = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = cr   # dataclasses look their module up there
    spec.loader.exec_module(cr)
    # Seeds 1,2 of A with engram.optimizer=adam and seeds 2,3 under sparse_adam: two groups, unpaired.
    write_run(str(tmp_path / "r1"), "debug_cpu", 1, ["engram.optimizer=adam"])
    write_run(str(tmp_path / "r2"), "debug_cpu", 2, ["engram.optimizer=adam"])
    write_run(str(tmp_path / "r3"), "debug_cpu", 2, ["engram.optimizer=sparse_adam"])
    write_run(str(tmp_path / "r4"), "debug_cpu", 3, ["engram.optimizer=sparse_adam"])
    res = cr.compare([str(tmp_path / f"r{i}") for i in (1, 2, 3, 4)], str(tmp_path / "out"), plots=False)
    assert list(res["summaries"]) == ["debug_cpu engram.optimizer=adam", "debug_cpu engram.optimizer=sparse_adam"]
    d = res["differences"][0]
    assert not d["paired"]
    va = np.array([METRICS["debug_cpu"][s][1][-1] for s in (1, 2)])
    vb = np.array([METRICS["debug_cpu"][s][1][-1] for s in (2, 3)])
    assert d["val_loss"]["mean"][-1] == pytest.approx(vb.mean() - va.mean(), abs=1e-12)
    assert d["val_loss"]["spread"][-1] == pytest.approx(
        np.sqrt(va.var(ddof=1) + vb.var(ddof=1)), abs=1e-12)


def test_run_without_config_is_its_own_group_and_errors_are_one_line(tmp_path):
    write_run(str(tmp_path / "old_run"), "debug_cpu", 1, config=False)
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, TOOL, str(tmp_path / "old_run"), "--out", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert _cells((out / "summary.md").read_text(), "old_run")[1].startswith("1 (?)")
    proc = subprocess.run([sys.executable, TOOL, str(tmp_path / "nothing_here"), "--out", str(out)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().count("\n") == 0 and "nothing_here" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("nproc", [1, 2])
def test_hydra_multirun_sweep_is_read_back(tmp_path, nproc):
    """``engram-train -m``: one run directory per job (fresh, not resuming the previous job), each with its
    config.yaml; compare_runs groups the sweep by experiment and seed.  Also under torchrun, where the
    jobs of the sweep run one after another in the same ranks."""
    from tests.distributed.test_train import TINY, _write_corpus

    _write_corpus(str(tmp_path / "corpus.jsonl"))
    data = ["data.corpus=files", f"data.files=[{tmp_path / 'corpus.jsonl'}]", f"data.dir={tmp_path / 'prepared'}"]
    sweep = tmp_path / "sweep"
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    proc = subprocess.run([sys.executable, *launcher, "-m", "engram_train.train.main", "-m", *TINY, *data, "trainer.max_steps=2",
                           "trainer.seed=1,2", f"hydra.sweep.dir={sweep}"], capture_output=True, text=True,
                          timeout=600, env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu",
                                                WANDB_MODE="disabled"))
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-4000:]
    assert "resumed from" not in proc.stdout + proc.stderr
    losses = {}
    for job, seed in (("0", 1), ("1", 2)):
        text = (sweep / job / "config.yaml").read_text()
        assert "experiment: debug_cpu" in text and f"seed: {seed}" in text
        assert f"dir: {sweep / job}" in text
        assert (sweep / job / "checkpoints" / "latest").read_text().strip() == "step_00000002"
        rows = [json.loads(line) for line in (sweep / job / "metrics.jsonl").read_text().splitlines()]
        losses[seed] = [r["loss"] for r in rows if "loss" in r]
    assert len(losses[1]) == 2 and losses[1] != losses[2]   # the seed reached the run
    out = tmp_path / "cmp"
    proc = subprocess.run([sys.executable, TOOL, str(sweep), "--out", str(out)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0, proc.stderr
    cells = _cells((out / "summary.md").read_text(), "debug_cpu")
    assert cells[1] == "2 (1,2)"
    np.testing.assert_allclose(_pm(cells[3]), (np.mean([losses[1][-1], losses[2][-1]]),
                                               np.std([losses[1][-1], losses[2][-1]], ddof=1)), atol=6e-5)
