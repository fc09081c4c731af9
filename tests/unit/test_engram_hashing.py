"""N-gram hashing against an independent numpy port of the reference rules (docs/engram.md §1.2-1.4).

The port follows the demo's structure (per layer, per order, per head, with
np.pad shifts, a trial-division prime test and one global ``seen`` set) and
shares no code with ``engram_train.engram.hashing``.  Document-boundary reset
gets its own position-by-position port.
"""

from __future__ import annotations

import pickle

import numpy as np
import pytest
import torch

from engram_train.config.schema import ConfigError, EngramConfig
from engram_train.engram.compress import build_compression
from engram_train.engram.hashing import NgramHasher, hasher_from_config
from engram_train.kernels import ngram_hash as ngram_kernel

needs_kernel = pytest.mark.skipif(not ngram_kernel.available(), reason="no C compiler: the CPU kernel is unavailable")
# Every golden test runs the reference torch path and the native kernel.
BACKENDS = ["torch", pytest.param("cpu_kernel", marks=needs_kernel)]

TEXT = (
    "The Café on Rue Saint-Honoré opened at 7:45.   THE CAFÉ, the café!\n"
    "Naïve coöperation?\tÉlodie's résumé; déjà vu.  Numbers 0 1 2 42 1999 3.14 -17 100%\r\n"
    "Hello hello HELLO; world World WORLD. ﬁne ½ Ⅻ ａｂｃ ÀÁÂÃÄÅ àáâãäå Ññ Çç\n"
)


# ---- independent reference -------------------------------------------------------------------------------------

def ref_isprime(n: int) -> bool:
    if n < 2:
        return False
    i = 2
    while i * i <= n:
        if n % i == 0:
            return False
        i += 1
    return True


def ref_table_sizes(layer_ids, max_ngram, heads, sizes_per_ngram):
    seen, out = set(), {}
    for layer in layer_ids:
        per_layer = []
        for n in range(2, max_ngram + 1):
            start = sizes_per_ngram[n - 2] - 1
            heads_sizes = []
            for _ in range(heads):
                cand = start + 1
                while not (ref_isprime(cand) and cand not in seen):
                    cand += 1
                seen.add(cand)
                heads_sizes.append(cand)
                start = cand
            per_layer.append(heads_sizes)
        out[layer] = per_layer
    return out


