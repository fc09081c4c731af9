"""tools/gpu_check.py on a machine without CUDA: the report files, the skip reasons, and the rules that
one item's failure or timeout neither stops the others nor (unless it is a correctness failure) sets the
exit status.  The CPU forms of the training items run in tests/distributed (they train)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from importlib import metadata

import pytest
import torch

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
sys.path.insert(0, ROOT)

from tools import gpu_check  # noqa: E402

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU form (CUDA items skipped)")


def test_cpu_run_reports_cuda_items_skipped_with_reasons(tmp_path):
    out = tmp_path / "report"
    env = dict(os.environ, OUT=str(out), DS_ACCELERATOR="cpu")
    proc = subprocess.run([sys.executable, "tools/gpu_check.py", "--only", "env", "gpu_tests", "bench_offload"],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    report = json.loads((out / "gpu_report.json").read_text())       # $OUT is the default output folder
    items = {r["name"]: r for r in report["items"]}
    assert list(items) == ["env", "gpu_tests", "bench_offload"]      # the order of the issue, the subset asked
    assert report["cuda"] is False and report["failed"] == []
    assert report["versions"]["torch"] == metadata.version("torch")
    assert set(report["versions"]) >= {"torch", "triton", "megatron-core", "deepspeed"}
    assert report["device"].startswith("CPU")
    for name in ("gpu_tests", "bench_offload"):
        assert items[name]["status"] == "skipped"
        assert "no CUDA device" in items[name]["reason"]
    assert items["env"]["status"] == "pass" and items["env"]["figures"]["h2d_pinned_gb_per_s"] is None
    md = (out / "gpu_report.md").read_text()
    assert "| gpu_tests | skipped |" in md and "| bench_offload | skipped |" in md and "no CUDA device" in md
    assert all(isinstance(r["wall_s"], float) for r in report["items"])


def test_bench_kernels_cpu_form_times_the_torch_paths(tmp_path):
    c = gpu_check.Check(str(tmp_path), cuda=False, budget_s=300)
    res = gpu_check.run_items(c, ["bench_kernels"])["bench_kernels"]
    assert res.status == "pass", res.reason
    assert "torch paths" in res.reason
    kernels = {row["kernel"] for row in res.figures["rows"]}
    assert kernels == {"hash_ngrams", "gather_rows", "reduce_row_grads", "row_adam"}
    assert all(row["ms_per_call"] > 0 for row in res.figures["rows"])
    assert res.figures["fused"] is False


def test_a_failure_or_timeout_does_not_stop_the_rest_and_only_failures_set_the_exit_status(tmp_path):
    def failing(c, r):          # a correctness check that fails
        r.status, r.reason = "fail", "kernel disagreed"

    def slow(c, r):             # runs past its cap: killed, reported as an error
        p = c.run("slow", [sys.executable, "-c", "import time; time.sleep(60)"], cap=1)
        assert p.returncode is None
        r.status, r.reason = "error", "timed out"

    def crashing(c, r):
        raise RuntimeError("boom")

    def fine(c, r):
        r.status = "pass"
        r.figures["x"] = 1.5

    runners = {"a": failing, "b": slow, "c": crashing, "d": fine}
    c = gpu_check.Check(str(tmp_path), cuda=False, budget_s=300)
    c.caps.update(a=10, b=10, c=10, d=10)
    t0 = time.monotonic()
    res = gpu_check.run_items(c, list(runners), runners)
    assert time.monotonic() - t0 < 30
    assert [res[n].status for n in runners] == ["fail", "error", "error", "pass"]
    assert res["c"].reason == "RuntimeError: boom"
    assert "killed after the cap" in (tmp_path / "logs" / "slow.log").read_text()
    report = gpu_check.write_report(c, 1.0)
    assert report["failed"] == ["a"]
    assert "| a | fail |" in (tmp_path / "gpu_report.md").read_text()

    c2 = gpu_check.Check(str(tmp_path / "two"), cuda=False, budget_s=300)
    c2.caps.update(b=10, c=10, d=10)
    gpu_check.run_items(c2, ["b", "c", "d"], runners)
    assert gpu_check.write_report(c2, 1.0)["failed"] == []     # errors alone: exit status 0


def test_items_past_the_total_budget_are_skipped_with_the_reason(tmp_path):
    c = gpu_check.Check(str(tmp_path), cuda=False, budget_s=0)
    res = gpu_check.run_items(c, ["env"], {"env": lambda c, r: setattr(r, "status", "pass")})
    assert res["env"].status == "skipped" and "budget" in res["env"].reason


def test_caps_fit_eight_minutes_on_a_gpu_and_the_shell_script_sets_up_the_environment():
    assert list(gpu_check.GPU_CAPS) == gpu_check.ITEMS
    assert sum(gpu_check.GPU_CAPS.values()) <= 450       # + environment check and start-up < 480 s
    sh = open(os.path.join(ROOT, "tools", "gpu_check.sh")).read()
    assert 'source "$ROOT/tools/setup_env.sh"' in sh and "tools/gpu_check.py" in sh
