"""data.corpus=megatron: Megatron prefixes written by megatron-core's own builder, blended by its
BlendedMegatronDatasetBuilder.  The source of each sample is told apart independently: the two
sources use disjoint token-id ranges."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from engram_train.config.schema import ConfigError, DataConfig
from engram_train.data import build_train_loader, prepare_data
from engram_train.data.prepare import fingerprint

EOS = 300
# Source "web" holds ids [0, 150), "code" ids [150, 300): a sample's ids tell where it came from.
RANGES = {"web": (0, 150), "code": (150, 300)}


def write_megatron_sources(root: Path, docs=(400, 120), seed=0) -> dict:
    """A word-level tokenizer (ids 0..300, EOS 300) and two prefixes written by megatron-core's builder."""
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder
    from tokenizers import Tokenizer, models, pre_tokenizers

    root.mkdir(parents=True, exist_ok=True)
    vocab = {f"w{i}": i for i in range(EOS)}
    vocab["<|endoftext|>"] = EOS
    tok = Tokenizer(models.WordLevel(vocab, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(root / "tokenizer.json"))
    rng = np.random.default_rng(seed)
    out = {"tokenizer": str(root / "tokenizer.json")}
    for (name, (lo, hi)), n in zip(RANGES.items(), docs):
        builder = IndexedDatasetBuilder(str(root / f"{name}.bin"), dtype=DType.optimal_dtype(EOS + 1))
        for _ in range(n):
            doc = np.append(rng.integers(lo, hi, rng.integers(20, 200)), EOS)
            builder.add_document(doc, [doc.size])
        builder.finalize(str(root / f"{name}.idx"))
        out[name] = str(root / name)
    return out


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    return write_megatron_sources(tmp_path_factory.mktemp("megatron"))


def _cfg(sources, tmp_path, prefixes, **kw):
    return DataConfig(corpus="megatron", prefixes=prefixes, tokenizer=sources["tokenizer"],
                      dir=str(tmp_path / "d"), seq_length=32, **kw)


def _source(row) -> str:
    ids = row[row != EOS]
    web = bool((ids < 150).all())
    assert web or bool((ids >= 150).all()), "a sample mixes two sources"
    return "web" if web else "code"


def test_blend_draws_each_source_at_its_weight(sources, tmp_path):
    cfg = _cfg(sources, tmp_path, [0.7, sources["web"], 0.3, sources["code"]])
    prepared = prepare_data(cfg, progress=False)
    batches = build_train_loader(prepared, cfg, None, seq_length=32, micro_batch_size=8, global_batch_size=8,
                                 dp_rank=0, dp_size=1, seed=1)
    drawn = [_source(row) for _ in range(125) for row in next(batches)["tokens"].numpy()]
    assert len(drawn) == 1000
    share = drawn.count("web") / 1000
    assert abs(share - 0.7) <= 0.03 and abs((1 - share) - 0.3) <= 0.03, share
    # Data position is a function of consumed samples: a loader started at sample 400 continues the order.
    later = build_train_loader(prepared, cfg, None, seq_length=32, micro_batch_size=8, global_batch_size=8,
                               dp_rank=0, dp_size=1, seed=1, consumed_samples=400)
    assert [_source(r) for r in next(later)["tokens"].numpy()] == drawn[400:408]


def test_per_split_blends_and_what_the_fingerprint_covers(sources, tmp_path):
    per_split = {"train": [sources["web"], sources["code"]], "valid": [sources["code"]]}
    cfg = _cfg(sources, tmp_path, per_split)
    from engram_train.data import build_valid_batches

    prepared = prepare_data(cfg, progress=False)
    valid = build_valid_batches(prepared, cfg, None, seq_length=32, micro_batch_size=4, num_batches=2,
                                dp_rank=0, dp_size=1)
    assert {_source(r) for b in valid for r in b["tokens"].numpy()} == {"code"}
    # The blend is part of the data fingerprint that checkpoints carry.
    a = fingerprint(_cfg(sources, tmp_path, [0.7, sources["web"], 0.3, sources["code"]]))
    b = fingerprint(_cfg(sources, tmp_path, [0.6, sources["web"], 0.4, sources["code"]]))
    assert a != b and a != fingerprint(cfg)


def test_prefix_lists_are_parsed_like_megatrons_data_path(sources, tmp_path):
    with pytest.raises(ConfigError, match="even length"):
        _cfg(sources, tmp_path, [0.7, sources["web"], 0.3])
    with pytest.raises(ConfigError, match="must be > 0"):
        _cfg(sources, tmp_path, [1, sources["web"], 0, sources["code"]])
    with pytest.raises(ConfigError, match=r"exactly \['train', 'valid'\]"):
        _cfg(sources, tmp_path, {"train": [sources["web"]]})
