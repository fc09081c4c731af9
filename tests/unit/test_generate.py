"""Sampling rules of tools/generate.py against direct computations of the distributions they keep."""

from __future__ import annotations

import torch

from engram_train.generate import sample_next


def test_top_k_and_top_p_keep_exactly_the_tokens_they_should():
    logits = torch.log(torch.tensor([0.05, 0.40, 0.10, 0.30, 0.15]))
    assert int(sample_next(logits, 0.0, 0, 1.0)) == 1   # temperature 0: greedy
    g = torch.Generator().manual_seed(0)
    draws = lambda **kw: {int(sample_next(logits, 1.0, generator=g, **kw)) for _ in range(400)}
    assert draws(top_k=2, top_p=1.0) == {1, 3}
    # nucleus 0.8: 0.40 + 0.30 = 0.70 < 0.8, adding 0.15 reaches it; 0.10 and 0.05 are dropped
    assert draws(top_k=0, top_p=0.8) == {1, 3, 4}
    assert draws(top_k=0, top_p=0.01) == {1}
    assert draws(top_k=0, top_p=1.0) == {0, 1, 2, 3, 4}
