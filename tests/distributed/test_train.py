"""End-to-end training through the real entry point (``python -m engram_train.train.main``).

Every run is its own process group (torchrun, gloo on CPU), so these are the same code
paths a user launches.  The single-process run with the same seed and the same global
batch is the oracle for the TP=2 and EP=2 runs; a resumed run must reproduce the
uninterrupted run's losses exactly, also when it falls back past a damaged checkpoint;
ZeRO-1 and ZeRO-2 with CPU optimizer offload must train (and follow the plain run
closely: they are the same math).
"""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

TINY = [
    "experiment=debug_cpu",
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.ffn_hidden_size=128", "model.moe_ffn_hidden_size=64", "model.max_seq_length=64",
    "model.num_experts=4", "model.moe_router_topk=2",
    "engram.layer_ids=[0,1]", "engram.n_embed_per_ngram=32", "engram.heads_per_ngram=4",
    "engram.table_size_multiplier=2.0",
    "data.seq_length=64", "data.micro_batch_size=4", "data.global_batch_size=8", "data.vocab_size=512",
    "data.valid_fraction=0.05",
    "trainer.warmup_steps=1", "trainer.log_interval=1", "trainer.eval_interval=1000",
    "trainer.eval_iters=2", "trainer.save_interval=1000", "trainer.progress=false",
    "run.wandb_mode=disabled",
]

WORDS = ("the king queen lord lady sword crown night day love death fair foul speak hear thou thee "
         "art hath doth shall will must come go stay fly sweet bitter heart blood grace honour "
         "Hamlet Romeo Juliet Verona Denmark England Ophelia Macbeth ghost witch storm sea").split()


def _write_corpus(path: str, n_docs: int = 300, seed: int = 0) -> None:
    rng = random.Random(seed)
    docs = []
    for _ in range(n_docs):
        sents = []
        for _ in range(rng.randint(4, 12)):
            w = [rng.choice(WORDS) for _ in range(rng.randint(4, 14))]
            sents.append(" ".join(w).capitalize() + rng.choice([".", "!", "?", ";"]))
        docs.append({"text": " ".join(sents)})
    with open(path, "w") as f:
        for d in docs:
            f.write(json.dumps(d) + "\n")


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus = root / "corpus.jsonl"
    _write_corpus(str(corpus))
    return [f"data.corpus=files", f"data.files=[{corpus}]", f"data.dir={root / 'prepared'}"]


def _env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")


def launch(nproc: int, overrides, timeout: int = 600) -> str:
    """Run training to completion; returns its stdout and stderr (the log) for tests to check."""
    env = _env()
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
           "-m", "engram_train.train.main", *overrides]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if proc.returncode != 0:
        raise AssertionError(f"training failed (rc={proc.returncode}):\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}")
    return proc.stdout + proc.stderr


def losses(run_dir) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return {r["step"]: r["loss"] for r in rows if "loss" in r}


def logged_steps(run_dir, name: str = "metrics.jsonl") -> list:
    return [json.loads(line)["step"] for line in open(os.path.join(run_dir, name)) if line.strip()]


def val_losses(run_dir) -> dict:
    rows = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


@pytest.fixture(scope="module")
def oracle(tmp_path_factory, data_overrides):
    """Single process, 4 steps: the reference for every other run."""
    run_dir = tmp_path_factory.mktemp("single")
    launch(1, TINY + data_overrides + ["trainer.max_steps=4", f"run.dir={run_dir}"])
    return run_dir


def _assert_close(got: dict, want: dict, rtol: float):
    assert sorted(got) == sorted(want), (got, want)
    for step in want:
        assert abs(got[step] - want[step]) <= rtol * abs(want[step]), (step, got[step], want[step])


def test_single_process_trains_and_writes_outputs(oracle):
    ls = losses(oracle)
    assert sorted(ls) == [1, 2, 3, 4]
    assert ls[4] < ls[1]
    vals = val_losses(oracle)
    assert 0 in vals and 4 in vals and vals[4] < vals[0]
    rows = [json.loads(line) for line in open(oracle / "metrics.jsonl")]
    train_rows = [r for r in rows if "loss" in r]
    for key in ("lr", "tokens_per_s", "grad_norm", "engram_gate_mean"):
        assert all(key in r for r in train_rows), key
    latest = (oracle / "checkpoints" / "latest").read_text().strip()
    assert (oracle / "checkpoints" / latest / "meta.json").is_file()