def ref_multipliers(layer_ids, max_ngram, vocab_compressed, seed):
    bound = max(1, int(np.iinfo(np.int64).max // vocab_compressed) // 2)
    mults = {}
    for layer in layer_ids:
        g = np.random.default_rng(int(seed + 10007 * int(layer)))
        mults[layer] = g.integers(low=0, high=bound, size=(max_ngram,), dtype=np.int64) * 2 + 1
    return mults


def ref_shifted(x, k, pad, eos_raw=None, raw=None):
    """Token k positions back; with ``eos_raw`` (reset on) also pad where that crosses a document start."""
    B, T = x.shape
    if k == 0:
        return x
    shifted = np.pad(x, ((0, 0), (k, 0)), mode="constant", constant_values=pad)[:, :T]
    if eos_raw is None:
        return shifted
    shifted = shifted.copy()
    for b in range(B):
        doc_start = 0
        for t in range(T):
            if t > 0 and raw[b, t - 1] == eos_raw:
                doc_start = t
            if t - k < doc_start:
                shifted[b, t] = pad
    return shifted


def ref_hash(lookup, raw, layer_ids, max_ngram, heads, sizes_per_ngram, pad_raw, seed, eos_raw=None):
    raw = np.asarray(raw, dtype=np.int64)
    x = raw.copy()
    pos = x >= 0
    x[pos] = lookup[x[pos]]
    vocab_compressed = int(lookup.max()) + 1
    pad = int(lookup[pad_raw])
    mults = ref_multipliers(layer_ids, max_ngram, vocab_compressed, seed)
    primes = ref_table_sizes(layer_ids, max_ngram, heads, sizes_per_ngram)
    out = {}
    for layer in layer_ids:
        shifts = [ref_shifted(x, k, pad, eos_raw, raw) for k in range(max_ngram)]
        hashes = []
        for n in range(2, max_ngram + 1):
            mix = shifts[0] * mults[layer][0]
            for k in range(1, n):
                mix = np.bitwise_xor(mix, shifts[k] * mults[layer][k])
            for j in range(heads):
                hashes.append((mix % int(primes[layer][n - 2][j])).astype(np.int64))
        out[layer] = np.stack(hashes, axis=2)
    return out, primes, mults


# ---- fixtures ----------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def compression():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=500, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer)
    lookup, size = build_compression(tok)
    assert size < len(lookup)
    ids = tok.encode(TEXT * 3).ids
    return lookup, size, np.array(ids, dtype=np.int64), tok.token_to_id("<pad>"), tok.token_to_id("<eos>")


def batch(ids, B, T, seed, eos=None, extra=()):
    rng = np.random.default_rng(seed)
    starts = rng.integers(0, len(ids) - T, size=B)
    out = np.stack([ids[s:s + T] for s in starts])
    if eos is not None:      # pack a few documents per row
        out[rng.random(out.shape) < 0.12] = eos
    for (b, t, v) in extra:
        out[b, t] = v
    return out


# ---- golden tests ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layer_ids", [[1, 15], [0], [7, 2, 5]])
@pytest.mark.parametrize("max_ngram", [2, 3, 4])
@pytest.mark.parametrize("heads", [1, 3, 8])
@pytest.mark.parametrize("backend", BACKENDS)
def test_hash_ids_and_primes_equal_reference(compression, layer_ids, max_ngram, heads, backend):
    lookup, size, ids, pad, eos = compression
    sizes = [size * 5 + 3 * n for n in range(max_ngram - 1)]
    h = NgramHasher(lookup, layer_ids=layer_ids, max_ngram=max_ngram, heads_per_ngram=heads,
                    table_size_per_ngram=sizes, pad_id=pad, seed=0, backend=backend)
    raw = batch(ids, B=3, T=29, seed=len(layer_ids) * 10 + max_ngram + heads)
    ref, primes, mults = ref_hash(lookup, raw, layer_ids, max_ngram, heads, sizes, pad, seed=0)
    out = h(torch.from_numpy(raw))
    assert list(out) == layer_ids
    for layer in layer_ids:
        assert h.table_sizes[layer] == [p for per_n in primes[layer] for p in per_n]
        assert h.multipliers[layer] == [int(m) for m in mults[layer]]
        got = out[layer]
        assert got.dtype == torch.int64 and got.is_contiguous()
        np.testing.assert_array_equal(got.numpy(), ref[layer])
    # every prime of every layer is distinct
    all_primes = [p for layer in layer_ids for p in h.table_sizes[layer]]
    assert len(set(all_primes)) == len(all_primes)


def test_small_tables_force_prime_skips_across_orders_and_layers(compression):
    lookup, size, ids, pad, _ = compression
    sizes = [2, 3, 5]        # tiny, overlapping search ranges: later heads must skip primes already taken
    h = NgramHasher(lookup, [3, 0], 4, 4, sizes, pad_id=pad, seed=11)
    raw = batch(ids, B=2, T=40, seed=1)
    ref, primes, _ = ref_hash(lookup, raw, [3, 0], 4, 4, sizes, pad, seed=11)
    assert h.table_sizes[3][:4] == [2, 3, 5, 7]
    for layer in (3, 0):
        assert h.table_sizes[layer] == [p for per_n in primes[layer] for p in per_n]
        np.testing.assert_array_equal(h(torch.from_numpy(raw))[layer].numpy(), ref[layer])


@pytest.mark.parametrize("backend", BACKENDS)
def test_edge_inputs_equal_reference(compression, backend):
    lookup, size, ids, pad, _ = compression
    sizes = [size * 5, size * 5 + 100, size * 5 + 200]
    h = NgramHasher(lookup, [1, 15], 4, 8, sizes, pad_id=pad, seed=3, backend=backend)
    # sequences shorter than the n-gram, pad ids inside, negative ids (pass through), the largest id
    for raw in (np.array([[5]]), np.array([[pad, 7]]), np.array([[1, -1, 4, len(lookup) - 1, pad, 9]])):
        ref, _, _ = ref_hash(lookup, raw, [1, 15], 4, 8, sizes, pad, seed=3)
        out = h(torch.from_numpy(raw))
        for layer in (1, 15):
            np.testing.assert_array_equal(out[layer].numpy(), ref[layer])
            assert int(out[layer].min()) >= 0


def test_pad_id_is_compressed_before_padding(compression):
    lookup, size, ids, _, _ = compression
    # choose a raw pad id whose canonical id differs from itself
    pad = int(next(i for i in range(len(lookup)) if lookup[i] != i))
    h = NgramHasher(lookup, [2], 3, 2, [size * 5] * 2, pad_id=pad)
    assert h.compressed_pad_id == int(lookup[pad]) != pad
    raw = batch(ids, 2, 9, seed=4)
    ref, _, _ = ref_hash(lookup, raw, [2], 3, 2, [size * 5] * 2, pad, seed=0)
    np.testing.assert_array_equal(h(torch.from_numpy(raw))[2].numpy(), ref[2])


# ---- document-boundary reset -------------------------------------------------------------------------------------

@pytest.mark.parametrize("max_ngram", [2, 3, 4])
@pytest.mark.parametrize("backend", BACKENDS)
def test_doc_boundary_reset_equals_reference(compression, max_ngram, backend):
    lookup, size, ids, pad, eos = compression
    sizes = [size * 7] * (max_ngram - 1)
    raw = batch(ids, B=4, T=33, seed=max_ngram, eos=eos, extra=[(0, 0, eos), (1, 32, eos), (2, 5, eos), (2, 6, eos)])
    h = NgramHasher(lookup, [4, 9], max_ngram, 5, sizes, pad_id=pad, seed=2, reset_at_doc_boundary=True, eos_id=eos,
                    backend=backend)
    ref, _, _ = ref_hash(lookup, raw, [4, 9], max_ngram, 5, sizes, pad, seed=2, eos_raw=eos)
    out = h(torch.from_numpy(raw))
    for layer in (4, 9):
        np.testing.assert_array_equal(out[layer].numpy(), ref[layer])
    # reset off is the reference exactly, and differs from reset on where documents are packed
    h_off = NgramHasher(lookup, [4, 9], max_ngram, 5, sizes, pad_id=pad, seed=2, eos_id=eos, backend=backend)
    ref_off, _, _ = ref_hash(lookup, raw, [4, 9], max_ngram, 5, sizes, pad, seed=2)
    off = h_off(torch.from_numpy(raw))
    for layer in (4, 9):
        np.testing.assert_array_equal(off[layer].numpy(), ref_off[layer])
        assert not torch.equal(off[layer], out[layer])


def test_doc_reset_makes_a_document_independent_of_what_precedes_it(compression):
    lookup, size, ids, pad, eos = compression
    h = NgramHasher(lookup, [1], 3, 4, [size * 5] * 2, pad_id=pad, reset_at_doc_boundary=True, eos_id=eos)
    doc = ids[:12]
    a = np.concatenate([ids[20:27], [eos], doc])[None]
    b = np.concatenate([ids[40:47], [eos], doc])[None]
    alone = h(torch.from_numpy(doc[None]))[1]
    np.testing.assert_array_equal(h(torch.from_numpy(a))[1][:, 8:].numpy(), alone.numpy())
    np.testing.assert_array_equal(h(torch.from_numpy(b))[1][:, 8:].numpy(), alone.numpy())


def test_miller_rabin_agrees_with_trial_division():
    from engram_train.engram.hashing import is_prime

    assert [n for n in range(20000) if is_prime(n)] == [n for n in range(20000) if ref_isprime(n)]
    assert is_prime(2**61 - 1) and not is_prime(2**61 + 1) and not is_prime(3215031751)   # a strong pseudoprime


# ---- API ---------------------------------------------------------------------------------------------------------

def test_picklable_and_same_device_int64(compression):
    lookup, size, ids, pad, eos = compression
    h = NgramHasher(lookup, [1, 15], 3, 8, [size * 5] * 2, pad_id=pad, reset_at_doc_boundary=True, eos_id=eos)
    raw = torch.from_numpy(batch(ids, 2, 16, seed=9, eos=eos)).to(torch.int32)
    before = h(raw)
    clone = pickle.loads(pickle.dumps(h))
    after = clone(raw)
    for layer in (1, 15):
        assert after[layer].dtype == torch.int64 and after[layer].device == raw.device
        assert torch.equal(before[layer], after[layer])
    assert clone._device_cache.keys() == {torch.device("cpu")}


def test_hasher_from_config(compression):
    lookup, size, ids, pad, eos = compression
    cfg = EngramConfig(layer_ids=[1, 3], max_ngram=3, heads_per_ngram=4, n_embed_per_ngram=32,
                       table_size_multiplier=5.0, seed=7)
    h = hasher_from_config(cfg, lookup, size, pad_id=pad, eos_id=eos)
    _, primes, _ = ref_hash(lookup, np.zeros((1, 1), np.int64), [1, 3], 3, 4, [size * 5] * 2, pad, seed=7)
    assert h.table_sizes == {l: [p for per_n in primes[l] for p in per_n] for l in (1, 3)}
    assert not h.reset_at_doc_boundary and h.eos_id == eos
    cfg2 = EngramConfig(layer_ids=[2], max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=32,
                        table_size_per_ngram=[1000, 2000], reset_at_doc_boundary=True)
    h2 = hasher_from_config(cfg2, lookup, size, pad_id=pad, eos_id=eos)
    assert h2.table_sizes[2] == [1009, 1013, 2003, 2011] and h2.reset_at_doc_boundary


# ---- validation --------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, match", [
    (dict(table_size_per_ngram=[1, 500]), r"table_size_per_ngram=\[1, 500\]: every table size must be >= 2"),
    (dict(table_size_per_ngram=[500]), r"table_size_per_ngram=\[500\]: needs one entry per n-gram order"),
    (dict(max_ngram=1, table_size_per_ngram=[]), r"max_ngram=1: must be an integer >= 2"),
    (dict(layer_ids=[1, 4, 1]), r"layer_ids=\[1, 4, 1\]: layer ids must be distinct; remove the duplicates \[1\]"),
    (dict(layer_ids=[-1]), r"layer_ids=\[-1\]: layer ids are 0-based"),
    (dict(pad_id=10**6), r"pad_id=1000000: must be a raw tokenizer id in \[0, \d+\)"),
    (dict(pad_id=-1), r"pad_id=-1: must be a raw tokenizer id"),
    (dict(heads_per_ngram=0), r"heads_per_ngram=0: must be an integer >= 1"),
    (dict(reset_at_doc_boundary=True), r"eos_id=None: reset_at_doc_boundary=True needs the tokenizer's EOS id"),
])
def test_validation_messages(compression, kwargs, match):
    lookup, size, _, pad, _ = compression
    args = dict(layer_ids=[1, 4], max_ngram=3, heads_per_ngram=2, table_size_per_ngram=[500, 500], pad_id=pad)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        NgramHasher(lookup, **args)


