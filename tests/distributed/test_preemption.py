"""Preemption where users meet it: a signal to ``launchers/torchrun.sh`` (the launcher's process is
torchrun's agent) stops every rank after the same step with a checkpoint, the launcher exits 0, and
the relaunch continues with the uninterrupted run's losses, bit for bit (CPU, same layout).

The preempted run is launched first (its stop step depends on when the signal lands), then resumed
for a few more steps with ``trainer.stop_at_step``; the uninterrupted run with the same schedule and
the same final step is the reference.  Dropout is on, so the RNG states (torch's and megatron's
tensor-parallel tracker) have to be restored too, not only weights, Adam state and data position.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from tests.distributed.test_train import TINY, _env, _write_corpus, launch, logged_steps, losses

pytestmark = [pytest.mark.distributed]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LAUNCHER = os.path.join(ROOT, "launchers", "torchrun.sh")

# A worker that stands in for the trainer: it stops on SIGTERM/SIGUSR1 with the given exit code.
WORKER = textwrap.dedent("""
    import os, signal, sys, time
    code = int(sys.argv[1])
    got = []
    for s in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(s, lambda n, f: got.append(n))
    open(os.path.join(sys.argv[2], "ready" + os.environ["LOCAL_RANK"]), "w").close()
    while not got:
        time.sleep(0.05)
    print(f"rank {os.environ['RANK']} stopping on signal {got[0]}", flush=True)
    sys.exit(code)
""")


def _wait_for(cond, proc, what: str, timeout: float = 300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if cond():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} (launcher rc={proc.poll()})")


@pytest.mark.parametrize("sig, worker_code, to_group, want_rc", [
    (signal.SIGTERM, 0, False, 0),    # kill PID of the launcher: forwarded
    (signal.SIGUSR1, 0, True, 0),     # SLURM style: the agent and its workers get it at once
    (signal.SIGTERM, 3, False, 1),    # a worker that fails after the signal still fails the launch
])
def test_graceful_torchrun_forwards_the_signal_and_returns_the_workers_status(tmp_path, sig, worker_code,
                                                                               to_group, want_rc):
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    proc = subprocess.Popen([sys.executable, "-m", "engram_train.torchrun", "--standalone", "--nproc-per-node=2", str(worker),
                             str(worker_code), str(tmp_path)], env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)
    try:
        _wait_for(lambda: all((tmp_path / f"ready{r}").exists() for r in range(2)), proc, "workers never started")
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        out, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    assert proc.returncode == want_rc, out
    for r in range(2):
        assert f"rank {r} stopping on signal {int(sig)}" in out
    if want_rc == 0:
        assert "Traceback" not in out and "SignalException" not in out, out


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    corpus = root / "corpus.jsonl"
    _write_corpus(str(corpus))
    return ["data.corpus=files", f"data.files=[{corpus}]", f"data.dir={root / 'prepared'}"]


# A long schedule (the signal must land mid-run) with dropout on; its LR still moves every step.
SCHEDULE = ["trainer.max_steps=400", "trainer.warmup_steps=3", "model.hidden_dropout=0.1",
            "model.attention_dropout=0.1"]
MORE_STEPS = 8   # after the resume: the drift once reported for TP=2 showed at the 4th


@pytest.mark.slow
@pytest.mark.parametrize("name, extra, sig, to_group", [
    ("tp2", ["parallel.tensor_parallel=2"], signal.SIGTERM, False),
    ("ep2", ["parallel.expert_parallel=2"], signal.SIGUSR1, True),
])
def test_preempted_launcher_exits_0_and_resumes_exactly(tmp_path, data_overrides, name, extra, sig, to_group):
    run_dir = tmp_path / name
    common = TINY + data_overrides + SCHEDULE + extra
    log_path = tmp_path / "preempted.log"   # a file, not a pipe: a full pipe would stall the run
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(["bash", LAUNCHER, "2", *common, f"run.dir={run_dir}"], env=_env(),
                                stdout=log_file, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # At least 5 steps, so that the resumed run has optimizer and RNG history to get wrong.
        _wait_for(lambda: (run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= 5, proc,
                  "the run never logged 5 steps: " + log_path.read_text()[-3000:])
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            proc.send_signal(sig)
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
    out = log_path.read_text()
    assert proc.returncode == 0, out[-6000:]
    assert "Traceback" not in out and "SignalException" not in out, out[-6000:]
    stopped = max(losses(run_dir))
    assert 5 <= stopped < 400
    # Every rank stopped after the same step, and that step's checkpoint holds every rank's files.
    assert out.count(f"stopped at step {stopped} with a checkpoint") == 2, out[-6000:]
    ckpt = run_dir / "checkpoints" / f"step_{stopped:08d}"
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == ckpt.name
    assert json.loads((ckpt / "meta.json").read_text())["step"] == stopped
    import torch.distributed.checkpoint as dcp

    keys = dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata
    assert sorted(k for k in keys if k.startswith("rng.")) == ["rng.rank_00000", "rng.rank_00001"]
    assert {p.name.split("_")[2] for p in ckpt.glob("__*_*.distcp")} == {"0", "1"}

    end = stopped + MORE_STEPS
    out = launch(2, common + [f"run.dir={run_dir}", f"trainer.stop_at_step={end}"])
    assert f"resumed from {ckpt} (step {stopped})" in out, out[-4000:]
    assert logged_steps(run_dir) == list(range(end + 1))   # step 0's evaluation, then each step once

    reference = tmp_path / "uninterrupted"
    launch(2, common + [f"run.dir={reference}", f"trainer.stop_at_step={end}"])
    assert losses(run_dir) == losses(reference)   # bit-identical: same layout, same CPU kernels
