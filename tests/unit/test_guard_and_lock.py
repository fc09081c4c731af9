"""The non-finite guard's policy, the loss-spike warning and the run-directory lock, in one process
(the end-to-end runs are in tests/distributed/test_run_guards.py)."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from engram_train.train.checkpoint import TrainState
from engram_train.train.guard import Diverged, LossSpikeDetector, NonFiniteGuard
from engram_train.train.run_lock import LOCK_NAME, RunDirLocked, RunLock

NAN, INF = float("nan"), float("inf")


def _walk(guard, steps):
    """Feed (loss, grad_norm) pairs as steps 1, 2, ...; returns the state and the step the guard stopped at."""
    state = TrainState()
    for loss, norm in steps:
        state.step += 1
        err = guard.observe(state, loss, norm)
        if err is not None:
            return state, err
    return state, None


def test_stop_ends_at_the_first_non_finite_step_naming_it():
    guard = NonFiniteGuard("stop", 10, latest=lambda: "/run/checkpoints/step_00000002")
    state, err = _walk(guard, [(5.0, 1.0), (4.0, 1.2), (NAN, 1.0), (4.0, 1.0)])
    assert isinstance(err, Diverged) and state.step == 3
    msg = str(err)
    assert msg.startswith("step 3: non-finite loss nan or gradient norm 1.0 (trainer.nonfinite=stop)")
    assert "/run/checkpoints/step_00000002, is from before it" in msg and "\n" not in msg
    assert state.first_nonfinite_step == 3
    _, err = _walk(NonFiniteGuard("stop", 10, latest=lambda: None), [(5.0, INF)])
    assert "gradient norm inf" in str(err) and "no checkpoint was written before it" in str(err)


def test_skip_counts_and_stops_after_max_skipped_steps_in_a_row(caplog):
    guard = NonFiniteGuard("skip", 3, latest=lambda: None)
    with caplog.at_level(logging.WARNING, logger="engram_train.train.guard"):
        # two isolated runs of bad steps (2, then 1) pass; three in a row stop the run
        state, err = _walk(guard, [(5, 1), (NAN, INF), (NAN, INF), (4, 1), (5, INF), (4, 1), (NAN, NAN),
                                   (NAN, NAN), (NAN, NAN), (4, 1)])
    assert err is not None and state.step == 9
    assert state.skipped_steps == 6 and state.nonfinite_streak == 3 and state.first_nonfinite_step == 2
    assert "(3 in a row, trainer.max_skipped_steps=3, trainer.nonfinite=skip)" in str(err)
    assert caplog.text.count("its update was dropped") == 5


def test_the_loss_spike_warning_compares_with_the_running_median(caplog):
    det = LossSpikeDetector(factor=2.0, window=20)
    losses = [5.0 - 0.01 * i for i in range(15)] + [20.0, 21.0, 4.8, 4.7, 11.0, NAN]
    with caplog.at_level(logging.WARNING, logger="engram_train.train.guard"):
        flags = [det.observe(i + 1, x) for i, x in enumerate(losses)]
    median_then = sorted(losses[:15])[7]
    assert flags == [False] * 15 + [True, True, False, False, True, False]
    assert caplog.text.count("is above 2 x its running median") == 2   # once per spike, not per step
    assert f"step 16: loss 20 is above 2 x its running median {median_then:.4g}" in caplog.text
    assert not any(LossSpikeDetector(factor=0, window=20).observe(i, 100.0 * i) for i in range(1, 40))


# -- the run-directory lock -------------------------------------------------------------------------
HOLD = ("import sys, time; from engram_train.train.run_lock import RunLock; "
        "l = RunLock(sys.argv[1]); l.acquire(); print('held', flush=True); time.sleep(600)")


def _holder_process(run_dir, env=None):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(run_dir)], stdout=subprocess.PIPE, text=True,
                            env=dict(os.environ, **(env or {})))
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    proc = _holder_process(tmp_path)
    try:
        with pytest.raises(RunDirLocked) as err:
            RunLock(str(tmp_path), wait_s=0).acquire()
        msg = str(err.value)
        assert msg.startswith(f"run.dir={tmp_path} is in use by another run (PID {proc.pid} on {socket.gethostname()}")
        assert "it holds the lock" in msg and "\n" not in msg
    finally:
        proc.kill()
        proc.wait()


def test_a_lock_left_by_a_killed_run_is_taken_over(tmp_path, caplog):
    proc = _holder_process(tmp_path)
    os.kill(proc.pid, signal.SIGKILL)   # no clean-up: the file still names it
    proc.wait()
    assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == proc.pid
    lock = RunLock(str(tmp_path), wait_s=0)
    with caplog.at_level(logging.WARNING, logger="engram_train.train.run_lock"):
        lock.acquire()
    try:
        assert f"taking over the lock left by PID {proc.pid}" in caplog.text
        assert json.loads((tmp_path / LOCK_NAME).read_text())["pid"] == os.getpid()
    finally:
        lock.release()
    assert (tmp_path / LOCK_NAME).read_text() == ""   # released: the next launch finds it free and silent


def test_a_lock_kept_open_by_an_orphan_of_a_dead_holder_is_taken_over(tmp_path, caplog):
    """The flock is held (an orphaned child kept the file open) but the PID it names is gone on this host."""
    import fcntl

    path = tmp_path / LOCK_NAME
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "started": "earlier"}))
    orphan_fd = os.open(path, os.O_RDWR)
    fcntl.flock(orphan_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    try:
        lock = RunLock(str(tmp_path), wait_s=0)
        with caplog.at_level(logging.WARNING, logger="engram_train.train.run_lock"):
            lock.acquire()
        assert f"taking over the lock of PID {dead.pid}" in caplog.text
        lock.release()
    finally:
        os.close(orphan_fd)


def test_another_host_s_fresh_heartbeat_refuses_and_a_stale_one_is_taken_over(tmp_path):
    """Where flock is not shared between nodes the heartbeat (the file's mtime) tells a live holder."""
    from engram_train.train import run_lock

    path = tmp_path / LOCK_NAME
    path.write_text(json.dumps({"host": "node-elsewhere", "pid": 1, "started": "earlier"}))
    with pytest.raises(RunDirLocked, match="PID 1 on node-elsewhere.*heartbeat in the lock file is [0-9]+ s old"):
        RunLock(str(tmp_path), wait_s=0).acquire()
    old = time.time() - run_lock.LEASE_S - 5
    os.utime(path, (old, old))
    lock = RunLock(str(tmp_path), wait_s=0)
    lock.acquire()
    lock.release()


def test_a_requeued_slurm_job_waits_for_its_predecessor(tmp_path, monkeypatch):
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    proc = _holder_process(tmp_path, env={"SLURM_JOB_ID": "4242"})
    threading.Timer(2.0, proc.kill).start()   # the predecessor finishes shutting down 2 s from now
    t0 = time.monotonic()
    lock = RunLock(str(tmp_path), wait_s=60)
    lock.acquire()
    waited = time.monotonic() - t0
    lock.release()
    proc.wait()
    assert 1.5 < waited < 30
    other = _holder_process(tmp_path, env={"SLURM_JOB_ID": "999"})   # another job: refused at once
    try:
        t0 = time.monotonic()
        with pytest.raises(RunDirLocked, match="SLURM job 999"):
            RunLock(str(tmp_path), wait_s=60).acquire()
        assert time.monotonic() - t0 < 5
    finally:
        other.kill()
        other.wait()
    monkeypatch.setenv("SLURM_JOB_ID", "4242")
    bounded = _holder_process(tmp_path, env={"SLURM_JOB_ID": "4242"})   # a predecessor that never lets go
    try:
        t0 = time.monotonic()
        with pytest.raises(RunDirLocked):
            RunLock(str(tmp_path), wait_s=2).acquire()
        assert 1.5 < time.monotonic() - t0 < 15
    finally:
        bounded.kill()
        bounded.wait()