def test_rejects_ids_outside_vocabulary_and_bad_shapes(compression):
    lookup, size, _, pad, _ = compression
    h = NgramHasher(lookup, [1], 2, 2, [500], pad_id=pad)
    with pytest.raises(ValueError, match=rf"raw_ids: holds token id {len(lookup)}, outside the tokenizer vocabulary"):
        h(torch.tensor([[0, len(lookup)]]))
    with pytest.raises(ValueError, match=r"raw_ids: expected integer token ids of shape \[B, T\]"):
        h(torch.tensor([1, 2, 3]))


# ---- the native CPU kernel (oracle: the torch path, pinned above to the independent port) -------------------------



@needs_kernel
def test_kernel_modulo_is_exact_over_the_int64_range():
    g = torch.Generator().manual_seed(0)
    extremes = torch.tensor([-2**63, -2**63 + 1, -1, 0, 1, 2**63 - 1, 2**62, -2**62], dtype=torch.int64)
    x = torch.cat([extremes, torch.randint(-2**63, 2**63 - 1, (20000,), generator=g, dtype=torch.int64)])
    for p in (2, 3, 5, 65537, 163847, 2**31 - 1, 1099511627689):   # the last is just below 2**40
        assert torch.equal(ngram_kernel.floor_mod(x, p), torch.remainder(x, p)), p
        # multiples of p and their neighbours, where a quotient off by one would show
        k = torch.randint(-(2**62 // p), 2**62 // p, (5000,), generator=g, dtype=torch.int64)
        near = torch.cat([k * p - 1, k * p, k * p + 1])
        assert torch.equal(ngram_kernel.floor_mod(near, p), torch.remainder(near, p)), p
    with pytest.raises(ValueError, match="exact for 2 <= p < 2"):
        ngram_kernel.floor_mod(x, 2**40)


@needs_kernel
@pytest.mark.parametrize("layer_ids", [[1, 15], [3]])
@pytest.mark.parametrize("max_ngram", [2, 3, 4])
@pytest.mark.parametrize("heads", [1, 5, 8])
@pytest.mark.parametrize("reset", [False, True])
def test_kernel_equals_torch_path(compression, layer_ids, max_ngram, heads, reset):
    lookup, size, ids, pad, eos = compression
    kw = dict(layer_ids=layer_ids, max_ngram=max_ngram, heads_per_ngram=heads,
              table_size_per_ngram=[size * (3 + n) for n in range(max_ngram - 1)], pad_id=pad, seed=7,
              reset_at_doc_boundary=reset, eos_id=eos)
    # EOS right at row starts and in runs; negative ids pass through like in the reference.
    raw = torch.from_numpy(batch(ids, B=6, T=41, seed=max_ngram * 10 + heads, eos=eos,
                                 extra=[(0, 0, eos), (1, 1, eos), (1, 2, eos), (2, 5, -1)]))
    want = NgramHasher(lookup, backend="torch", **kw)(raw)
    for threads in (1, 3):   # the token range split over threads, cutting rows mid-way
        from unittest import mock

        with mock.patch.object(ngram_kernel, "MIN_TOKENS_PER_THREAD", 1), mock.patch.object(
                torch, "get_num_threads", return_value=threads):
            got = NgramHasher(lookup, backend="cpu_kernel", **kw)(raw)
        for layer in layer_ids:
            assert got[layer].dtype == torch.int64 and got[layer].is_contiguous()
            assert torch.equal(got[layer], want[layer]), (layer, threads)


@pytest.mark.parametrize("backend", ["torch", pytest.param("cpu_kernel", marks=needs_kernel)])
def test_out_buffers_are_filled_and_checked(compression, backend):
    lookup, size, ids, pad, _ = compression
    h = NgramHasher(lookup, [1, 4], 3, 2, [size * 5, size * 5], pad_id=pad, backend=backend)
    raw = torch.from_numpy(batch(ids, B=3, T=17, seed=5))
    want = NgramHasher(lookup, [1, 4], 3, 2, [size * 5, size * 5], pad_id=pad, backend="torch")(raw)
    out = {l: torch.full((3, 17, 4), -7, dtype=torch.int64) for l in (1, 4)}
    got = h(raw, out=out)
    assert got is out
    for l in (1, 4):
        assert torch.equal(out[l], want[l])
    with pytest.raises(ValueError, match=r"out: expected a dict with one tensor per Engram layer \[1, 4\]"):
        h(raw, out={1: out[1]})
    with pytest.raises(ValueError, match=r"out\[4\]: expected a contiguous int64 tensor of shape \[3, 17, 4\]"):
        h(raw, out={1: out[1], 4: torch.empty(3, 17, 4, dtype=torch.int32)})


def test_backend_validation(compression):
    lookup, size, _, pad, _ = compression
    with pytest.raises(ValueError, match="backend='fast': choose 'torch'"):
        NgramHasher(lookup, [1], 2, 2, [500], pad_id=pad, backend="fast")


# ---- DeepSeek-V3-like tokenizer with engram.pad_id=2, end to end from a tokenizer directory ----------------------

DEEPSEEK_SPECIALS = ["<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜▁pad▁｜>"]   # ids 0, 1, 2 as in DeepSeek-V3


def _ref_lookup(tok):
    """The reference's compression of a tokenizers.Tokenizer (unicodedata port of the normalizer)."""
    import re
    import unicodedata

    white = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B)) + "\u2028\u2029\u202f\u205f\u3000"

    def norm(text):
        s = unicodedata.normalize("NFD", unicodedata.normalize("NFKC", text))
        s = "".join(c.lower() for c in s if not unicodedata.category(c).startswith("M"))
        s = re.sub(r"[ \t\r\n]+", " ", s)
        return " " if s == " " else s.strip(white)

    keys, lookup = {}, []
    for tid in range(tok.get_vocab_size(with_added_tokens=True)):
        text = tok.decode([tid], skip_special_tokens=False)
        key = tok.id_to_token(tid) if "\ufffd" in text else (norm(text) or text)
        lookup.append(keys.setdefault(key, len(keys)))
    return np.array(lookup, dtype=np.int64)


