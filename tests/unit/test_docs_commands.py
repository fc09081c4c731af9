"""Every command in docs/*.md (fenced ``bash`` blocks) and in the README's "Comparing runs" section
runs as written, or, for long ones, in a short form:

* the script it names exists (``python tools/x.py``, ``bash launchers/x.sh``);
* its Hydra overrides compose into a valid configuration (``experiment=`` names a file under
  conf/experiment/; keys exist; values pass validation); with ``-m`` each swept value is composed;
* a ``tools/`` script accepts every ``--option`` the command passes (its ``--help`` lists it);
  ``plan_memory`` runs as written (it allocates nothing) and ``compare_runs`` runs on a synthetic
  sweep; the others (minutes of training or benchmarking) are run by their own tests;
* ``sbatch`` lines are skipped (no SLURM here).

The README's Running section has its own test."""

from __future__ import annotations

import glob
import os
import re
import shlex
import subprocess
import sys
from functools import lru_cache

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NOT_HYDRA = ("world=", "ranks_per_node=", "hydra.")


def _bash_blocks(text: str):
    return re.findall(r"^```bash\n(.*?)^```", text, flags=re.S | re.M)


def _commands(block: str):
    joined = re.sub(r"\\\n\s*", " ", block)
    for line in joined.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            yield line


def collect():
    found = []
    for path in sorted(glob.glob(os.path.join(ROOT, "docs", "*.md"))):
        with open(path) as f:
            for block in _bash_blocks(f.read()):
                found += [(os.path.relpath(path, ROOT), c) for c in _commands(block)]
    with open(os.path.join(ROOT, "README.md")) as f:
        readme = f.read()
    m = re.search(r"^## Comparing runs\n(.*?)(?=^## )", readme, flags=re.S | re.M)
    assert m, "README.md has no '## Comparing runs' section"
    for block in _bash_blocks(m.group(1)):
        found += [("README.md#comparing-runs", c) for c in _commands(block)]
    return found


COMMANDS = collect()


def _split(command: str):
    """(program, script or None, options, Hydra overrides, multirun, positional paths)."""
    argv = shlex.split(command, comments=True)
    prog, rest = argv[0], argv[1:]
    script = None
    if prog in ("python", "bash") and rest:
        script, rest = rest[0], rest[1:]
        if script.endswith("torchrun.sh") and rest:
            rest = rest[1:]   # the number of processes
    multirun = "-m" in rest or "--multirun" in rest
    options = [a.split("=")[0] for a in rest if a.startswith("--") and a != "--multirun"]
    overrides = [a for a in rest if "=" in a and not a.startswith("-")]
    paths = [a for a in rest if "=" not in a and not a.startswith("-")]
    return prog, script, options, overrides, multirun, paths


def _variants(overrides, multirun):
    """Override lists to compose: with -m, one per swept value (the other keys at their first value)."""
    def values(o):
        k, v = o.split("=", 1)
        return [f"{k}={x}" for x in v.split(",")] if multirun and "," in v and "[" not in v else [o]
    base = [values(o)[0] for o in overrides]
    out = [base]
    for i, o in enumerate(overrides):
        for alt in values(o)[1:]:
            out.append(base[:i] + [alt] + base[i + 1:])
    return out


@lru_cache(maxsize=None)
def _help(script: str) -> str:
    proc = subprocess.run([sys.executable, script, "--help"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu"))
    assert proc.returncode == 0, f"{script} --help failed:\n{proc.stderr[-2000:]}"
    return proc.stdout


def test_the_docs_have_commands():
    assert len(COMMANDS) >= 10
    assert any("compare_runs.py" in c for _, c in COMMANDS) and any("inspect_engram.py" in c for _, c in COMMANDS)


@pytest.mark.parametrize("where,command", COMMANDS, ids=[f"{w}:{c[:60]}" for w, c in COMMANDS])
def test_command_refers_to_real_things(where, command):
    prog, script, options, overrides, multirun, _ = _split(command)
    if prog == "sbatch":
        pytest.skip("SLURM")
    assert prog in ("python", "bash", "engram-train"), f"{where}: unexpected program in {command!r}"
    if script is not None:
        assert os.path.isfile(os.path.join(ROOT, script)), f"{where}: {script} does not exist ({command!r})"
    from engram_train.config.store import compose

    hydra = [o for o in overrides if not o.startswith(NOT_HYDRA)]
    if prog == "engram-train" or (script or "").startswith("launchers/") or \
            any(s in (script or "") for s in ("plan_memory", "plan_offload", "count_params")):
        for variant in _variants(hydra, multirun):
            for o in variant:
                if o.startswith("experiment="):
                    name = o.split("=", 1)[1]
                    assert os.path.isfile(os.path.join(ROOT, "conf", "experiment", f"{name}.yaml")), (where, o)
            compose(variant)   # raises on an unknown key or an invalid value
    if script is not None and script.startswith("tools/") and script.endswith(".py") and options:
        text = _help(script)
        for opt in options:
            assert opt in text, f"{where}: {script} has no option {opt} ({command!r})"


def _synthetic_sweep(root):
    from tests.unit.test_compare_runs import write_run

    job = 0
    for exp in ("debug_cpu", "moe_baseline_cpu"):
        for seed in (1, 2, 3):
            write_run(os.path.join(root, str(job)), exp, seed)
            job += 1


@pytest.mark.parametrize("where,command", [(w, c) for w, c in COMMANDS
                                           if "tools/plan_memory.py" in c or "tools/compare_runs.py" in c])
def test_tool_command_runs(where, command, tmp_path):
    argv = shlex.split(command, comments=True)
    if "compare_runs.py" in command:
        # Short form: the documented options, on a synthetic sweep instead of a trained one.
        sweep = tmp_path / "sweep"
        _synthetic_sweep(str(sweep))
        _, _, _, _, _, paths = _split(command)
        argv = [a if a not in paths[1:] else str(sweep) for a in argv]
        argv = [str(sweep) if a == paths[0] else a for a in argv]
        argv[argv.index("--out") + 1] = str(tmp_path / "out")
    proc = subprocess.run([sys.executable] + argv[1:], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1", DS_ACCELERATOR="cpu", MPLBACKEND="Agg"))
    assert proc.returncode == 0, f"{where}: {command!r} failed:\n{proc.stderr[-3000:]}"
