"""Host synchronizations per training step, counted on the CPU: none between log steps but the ones
the step itself needs (docs/architecture.md, "Host syncs").

Every way a tensor's value reaches Python (``item``, ``tolist``, ``float()``, ``int()``, ``bool()``,
``cpu()``, ``numpy()``) is wrapped for the length of a real run (the TINY model of test_train, one
process, ``trainer.log_interval=3``), and each call is charged to the step that made it and to the
first frame outside torch that asked.  On a GPU each such call waits for the device's queue; on the
CPU the count is the same, so this test watches the code rather than the clock.
"""

from __future__ import annotations

import os
import sys
from collections import Counter

import pytest
import torch

from tests.distributed.test_train import TINY, _write_corpus
from tests.distributed.utils import run_distributed

pytestmark = [pytest.mark.distributed]

PULLS = ("item", "tolist", "__float__", "__int__", "__bool__", "__index__", "cpu", "numpy")
LOG_INTERVAL, MAX_STEPS = 3, 7          # log steps 3, 6 and 7 (the last); 1, 2, 4, 5 are between
LOADER = "loader"                       # pulls made while the loader builds a batch, on the CPU

# The syncs a step needs, each charged to the code that makes it, and why (docs/architecture.md):
EVERY_STEP = {
    # The optimizers' step decides from the one global norm whether to apply the update (dense and
    # tables alike) and clips the table rows by it.
    "engram_train/train/optimizers.py:step",
}
NEEDED = EVERY_STEP | {
    # megatron's MoE dispatch: tokens per expert on the host, to split the tokens between the experts.
    "megatron/core/transformer/moe/token_dispatcher.py:dispatch_postprocess",
    "megatron/core/transformer/moe/experts.py:forward",
    # torch's for-each AdamW (the CPU's; CUDA runs it fused, without) reads its step count, a CPU tensor.
    "deepspeed/runtime/zero/stage_1_and_2.py:_optimizer_step",
    # Batches are made on the CPU (hash ids checked there, before they travel): host tensors by design.
    LOADER,
}


def _site(frame, skip: tuple = ()) -> str:
    """``path:function`` of the first frame outside torch (and outside the ``skip`` prefixes)."""
    skip = (os.path.dirname(torch.__file__), *skip)
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame = frame.f_back
    if frame is None:
        return "?"
    path = frame.f_code.co_filename
    roots = [r.rstrip("/") + "/" for r in sys.path if r and path.startswith(r.rstrip("/") + "/")]
    if roots:
        path = path[len(max(roots, key=len)):]
    return f"{path}:{frame.f_code.co_name}"


def _run_counting(overrides):
    """Rank 0 of 1: train with every pull counted; returns ``{step: Counter(site)}`` and the logged steps."""
    from engram_train.config.store import compose
    from engram_train.train.trainer import Trainer

    trainer = Trainer(compose(overrides))
    step = {"now": 0}
    pulls = {}   # {step: Counter(site)}; the loader's pulls under LOADER
    originals = {name: getattr(torch.Tensor, name) for name in PULLS}

    def counted(name):
        real = originals[name]

        def pull(self, *args, **kwargs):
            site = _site(sys._getframe(1))
            if step["now"] == LOADER:
                site, at = LOADER, marked["step"]
            else:
                at = step["now"]
            pulls.setdefault(at, Counter())[site] += 1
            return real(self, *args, **kwargs)
        return pull

    train_step = trainer.train_step
    batches = trainer.train_iter

    class Loader:
        def __next__(self):
            now, step["now"] = step["now"], LOADER
            try:
                return next(batches)
            finally:
                step["now"] = now

    marked = {"step": 0}

    def marked_step():
        step["now"] = marked["step"] = trainer.state.step + 1   # what the loop does after it counts too
        return train_step()

    logged = []
    log = trainer.logger.log
    trainer.logger.log = lambda s, metrics: (logged.append(s), log(s, metrics))
    trainer.train_step = marked_step
    trainer.train_iter = Loader()
    for name in PULLS:
        setattr(torch.Tensor, name, counted(name))
    try:
        trainer.train()
    finally:
        for name, real in originals.items():
            setattr(torch.Tensor, name, real)
        trainer.release()
    return {s: dict(c) for s, c in pulls.items()}, logged


@pytest.fixture(scope="module")
def counted(tmp_path_factory):
    root = tmp_path_factory.mktemp("syncs")
    _write_corpus(str(root / "corpus.jsonl"), n_docs=120)
    overrides = TINY + ["data.corpus=files", f"data.files=[{root / 'corpus.jsonl'}]", f"data.dir={root / 'prepared'}",
                        f"run.dir={root / 'run'}", f"trainer.max_steps={MAX_STEPS}",
                        f"trainer.log_interval={LOG_INTERVAL}", "trainer.eval_iters=1"]
    return run_distributed(_run_counting, 1, overrides, timeout=300)[0]


def test_no_host_sync_between_log_steps_but_the_ones_the_step_needs(counted):
    pulls, logged = counted
    assert logged == [0, 3, 6, 7]
    between = [s for s in range(1, MAX_STEPS + 1) if s not in logged]
    assert between == [1, 2, 4, 5]
    for s in between:
        sites = pulls.get(s, {})
        extra = {site: n for site, n in sites.items() if site not in NEEDED}
        assert not extra, f"step {s} pulled to the host between log steps: {extra}"
        for site in EVERY_STEP:
            assert sites.get(site, 0) >= 1, (s, site, sites)   # the step's own: seen at every step


def test_a_log_step_pulls_its_metrics_in_one_transfer(counted):
    pulls, _ = counted
    for s in (3, 6):
        sites = pulls[s]
        assert sites.get("engram_train/train/trainer.py:_pull") == 1, sites
        extra = {site: n for site, n in sites.items() if site not in NEEDED | {"engram_train/train/trainer.py:_pull"}}
        assert not extra, f"log step {s}: {extra}"