def test_deepseek_like_tokenizer_with_pad_id_2_hashes_like_the_reference(tmp_path, caplog):
    import json
    import logging

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from engram_train.config.schema import DataConfig
    from engram_train.data.loader import build_engram_hasher
    from engram_train.data.prepare import prepare_data

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(
        vocab_size=600, special_tokens=DEEPSEEK_SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False))
    assert [tok.token_to_id(t) for t in DEEPSEEK_SPECIALS] == [0, 1, 2]
    hf_dir = tmp_path / "deepseek_v3_like"
    hf_dir.mkdir()
    tok.save(str(hf_dir / "tokenizer.json"))

    def added(content):
        return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
                "single_word": False}

    # As DeepSeek-V3's own config: its pad token is the EOS; the demo pads with id 2 all the same.
    (hf_dir / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": added(DEEPSEEK_SPECIALS[0]), "eos_token": added(DEEPSEEK_SPECIALS[1]),
        "pad_token": added(DEEPSEEK_SPECIALS[1]), "clean_up_tokenization_spaces": False,
        "tokenizer_class": "LlamaTokenizerFast"}))
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join([TEXT] * 30))
    prepared = prepare_data(DataConfig(corpus="files", files=[str(corpus)], dir=str(tmp_path / "data"),
                                       tokenizer=str(hf_dir), valid_fraction=0.2), doc_chars=200, progress=False)
    assert (prepared.eos_id, prepared.pad_id) == (1, 1)    # named by the directory's config, not by a list of names
    assert (tmp_path / "data" / "tokenizer_config.json").is_file()

    layer_ids, max_ngram, heads = [1, 15], 3, 8
    cfg = EngramConfig(layer_ids=layer_ids, max_ngram=max_ngram, heads_per_ngram=heads, pad_id=2)
    with caplog.at_level(logging.INFO, logger="engram_train.data.loader"):
        h = build_engram_hasher(prepared, cfg)
    line = [r.getMessage() for r in caplog.records if "pad id" in r.getMessage()]
    assert len(line) == 1 and "pad id 2 '<｜▁pad▁｜>' (engram.pad_id)" in line[0], line

    lookup = _ref_lookup(tok)
    size = int(lookup.max()) + 1
    assert lookup[2] != lookup[1]                           # the pad id changes the padded windows
    sizes = [5 * size] * (max_ngram - 1)
    ids = np.array(tok.encode(TEXT * 2).ids, dtype=np.int64)
    raw = batch(ids, B=3, T=17, seed=5)
    ref, primes, _ = ref_hash(lookup, raw, layer_ids, max_ngram, heads, sizes, pad_raw=2, seed=0)
    out = h(torch.from_numpy(raw))
    for layer in layer_ids:
        np.testing.assert_array_equal(out[layer].numpy(), ref[layer])
    default_pad, _, _ = ref_hash(lookup, raw, layer_ids, max_ngram, heads, sizes, pad_raw=1, seed=0)
    assert not np.array_equal(default_pad[1][:, :2], ref[1][:, :2])

    # without engram.pad_id the default is the tokenizer's pad token (here the EOS), and the log says so
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="engram_train.data.loader"):
        h1 = build_engram_hasher(prepared, EngramConfig(layer_ids=layer_ids, max_ngram=max_ngram, heads_per_ngram=heads))
    assert h1.pad_id == 1
    assert any("pad id 1 '<｜end▁of▁sentence｜>' (the pad token of its special-tokens map" in r.getMessage()
               for r in caplog.records)
    np.testing.assert_array_equal(h1(torch.from_numpy(raw))[1].numpy(), default_pad[1])


