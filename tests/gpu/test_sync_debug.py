"""GPU tier: the device syncs of a training step, as CUDA itself reports them.

``tests/distributed/test_host_syncs.py`` counts every pull made from Python on the CPU. On a GPU
some operations also wait inside torch: those whose output size depends on the data (``unique``
of a lookup's ids, boolean masks, the split sizes of a variable all-to-all). Here a few steps of
the tiny model run on CUDA under ``torch.cuda.set_sync_debug_mode("warn")``; every warning is
charged to the first frame outside torch that caused it, and between log steps only the sites the
design needs may appear (docs/architecture.md, "Host syncs"). Skipped on machines without CUDA.
"""

from __future__ import annotations

import os
import sys
import warnings
from collections import Counter

import pytest
import torch

from tests.distributed.test_host_syncs import _site
from tests.distributed.test_train import TINY, _write_corpus
from tests.distributed.utils import run_distributed

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

LOG_INTERVAL, MAX_STEPS = 3, 7          # log steps 3, 6 and 7; 1, 2, 4, 5 are between

# Files whose syncs a step needs, and why (the table in docs/architecture.md):
NEEDED_FILES = (
    "engram_train/train/optimizers.py",     # the global norm decides whether the update applies
    "engram_train/memory/exchange.py",      # a lookup's plan: sizes of its unique ids and all-to-all splits
    "engram_train/kernels/rows.py",         # torch.unique of a lookup's ids (its size is data)
    "megatron/core/transformer/moe/",       # tokens per expert split the tokens between experts
)


# The warnings machinery and this file sit between the op that synchronized and the code that asked.
_NOT_THE_SITE = (os.path.dirname(warnings.__file__) + "/warnings.py", __file__)


def _run_under_sync_debug(overrides):
    """Rank 0 of 1 on CUDA: ``{step: Counter(site)}`` of the sync warnings, and the logged steps."""
    from engram_train.config.store import compose
    from engram_train.train.trainer import Trainer

    trainer = Trainer(compose(overrides))
    syncs, logged = {}, []
    train_step = trainer.train_step

    def watched_step():
        at = trainer.state.step + 1
        shown = warnings.showwarning

        def charge(message, category, *args, **kwargs):
            if "synchroniz" in str(message):
                syncs.setdefault(at, Counter())[_site(sys._getframe(1), _NOT_THE_SITE)] += 1
            else:
                shown(message, category, *args, **kwargs)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("always")
                warnings.showwarning = charge   # catch_warnings restores the hook it found
                return train_step()
        finally:
            torch.cuda.set_sync_debug_mode("default")
            warnings.showwarning = shown

    log = trainer.logger.log
    trainer.logger.log = lambda s, metrics: (logged.append(s), log(s, metrics))
    trainer.train_step = watched_step
    try:
        trainer.train()
    finally:
        trainer.release()
    return {s: dict(c) for s, c in syncs.items()}, logged


def test_only_the_syncs_the_design_needs_between_log_steps(tmp_path):
    _write_corpus(str(tmp_path / "corpus.jsonl"), n_docs=120)
    overrides = TINY + ["data.corpus=files", f"data.files=[{tmp_path / 'corpus.jsonl'}]",
                        f"data.dir={tmp_path / 'prepared'}", f"run.dir={tmp_path / 'run'}",
                        f"trainer.max_steps={MAX_STEPS}", f"trainer.log_interval={LOG_INTERVAL}",
                        "trainer.eval_iters=1"]
    syncs, logged = run_distributed(_run_under_sync_debug, 1, overrides, timeout=600)[0]
    assert logged == [0, 3, 6, 7]
    seen = Counter()
    for s in (1, 2, 4, 5):
        sites = syncs.get(s, {})
        seen.update(sites)
        extra = {site: n for site, n in sites.items() if not any(f in site for f in NEEDED_FILES)}
        assert not extra, f"step {s} synchronized with the device outside the needed sites: {extra}"
    # The optimizers' verdict is read every step: the warning mode must have seen it, or it saw nothing.
    assert any(site.startswith("engram_train/train/optimizers.py") for site in seen), dict(seen)
