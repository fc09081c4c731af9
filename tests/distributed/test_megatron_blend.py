"""A run on a 0.7/0.3 blend of Megatron prefixes (written by megatron-core's builder), stopped and
resumed, gives the uninterrupted run's losses bit for bit; its log is plain lines (not a tty)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.distributed.test_train import TINY, launch, logged_steps, losses
from tests.unit.test_megatron_data import write_megatron_sources

pytestmark = [pytest.mark.distributed, pytest.mark.slow]


def test_blend_trains_and_resumes_exactly(tmp_path):
    src = write_megatron_sources(tmp_path / "src")
    overrides = [o for o in TINY if not o.startswith(("data.vocab_size", "trainer.progress"))] + [
        "data.corpus=megatron", f"data.prefixes=[0.7,{src['web']},0.3,{src['code']}]",
        f"data.tokenizer={src['tokenizer']}", f"data.dir={tmp_path / 'prepared'}",
        "trainer.max_steps=4", "trainer.save_interval=2"]
    oracle = launch(1, overrides + [f"run.dir={tmp_path / 'oracle'}"])
    assert "\r" not in oracle and re.search(r"step 4/4 \| loss \d+\.\d{4} \| lr \S+ \| [\d,]+ tokens/s \| ETA ",
                                            oracle), oracle[-3000:]
    run_dir = tmp_path / "resumed"
    launch(1, overrides + [f"run.dir={run_dir}", "trainer.stop_at_step=2"])
    assert sorted(losses(run_dir)) == [1, 2]
    out = launch(1, overrides + [f"run.dir={run_dir}"])
    assert "(step 2)" in out and "resumed from" in out, out[-3000:]
    assert logged_steps(run_dir) == [0, 1, 2, 3, 4]          # continued, not started over
    assert losses(run_dir) == losses(tmp_path / "oracle")    # bit-identical on CPU

    # tools/generate.py samples from the checkpoint (greedy: the model's own most likely words).
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, str(root / "tools" / "generate.py"), str(run_dir), "--prompt", "w3 w151 w7",
                           "--max-new-tokens", "6", "--temperature", "0", "--json"],
                          capture_output=True, text=True, timeout=600, cwd=root)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    assert r["step"] == 4 and 1 <= r["new_tokens"] <= 6 and r["tokens_per_s"] > 0
    words = r["text"].split()
    assert words and all(w == "<|endoftext|>" or (w.startswith("w") and 0 <= int(w[1:]) < 300) for w in words), r