def test_engram_pad_id_outside_the_vocabulary(compression):
    lookup, size, _, pad, eos = compression
    with pytest.raises(ConfigError, match=rf"engram.pad_id={len(lookup)}: must be a raw id of the tokenizer's "):
        hasher_from_config(EngramConfig(pad_id=len(lookup)), lookup, size, pad_id=pad, eos_id=eos)
    with pytest.raises(ConfigError, match=r"engram.pad_id=-1: must be a raw tokenizer id >= 0"):
        EngramConfig(pad_id=-1)


# ---- incremental hashing for generation ---------------------------------------------------------------------------

@pytest.mark.parametrize("reset", [False, True])
def test_incremental_hash_ids_of_a_growing_sequence_equal_the_whole_sequences(compression, reset):
    """tools/generate.py hashes each new token from the last max_ngram tokens only; the ids of the
    whole sequence come from the independent reference above."""
    from engram_train.generate import IncrementalHashes

    lookup, size, ids, pad, eos = compression
    max_ngram, heads, sizes = 4, 3, [size * 5 + 7, size * 5 + 11, size * 5 + 13]
    raw = batch(ids, B=1, T=40, seed=5, eos=eos, extra=[(0, 3, eos), (0, 4, eos), (0, 38, eos)])
    h = NgramHasher(lookup, [0, 2], max_ngram, heads, sizes, pad_id=pad, seed=4, reset_at_doc_boundary=reset,
                    eos_id=eos)
    inc = IncrementalHashes(h, torch.from_numpy(raw[:, :2]))   # a two-token prompt, then one token at a time
    for t in range(2, raw.shape[1]):
        inc.append(torch.tensor(raw[0, t]))
    ref, _, _ = ref_hash(lookup, raw, [0, 2], max_ngram, heads, sizes, pad, seed=4, eos_raw=eos if reset else None)
    for layer in (0, 2):
        np.testing.assert_array_equal(inc.ids[layer].numpy(), ref[layer])
