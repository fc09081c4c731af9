"""trainer.progress: a bar on a terminal, one plain line per log step in a log file, or nothing."""

from __future__ import annotations

import logging
import re
from types import SimpleNamespace

import pytest

from engram_train.config.schema import ConfigError, TrainerConfig
from engram_train.train.progress import Progress, format_line, resolve


def test_auto_draws_the_bar_only_on_a_terminal_and_the_old_booleans_still_work():
    assert resolve("auto", stream_is_tty=True) == "bar"
    assert resolve("auto", stream_is_tty=False) == "lines"
    assert resolve("true", stream_is_tty=False) == "bar"
    assert resolve("false", stream_is_tty=True) == "off"
    assert [TrainerConfig(progress=v).progress for v in (True, False, "True", "auto")] == \
        ["true", "false", "true", "auto"]
    with pytest.raises(ConfigError, match=r"trainer.progress='sometimes'"):
        TrainerConfig(progress="sometimes")


def test_a_line_per_log_step_with_loss_lr_throughput_and_eta(caplog, monkeypatch):
    assert format_line(40, 200, {"loss": 4.12346, "lr": 2.85e-3, "tokens_per_s": 10240.4}, 131.2) == \
        "step 40/200 | loss 4.1235 | lr 2.85e-03 | 10,240 tokens/s | ETA 0:02:11"
    clock = iter([100.0, 110.0, 120.0])   # start, then the two log steps
    monkeypatch.setattr("engram_train.train.progress.time", SimpleNamespace(time=lambda: next(clock)))
    monkeypatch.setattr("engram_train.train.progress.resolve", lambda mode: "lines")
    p = Progress("auto", total=30, initial=10)
    with caplog.at_level(logging.INFO, logger="engram_train.train.progress"):
        for step in range(11, 31):
            p.update(step, {"loss": 1.0, "lr": 1e-3, "tokens_per_s": 5.0}, logged=step % 10 == 0)
    p.close()
    lines = [r.getMessage() for r in caplog.records]
    # 10 steps in 10 s (resumed at step 10): 10 steps to go take 10 s more; at the end none.
    assert lines == ["step 20/30 | loss 1.0000 | lr 1.00e-03 | 5 tokens/s | ETA 0:00:10",
                     "step 30/30 | loss 1.0000 | lr 1.00e-03 | 5 tokens/s | ETA 0:00:00"]
    assert not any(re.search(r"\r", m) for m in lines)
