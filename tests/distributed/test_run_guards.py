"""The three faults of a long run, through the real entry point (``python -m engram_train.train.main``):
divergence (a learning rate of 1e30 without clipping makes step 4 NaN), a full filesystem (a tmpfs
mounted by the test, as root), and two launches into one ``run.dir``.

Each run is the TINY model of test_train on one process unless said otherwise; a run takes ~15 s.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid

import pytest

from tests.distributed.test_train import TINY, _env, _write_corpus, logged_steps, losses
from tests.unit.test_user_errors import _assert_one_clear_error

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
TRAIN = [sys.executable, "-m", "engram_train.train.main"]
DIVERGE = ["trainer.lr=1e30", "trainer.min_lr=0", "trainer.grad_clip=0"]   # step 3's update blows up; step 4 is NaN


@pytest.fixture(scope="module")
def common(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpus")
    _write_corpus(str(root / "corpus.jsonl"))
    return TINY + ["data.corpus=files", f"data.files=[{root / 'corpus.jsonl'}]", f"data.dir={root / 'prepared'}"]


def _run(args, timeout=300, nproc=1):
    cmd = TRAIN if nproc == 1 else [sys.executable, "-m", "engram_train.torchrun", "--standalone",
                                    f"--nproc-per-node={nproc}", "-m", "engram_train.train.main"]
    return subprocess.run(cmd + list(args), env=_env(), capture_output=True, text=True, timeout=timeout, cwd=ROOT)


def _ok(proc):
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc.stdout + proc.stderr


def _ckpts(run_dir):
    d = os.path.join(run_dir, "checkpoints")
    return sorted(n for n in os.listdir(d) if n.startswith("step_")), open(os.path.join(d, "latest")).read().strip()


def _meta(run_dir, name):
    return json.load(open(os.path.join(run_dir, "checkpoints", name, "meta.json")))


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, common):
    """Two good steps with a checkpoint at step 2: the state every divergence below starts from."""
    run_dir = tmp_path_factory.mktemp("healthy") / "run"
    _ok(_run(common + [f"run.dir={run_dir}", "trainer.max_steps=2", "trainer.save_interval=2"]))
    return run_dir


def _copy(healthy, tmp_path, name):
    shutil.copytree(healthy, tmp_path / name)
    return tmp_path / name


# -- divergence -------------------------------------------------------------------------------------
def test_stop_ends_a_diverging_run_with_one_line_and_the_checkpoint_before_it_resumes(tmp_path, common, healthy):
    run_dir = _copy(healthy, tmp_path, "stop")
    proc = _run(common + DIVERGE + [f"run.dir={run_dir}", "trainer.max_steps=20", "trainer.save_interval=2"])
    line = _assert_one_clear_error(proc, "step 4: non-finite loss nan or gradient norm inf (trainer.nonfinite=stop)",
                                   f"{run_dir}/checkpoints/step_00000002, is from before it")
    assert "without saving this state" in line
    assert _ckpts(run_dir) == (["step_00000002"], "step_00000002")   # no checkpoint of the bad state
    assert logged_steps(run_dir) == [0, 1, 2, 3, 4]                  # the bad step is in the metrics
    # A relaunch with a sane learning rate resumes from the checkpoint before the divergence.
    out = _ok(_run(common + [f"run.dir={run_dir}", "trainer.max_steps=20", "trainer.stop_at_step=4"]))
    assert f"resumed from {run_dir}/checkpoints/step_00000002 (step 2)" in out
    assert logged_steps(run_dir) == [0, 1, 2, 3, 4]
    assert all(v == v and v < 10 for v in losses(run_dir).values())   # finite again


def test_skip_drops_the_updates_and_stops_after_max_skipped_steps(tmp_path, common, healthy):
    run_dir = _copy(healthy, tmp_path, "skip")
    proc = _run(common + DIVERGE + [f"run.dir={run_dir}", "trainer.max_steps=20", "trainer.save_interval=2",
                                    "trainer.nonfinite=skip", "trainer.max_skipped_steps=3", "trainer.keep_last=1"])
    _assert_one_clear_error(proc, "step 6: non-finite loss nan",
                            "(3 in a row, trainer.max_skipped_steps=3, trainer.nonfinite=skip)",
                            f"{run_dir}/checkpoints/step_00000002, is from before it")
    out = proc.stdout + proc.stderr
    assert out.count("its update was dropped for the dense parameters and the Engram tables") == 2
    assert "step 4: no checkpoint while updates are dropped" in out
    assert _ckpts(run_dir) == (["step_00000002"], "step_00000002")
    rows = [json.loads(x) for x in open(run_dir / "metrics.jsonl")]
    assert [r["skipped_steps"] for r in rows if "loss" in r] == [0, 0, 0, 1, 2, 3]


def test_two_ranks_skip_together_and_stop_at_the_same_step(tmp_path, common, healthy):
    """Data parallel over 2 ranks (resumed from the 1-rank checkpoint): the verdict is the same on both
    ranks, the run stops on both after the same step, with one line and no launcher traceback."""
    run_dir = _copy(healthy, tmp_path, "skip2")
    proc = _run(common + DIVERGE + [f"run.dir={run_dir}", "trainer.max_steps=20", "trainer.save_interval=2",
                                    "trainer.nonfinite=skip", "trainer.max_skipped_steps=2"], nproc=2)
    _assert_one_clear_error(proc, "step 5: non-finite loss nan", "(2 in a row, trainer.max_skipped_steps=2")
    assert "ChildFailedError" not in proc.stderr
    assert _ckpts(run_dir) == (["step_00000002"], "step_00000002")
    assert logged_steps(run_dir) == [0, 1, 2, 3, 4, 5]


def test_skipped_steps_leave_the_weights_and_the_checkpoint_before_them_survives_keep_last(tmp_path, common, healthy):
    """keep_last=1, a checkpoint every step; steps 4 and 5 are NaN and the run ends at step 5 in the
    streak: step 5's checkpoint is written (the end of the run) but does not count, so step 3's (the
    newest from before step 4) stays; the weights of both are identical, tables and Adam state too."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save
    import torch

    run_dir = _copy(healthy, tmp_path, "skip_end")
    _ok(_run(common + DIVERGE + [f"run.dir={run_dir}", "trainer.max_steps=5", "trainer.save_interval=1",
                                 "trainer.nonfinite=skip", "trainer.max_skipped_steps=10", "trainer.keep_last=1"]))
    assert _ckpts(run_dir) == (["step_00000003", "step_00000005"], "step_00000005")
    assert _meta(run_dir, "step_00000005")["nonfinite_streak"] == 2
    assert _meta(run_dir, "step_00000005")["first_nonfinite_step"] == 4
    assert _meta(run_dir, "step_00000005")["skipped_steps"] == 2

    def state(name, part):
        out = tmp_path / f"{name}.pt"
        dcp_to_torch_save(str(run_dir / "checkpoints" / name), str(out))
        return torch.load(out, weights_only=False)[part]

    def flat(d, prefix=""):
        for k, v in d.items():
            if isinstance(v, dict):
                yield from flat(v, f"{prefix}{k}.")
            else:
                yield f"{prefix}{k}", v

    for part in ("dense", "tables"):
        a, b = dict(flat(state("step_00000003", part))), dict(flat(state("step_00000005", part)))
        assert a.keys() == b.keys() and len(a) > 3
        for k in a:
            if torch.is_tensor(a[k]):
                assert torch.equal(a[k], b[k]), (part, k)
            else:
                assert a[k] == b[k], (part, k)


