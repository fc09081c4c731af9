"""Streaming preparation (tools/prepare_data.py --workers N): the written datasets against an
independent reading of the corpus (gzip + json, the raw `tokenizers` library, a split rule written
here), resume after an interruption, shards left for a blend."""

from __future__ import annotations

import gzip
import hashlib
import json
import random
from pathlib import Path

import numpy as np
import pytest

from engram_train.data import stream
from engram_train.data.stream import prepare_stream
from engram_train.errors import UserError

WORDS = "the king queen lord lady sword crown night day love death fair foul speak hear thou".split()


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers

    root = tmp_path_factory.mktemp("stream")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(5, 80))) for _ in range(600)]
    with gzip.open(root / "a.jsonl.gz", "wt") as f:
        for d in docs[:400]:
            f.write(json.dumps({"text": d}) + "\n")
    with open(root / "b.jsonl", "w") as f:
        for d in docs[400:]:
            f.write(json.dumps({"text": d, "id": 1}) + "\n")
    vocab = {w: i for i, w in enumerate(WORDS)}
    vocab["<|endoftext|>"] = len(vocab)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="the"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.save(str(root / "tokenizer.json"))
    return root, docs, tok


def _expected(docs, tok, fraction=0.1, seed=1234):
    out = {"train": [], "valid": []}
    eos = tok.token_to_id("<|endoftext|>")
    for d in docs:
        h = int.from_bytes(hashlib.blake2b(d.encode(), digest_size=8, key=str(seed).encode()).digest(), "little")
        out["valid" if h / 2.0**64 < fraction else "train"].append(tok.encode(d).ids + [eos])
    return out


def _read(prefix):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(str(prefix))
    return [ds[i].tolist() for i in range(len(ds))]


def _run(root, out, **kw):
    return prepare_stream([str(root / "a.jsonl.gz"), str(root / "b.jsonl")], str(out),
                          tokenizer=str(root / "tokenizer.json"), valid_fraction=0.1, progress=False, **kw)


def test_stream_writes_every_document_to_its_split_and_resumes_after_an_interruption(corpus, tmp_path, monkeypatch):
    root, docs, tok = corpus
    monkeypatch.setattr(stream, "BATCH_DOCS", 16)   # shards close between batches: small ones, several shards
    want = _expected(docs, tok)
    assert 20 < len(want["valid"]) < 100
    clean = _run(root, tmp_path / "clean", workers=2, shard_bytes=4000)
    assert clean["shards"] > 3
    for s in ("train", "valid"):
        assert _read(tmp_path / "clean" / s) == want[s]

    # Interrupted in its third shard: no meta.json (the directory does not look complete), two shards kept.
    real_add, calls = stream._Shard.add, {"n": 0}

    def add(self, *a):
        if self.name == "00002":
            raise KeyboardInterrupt
        return real_add(self, *a)

    monkeypatch.setattr(stream._Shard, "add", add)
    with pytest.raises(KeyboardInterrupt):
        _run(root, tmp_path / "cut", workers=1, shard_bytes=4000)
    monkeypatch.setattr(stream._Shard, "add", real_add)
    assert not (tmp_path / "cut" / "meta.json").exists()
    assert len(json.loads((tmp_path / "cut" / ".partial" / "state.json").read_text())["shards"]) == 2
    # Other options against the interrupted work: refused in one line; the same options resume it.
    with pytest.raises(UserError, match="--restart"):
        _run(root, tmp_path / "cut", workers=1, shard_bytes=8000)
    _run(root, tmp_path / "cut", workers=1, shard_bytes=4000)
    for name in ("train.bin", "train.idx", "valid.bin", "valid.idx"):   # 1 worker or 2, resumed or not
        assert (tmp_path / "cut" / name).read_bytes() == (tmp_path / "clean" / name).read_bytes()
    assert not (tmp_path / "cut" / ".partial").exists()


def test_no_merge_leaves_shards_that_hold_the_same_documents(corpus, tmp_path, monkeypatch):
    root, docs, tok = corpus
    monkeypatch.setattr(stream, "BATCH_DOCS", 16)
    meta = _run(root, tmp_path / "shards", workers=1, shard_bytes=8000, merge=False)
    want = _expected(docs, tok)
    for s in ("train", "valid"):
        got = [d for prefix in meta["prefixes"][s] for d in _read(prefix)]
        assert got == want[s] and all(Path(p).parent.name == "shards" for p in meta["prefixes"][s])


def test_bpe_trains_on_a_bounded_sample_and_says_how_big(corpus, tmp_path):
    root, docs, _ = corpus
    meta = prepare_stream([str(root / "b.jsonl")], str(tmp_path / "bpe"), vocab_size=300, workers=1,
                          bpe_sample_bytes=5000, progress=False)
    sample = meta["bpe_sample"]
    assert 5000 <= sample["bytes"] < 5000 + max(len(d) for d in docs) + 1
    assert sample["documents"] < 200 and sample["limit_bytes"] == 5000
