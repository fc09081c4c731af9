"""The commands of the README's "Running" section run as written, in a short form.

Each ``engram-train`` / ``bash launchers/torchrun.sh`` line is read from README.md and run with
overrides appended that make it short (2 steps, a small local corpus, a temporary run.dir); the
layout settings it names (TP, EP, ZeRO, offload, partition, micro-batch) are kept, so a command
whose batch does not fit its ranks fails here.  ``sbatch`` needs SLURM and the ``tools/bench_*`` /
``measure_table_memory`` / ``plan_offload`` lines (benchmarks, or a corpus sampled) take minutes: they
are skipped (tests/unit/test_plan_offload.py tests the planner); ``plan_memory``
allocates nothing and runs as written.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_train import _write_corpus

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

ROOT = Path(__file__).resolve().parents[2]
SKIPPED_TOOLS = ("tools/bench_lookup.py", "tools/measure_table_memory.py", "tools/bench_offload.py",
                 "tools/bench_engram_overhead.py", "tools/plan_offload.py")


def running_commands():
    text = (ROOT / "README.md").read_text()
    section = text.split("\n## Running\n", 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for line in block.splitlines():
            argv = shlex.split(line, comments=True)
            if argv:
                commands.append(argv)
    return commands


def _id(argv):
    return " ".join(argv)[:90]


COMMANDS = running_commands()


def test_the_section_lists_what_this_test_runs():
    kinds = [c[0] if c[0] != "bash" else c[1] for c in COMMANDS]
    assert kinds.count("engram-train") >= 2 and kinds.count("launchers/torchrun.sh") >= 4
    assert any(c[:2] == ["python", "tools/plan_memory.py"] for c in COMMANDS)


@pytest.fixture(scope="module")
def data_overrides(tmp_path_factory):
    root = tmp_path_factory.mktemp("readme_corpus")
    _write_corpus(str(root / "corpus.jsonl"))
    return ["data.corpus=files", f"data.files=[{root / 'corpus.jsonl'}]", f"data.dir={root / 'prepared'}",
            "data.vocab_size=512", "data.seq_length=64"]


def _env():
    return dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", WANDB_MODE="disabled")


@pytest.mark.parametrize("argv", COMMANDS, ids=[_id(c) for c in COMMANDS])
def test_readme_command_runs(argv, data_overrides, tmp_path):
    if argv[0] == "sbatch":
        pytest.skip("a GPU recipe; tests/slurm/ submits launchers/slurm.sbatch with a CPU experiment")
    if argv[0] == "python" and argv[1] in SKIPPED_TOOLS:
        pytest.skip("a benchmark of minutes")
    if argv[0] == "python":
        proc = subprocess.run([sys.executable, *argv[1:]], cwd=ROOT, env=_env(), capture_output=True, text=True,
                              timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return
    run_dir = tmp_path / "run"
    short = data_overrides + [f"run.dir={run_dir}", "trainer.max_steps=2", "trainer.eval_iters=1",
                              "trainer.progress=false", "run.wandb_mode=disabled"]
    if argv[0] == "engram-train":
        cmd = [sys.executable, "-m", "engram_train.train.main", *argv[1:], *short]
    else:
        assert argv[:2] == ["bash", "launchers/torchrun.sh"], argv
        cmd = argv + short
    proc = subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, f"{' '.join(argv)} failed (rc={proc.returncode}):\n{proc.stderr[-6000:]}"
    rows = [json.loads(line) for line in open(run_dir / "metrics.jsonl") if line.strip()]
    assert any(r.get("step") == 2 and "loss" in r for r in rows), rows
    assert (run_dir / "checkpoints" / "latest").read_text().strip() == "step_00000002"