@pytest.mark.parametrize("name, nproc, extra", [
    ("tp2", 2, ["parallel.tensor_parallel=2"]),                   # table rows split over TP (engram.partition=auto)
    ("ep2", 2, ["parallel.expert_parallel=2"]),
    ("all_dp2", 2, ["engram.partition=all"]),                     # rows split over both DP ranks, all-to-all
])
def test_parallel_run_matches_single_process(tmp_path, oracle, data_overrides, name, nproc, extra):
    run_dir = tmp_path / name
    launch(nproc, TINY + data_overrides + extra + ["trainer.max_steps=4", f"run.dir={run_dir}"])
    _assert_close(losses(run_dir), losses(oracle), rtol=1e-4)
    _assert_close(val_losses(run_dir), val_losses(oracle), rtol=1e-4)


@pytest.mark.parametrize("name, first, second", [
    ("tp2_to_tp1", (2, ["parallel.tensor_parallel=2"]), (1, [])),
    ("all_dp2_to_tp2", (2, ["engram.partition=all"]), (2, ["parallel.tensor_parallel=2"])),
])
def test_stopped_run_resumes_at_another_layout(tmp_path, oracle, data_overrides, name, first, second):
    """Reshard: dense weights with their ZeRO state and table rows with theirs, saved at one layout,
    continue at another; the continuing losses are the uninterrupted run's."""
    run_dir = tmp_path / name
    common = TINY + data_overrides + ["trainer.max_steps=4", f"run.dir={run_dir}"]
    launch(first[0], common + first[1] + ["trainer.stop_at_step=2"])
    assert logged_steps(run_dir) == [0, 1, 2]
    out = launch(second[0], common + second[1])
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} (step 2)" in out
    assert logged_steps(run_dir) == [0, 1, 2, 3, 4]     # continued, not started over
    _assert_close(losses(run_dir), losses(oracle), rtol=1e-4)


HOST = ["engram.optimizer=sparse_adam", "trainer.max_steps=8"]


@pytest.fixture(scope="module")
def device_sparse(tmp_path_factory, data_overrides):
    """Device-resident tables with sparse_adam, 8 steps: the oracle of the host-resident runs."""
    runs = {}
    for name, nproc, extra in (("single", 1, []), ("all_dp2", 2, ["engram.partition=all"])):
        run_dir = tmp_path_factory.mktemp(f"device_sparse_{name}")
        launch(nproc, TINY + data_overrides + HOST + extra + [f"run.dir={run_dir}"])
        runs[name] = run_dir
    return runs


@pytest.mark.parametrize("name, nproc, extra, oracle_name, rtol", [
    ("single", 1, [], "single", 1e-5),
    ("all_dp2", 2, ["engram.partition=all"], "all_dp2", 1e-5),
    # Both offloads at once: dense optimizer state on the CPU (ZeRO-Offload), tables in host RAM.
    ("zero2_offload", 1, ["parallel.zero_stage=2", "parallel.offload_optimizer=cpu"], "single", 1e-4),
])
def test_host_resident_tables_train_like_device_resident(tmp_path, device_sparse, data_overrides, name, nproc, extra,
                                                         oracle_name, rtol):
    run_dir = tmp_path / name
    out = launch(nproc, TINY + data_overrides + HOST + extra + ["engram.residency=host", f"run.dir={run_dir}"])
    _assert_close(losses(run_dir), losses(device_sparse[oracle_name]), rtol=rtol)
    if nproc == 1:   # the prefetch pipeline ran and says so in the metrics
        rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if '"loss"' in line]
        assert all(r["engram_prefetch/rows"] > 0 and 0 < r["engram_prefetch/unique_ratio"] <= 1 for r in rows)
    assert "Engram tables (" in out


@pytest.mark.parametrize("first, second", [("host", "device"), ("device", "host")])
def test_host_and_device_checkpoints_are_interchangeable(tmp_path, device_sparse, data_overrides, first, second):
    run_dir = tmp_path / f"{first}_to_{second}"
    common = TINY + data_overrides + HOST + [f"run.dir={run_dir}"]
    launch(1, common + [f"engram.residency={first}", "trainer.stop_at_step=4"])
    out = launch(1, common + [f"engram.residency={second}"])
    assert "(step 4)" in out and logged_steps(run_dir) == list(range(9))
    _assert_close(losses(run_dir), losses(device_sparse["single"]), rtol=1e-5)


