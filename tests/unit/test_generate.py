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


def test_lngram_inputs_of_a_growing_sequence_are_those_of_the_window_the_model_reads():
    """Lngram (engram.keys=latent) keeps no n-gram window: each step's document numbering is made for
    the tokens the model reads, and positions of one document share a number (a document ends with EOS)."""
    from engram_train.config.schema import EngramConfig
    from engram_train.generate import IncrementalHashes
    from engram_train.lngram.build import LatentKeyInputs

    eos = 0
    inputs = LatentKeyInputs(EngramConfig(keys="latent", layer_ids=[1]), eos_id=eos)
    seq = [5, 6, eos, 7, 8, 9, eos, 4]
    hashes = IncrementalHashes(inputs, torch.tensor([seq[:3]]))
    for t in seq[3:]:
        hashes.append(torch.tensor(t))
    for n in (8, 5, 3):
        window = seq[-n:]
        want, doc = [], 0
        for tok in window:          # the number of EOS tokens before each position, its EOS included in its doc
            want.append(doc)
            doc += tok == eos
        got = hashes.last(n)
        assert list(got) == [1] and got[1].shape == (1, n, 1)
        assert got[1][0, :, 0].tolist() == want
