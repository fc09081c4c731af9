"""A real SLURM: ``launchers/slurm.sbatch`` submitted to a one-node cluster (``tools/local_slurm.sh``).

The job trains 2 ranks on the CPU.  After a few steps it gets the time-limit warning its script asks
for (``--signal=B:USR1@120``; here sent at once with ``scancel --signal=USR1 --batch``, which is
what SLURM sends): every rank checkpoints after the same step, the script requeues the job, and the
requeued job (same id, restart 1) resumes and finishes with the losses of an uninterrupted run, bit
for bit.  A job that silently started over would log its early steps twice and fail here.

Skips where SLURM is not installed.  As root with SLURM installed, the fixture starts the cluster
(idempotent); ``.ci/run`` installs the packages.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import time

import pytest

from tests.distributed.test_train import TINY, _env, _write_corpus, launch, logged_steps, losses

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SBATCH = os.path.join(ROOT, "launchers", "slurm.sbatch")

pytestmark = [pytest.mark.slurm, pytest.mark.slow]


def _sh(*cmd, check=True, timeout=60) -> str:
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stdout}{proc.stderr}")
    return proc.stdout


@pytest.fixture(scope="module")
def cluster():
    if shutil.which("sbatch") is None or shutil.which("slurmctld") is None:
        pytest.skip("SLURM is not installed (apt-get install slurm-wlm munge, then tools/local_slurm.sh)")
    if os.geteuid() == 0:
        setup = subprocess.run(["bash", os.path.join(ROOT, "tools", "local_slurm.sh")], timeout=300,
                               capture_output=True, text=True)
        if setup.returncode != 0:
            pytest.skip(f"tools/local_slurm.sh could not start a cluster here: {setup.stderr.strip()[-300:]}")
    if subprocess.run(["sinfo", "-h"], capture_output=True).returncode != 0:
        pytest.skip("no SLURM controller answers (run tools/local_slurm.sh as root)")


def _job(job_id: str) -> dict:
    out = _sh("scontrol", "show", "job", "-o", job_id, check=False)
    return dict(kv.split("=", 1) for kv in out.split() if "=" in kv)


def _wait(what: str, cond, timeout: float, log=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        got = cond()
        if got:
            return got
        time.sleep(0.2)
    tail = open(log).read()[-6000:] if log and os.path.exists(log) else ""
    raise AssertionError(f"timed out waiting for {what}\n{tail}")


def test_warned_job_checkpoints_requeues_and_resumes_exactly(cluster, tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    _write_corpus(str(corpus))
    # A long schedule so that the warning lands mid-run; the job stops for good at step STOP.
    STOP = 150
    # trainer.progress left at auto: a batch job's output is a file, so progress comes as lines.
    overrides = [o for o in TINY if not o.startswith("trainer.progress=")]
    overrides += ["data.corpus=files", f"data.files=[{corpus}]", f"data.dir={tmp_path / 'prepared'}",
                  "trainer.max_steps=400", "trainer.warmup_steps=3", f"trainer.stop_at_step={STOP}"]
    run_dir = tmp_path / "slurm_run"
    log = tmp_path / "job.log"
    env = dict(_env(), NPROC_PER_NODE="2")
    submit = subprocess.run(["sbatch", "--parsable", "--cpus-per-task=2", "--time=20", f"--output={log}",
                             SBATCH, *overrides, f"run.dir={run_dir}"],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=60)
    assert submit.returncode == 0, submit.stderr
    job_id = submit.stdout.strip().split(";")[0]
    try:
        _wait("5 logged steps", lambda: (run_dir / "metrics.jsonl").is_file() and len(losses(run_dir)) >= 5,
              600, log)
        _sh("scancel", "--signal=USR1", "--batch", job_id)
        # SLURM delays a requeued job by about two minutes; the test need not wait for that.
        _wait("the requeue", lambda: _job(job_id).get("Restarts") == "1", 300, log)
        # Not at once: a batch job started while its first run's credential is still revoked is killed.
        _wait("the node to be idle", lambda: _sh("sinfo", "-h", "-o", "%t").strip() == "idle", 120, log)
        _sh("scontrol", "update", f"JobId={job_id}", "StartTime=now+5", check=False)
        state = _wait("the requeued job to end",
                      lambda: (_job(job_id).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT")
                               and _job(job_id)), 900, log)
    finally:
        if _job(job_id).get("JobState") in ("RUNNING", "PENDING"):
            subprocess.run(["scancel", job_id])
    text = log.read_text()
    assert state["JobState"] == "COMPLETED" and state["ExitCode"] == "0:0", (state, text[-6000:])
    assert "Traceback" not in text, text[-6000:]
    assert "\r" not in text, "a progress bar redraw in the job's log"
    assert re.search(r"step 10/400 \| loss \d+\.\d{4} \| lr \S+ \| [\d,]+ tokens/s \| ETA \d+:\d\d:\d\d", text), \
        text[-3000:]
    stopped = [int(s) for s in re.findall(r"stopped at step (\d+) with a checkpoint", text)]
    assert len(stopped) == 2 and stopped[0] == stopped[1], text[-6000:]   # both ranks, at the same step
    first = stopped[0]
    assert 5 <= first < STOP, stopped
    assert text.count(f"finished at step {STOP}") == 2, text[-6000:]
    assert f"requeueing job {job_id}" in text
    assert f"job {job_id} (restart 1)" in text
    assert f"(step {first})" in text and "resumed from" in text
    assert logged_steps(run_dir) == list(range(STOP + 1))   # every step once: it did not start over

    reference = tmp_path / "uninterrupted"
    launch(2, overrides + [f"run.dir={reference}"])
    assert losses(run_dir) == losses(reference)