# -- a full filesystem ------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A tmpfs of 7 MiB (one TINY checkpoint takes ~4 MiB) mounted for this test; skipped where it cannot be."""
    mnt = tmp_path / "small_fs"
    mnt.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a tmpfs needs root")
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=7m", "tmpfs", str(mnt)], capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def test_a_full_filesystem_ends_the_run_with_one_line_and_a_relaunch_with_space_resumes(small_fs, common):
    run_dir = small_fs / "run"
    t0 = time.time()
    proc = _run(common + [f"run.dir={run_dir}", "trainer.max_steps=6", "trainer.save_interval=1"])
    took = time.time() - t0
    _assert_one_clear_error(proc, f"could not write checkpoint {run_dir}/checkpoints/step_00000002 (no space left",
                            f"{run_dir}/checkpoints has ", " free and a checkpoint needs about ",
                            f"{run_dir}/checkpoints/latest still names step_00000001, which is complete")
    assert took < 60
    assert _ckpts(run_dir) == (["step_00000001"], "step_00000001")
    assert not any(n.endswith(".partial") for n in os.listdir(run_dir / "checkpoints"))
    subprocess.run(["mount", "-o", "remount,size=64m", str(small_fs)], check=True)
    out = _ok(_run(common + [f"run.dir={run_dir}", "trainer.max_steps=6", "trainer.save_interval=1"]))
    assert f"resumed from {run_dir}/checkpoints/step_00000001 (step 1)" in out
    assert logged_steps(run_dir) == list(range(7))