def test_resume_reproduces_uninterrupted_run_exactly(tmp_path, oracle, data_overrides):
    run_dir = tmp_path / "resumed"
    # Same schedule (max_steps=4) as the oracle, interrupted after a checkpoint at step 2.
    launch(1, TINY + data_overrides + ["trainer.max_steps=4", "trainer.save_interval=2",
                                       f"run.dir={run_dir}", "trainer.stop_at_step=2"])
    assert sorted(losses(run_dir)) == [1, 2]
    out = launch(1, TINY + data_overrides + ["trainer.max_steps=4", "trainer.save_interval=2", f"run.dir={run_dir}"])
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} (step 2)" in out, out[-4000:]
    got, want = losses(run_dir), losses(oracle)
    assert got == want  # bit-identical on CPU
    # The history is appended to, not restarted: step 0's evaluation and every step once.
    assert logged_steps(run_dir) == [0, 1, 2, 3, 4]


def test_fallback_from_a_damaged_latest_checkpoint_reproduces_the_run(tmp_path, oracle, data_overrides):
    run_dir = tmp_path / "fallback"
    overrides = TINY + data_overrides + ["trainer.max_steps=4", "trainer.save_interval=1", f"run.dir={run_dir}"]
    launch(1, overrides + ["trainer.stop_at_step=3"])
    ckpts = run_dir / "checkpoints"
    assert (ckpts / "latest").read_text().strip() == "step_00000003"
    (data,) = (ckpts / "step_00000003").glob("__0_*.distcp")   # the data file
    with open(data, "r+b") as f:
        f.truncate(data.stat().st_size // 2)

    out = launch(1, overrides)
    assert f"checkpoint {ckpts / 'step_00000003'} failed to load (torch.distributed.checkpoint, rank 0: " \
        in out, out[-4000:]
    assert f"falling back to the older checkpoint {ckpts / 'step_00000002'}" in out
    assert f"resumed from {ckpts / 'step_00000002'} (step 2)" in out
    assert losses(run_dir) == losses(oracle)   # step 3 redone from step 2's state: bit-identical
    assert logged_steps(run_dir) == [0, 1, 2, 3, 4]
    assert logged_steps(run_dir, "metrics.superseded.jsonl") == [3]
    assert (ckpts / "latest").read_text().strip() == "step_00000004"


@pytest.mark.parametrize("name, extra", [
    ("zero1", ["parallel.zero_stage=1"]),
    ("zero2_offload", ["parallel.zero_stage=2", "parallel.offload_optimizer=cpu"]),
])
def test_zero_stages_train(tmp_path, oracle, data_overrides, name, extra):
    run_dir = tmp_path / name
    launch(2, TINY + data_overrides + extra + ["trainer.max_steps=4", f"run.dir={run_dir}"])
    got, want = losses(run_dir), losses(oracle)
    assert got[4] < got[1]
    # DP=2 with the same global batch is the same optimization problem as the single process.
    _assert_close(got, want, rtol=1e-3)


def test_sigterm_stops_with_a_checkpoint_and_the_run_resumes(tmp_path, data_overrides):
    """Preemption (SLURM sends SIGTERM): the step in flight finishes, a checkpoint is written, exit 0;
    a relaunch resumes right after that step."""
    import signal
    import time

    run_dir = tmp_path / "preempted"
    overrides = [*TINY, *data_overrides, "trainer.max_steps=100000", f"run.dir={run_dir}"]
    env = _env()
    log_path = tmp_path / "preempted.log"   # a file, not a pipe: a full pipe would stall the run
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen([sys.executable, "-m", "engram_train.train.main", *overrides], env=env,
                                stdout=log_file, stderr=subprocess.STDOUT)
    metrics = run_dir / "metrics.jsonl"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(losses(run_dir)) >= 2:
            break
        time.sleep(0.5)
    assert proc.poll() is None, log_path.read_text()[-4000:]
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=300)
    err = log_path.read_text()
    assert proc.returncode == 0, err[-4000:]
    stopped_at = max(losses(run_dir))
    assert 2 <= stopped_at < 100000
    assert f"stopped at step {stopped_at} with a checkpoint" in err
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at:08d}"
    meta = json.loads((run_dir / "checkpoints" / latest / "meta.json").read_text())
    assert meta["step"] == stopped_at and meta["consumed_samples"] == stopped_at * 8

    launch(1, overrides + [f"trainer.stop_at_step={stopped_at + 2}"])
    assert sorted(losses(run_dir)) == list(range(1, stopped_at + 3))
    latest = (run_dir / "checkpoints" / "latest").read_text().strip()
    assert latest == f"step_{stopped_at + 2:08d}"