def test_metrics_on_a_full_disk_warn_once_and_training_goes_on(tmp_path):
    """The metrics file's writes fail (/dev/full: ENOSPC on every write); the run is not stopped."""
    import logging

    from engram_train.train.metrics import JsonlLogger

    logger = JsonlLogger(str(tmp_path / "metrics.jsonl"))
    logger._f.close()
    logger._f = open("/dev/full", "a", buffering=1)
    records = []
    handler = logging.Handler()
    handler.emit = records.append
    logging.getLogger("engram_train.train.metrics").addHandler(handler)
    try:
        for step in range(1, 5):
            logger.log(step, {"loss": 1.0})
        logger.close()
    finally:
        logging.getLogger("engram_train.train.metrics").removeHandler(handler)
    assert len(records) == 1 and "No space left on device" in records[0].getMessage()


# -- two launches into one run.dir ------------------------------------------------------------------
def test_a_second_launch_is_refused_and_a_killed_run_s_lock_is_taken_over(tmp_path, common):
    run_dir = tmp_path / "run"
    args = common + [f"run.dir={run_dir}", "trainer.max_steps=100000", "trainer.save_interval=100000"]
    log_path = tmp_path / "first.log"
    with open(log_path, "w") as log_file:
        first = subprocess.Popen(TRAIN + args, env=_env(), stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while not ((run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= 2):
            assert first.poll() is None and time.time() < deadline, log_path.read_text()[-3000:]
            time.sleep(0.5)
        # Two ranks, as a re-submitted job would be: one line, exit code 2 on every rank.
        second = _run(args, nproc=2)
        _assert_one_clear_error(second, f"run.dir={run_dir} is in use by another run (PID {first.pid} on ",
                                "it holds the lock")
        assert "ChildFailedError" not in second.stderr
        assert first.poll() is None
        first.send_signal(signal.SIGTERM)   # the first run stops with a checkpoint, exit 0
        assert first.wait(timeout=300) == 0, log_path.read_text()[-3000:]
    finally:
        if first.poll() is None:
            first.kill()
    stopped = max(losses(run_dir))
    assert logged_steps(run_dir) == list(range(stopped + 1))   # each step once: nobody else wrote there

    # A run killed outright leaves its lock file behind, naming it; the next launch takes over.
    with open(tmp_path / "killed.log", "w") as log_file:
        killed = subprocess.Popen(TRAIN + args, env=_env(), stdout=log_file, stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.time() + 300
        while not (run_dir / "run.lock").read_text():
            assert killed.poll() is None and time.time() < deadline
            time.sleep(0.2)
    finally:
        killed.kill()
        killed.wait()
    assert json.loads((run_dir / "run.lock").read_text())["pid"] == killed.pid
    out = _ok(_run(args + [f"trainer.stop_at_step={stopped + 1}"]))
    assert f"taking over the lock left by PID {killed.pid}" in out
    assert f"resumed from {run_dir}/checkpoints/step_{stopped:08d} (step {stopped})" in out
