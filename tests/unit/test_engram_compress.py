"""Tokenizer compression against an independent port of the reference rule (docs/engram.md §1.1).

The port below uses only ``unicodedata`` and ``re``; the code under test uses
HF ``tokenizers`` normalizers.  The tokenizer is a real byte-level BPE trained
here on a text with accents, case, tabs, newlines, runs of spaces, punctuation
and digits, so that many ids share a canonical form and some decode to U+FFFD.
"""

from __future__ import annotations

import os
import re
import unicodedata

import numpy as np
import pytest

from engram_train.engram import compress
from engram_train.engram.compress import build_compression, cache_path_for, load_or_build_compression

TEXT = """\
The Café on Rue Saint-Honoré opened at 7:45.   THE CAFÉ, the café, The cafe!
Naïve coöperation?  Élodie's résumé — déjà vu; «Ça va?» said Zoë.
\tTabs\tand\ttabs;\n\nnewlines\r\nand    spaces    everywhere...
Numbers: 0 1 2 3 42 1999 2026 3.14159 -17 +8 100% $5.00 #7 @home (x) [y] {z}
ÀÁÂÃÄÅ àáâãäå ÈÉÊË èéêë ÌÍÎÏ ìíîï ÒÓÔÕÖ òóôõö ÙÚÛÜ ùúûü Ññ Çç
ﬁne ﬂow ½ ² Ⅻ ｆｕｌｌｗｉｄｔｈ — KELVIN K and Å ångström
Hello hello HELLO hElLo; WORLD world World!  Good-bye, good bye, GOODBYE.
"""

# Unicode White_Space: what the Rust side's char::is_whitespace strips (Python's str.strip differs on \x1c-\x1f).
_WHITE_SPACE = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(chr(c) for c in range(0x2000, 0x200B)) + \
    "\u2028\u2029\u202f\u205f\u3000"
_SENTINEL = "\ue000"


def ref_normalize(text: str) -> str:
    s = unicodedata.normalize("NFKC", text)
    s = unicodedata.normalize("NFD", s)
    s = "".join(c for c in s if not unicodedata.category(c).startswith("M"))   # StripAccents: all marks
    s = "".join(c.lower() for c in s)        # per character, like the Rust Lowercase normalizer
    s = re.sub(r"[ \t\r\n]+", " ", s)
    if s == " ":
        s = _SENTINEL
    s = s.strip(_WHITE_SPACE)
    return s.replace(_SENTINEL, " ")


# transformers' clean_up_tokenization, which its decode applies when clean_up_tokenization_spaces is set
_CLEANUP = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
            (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")]


def ref_compression(tok, cleanup=False):
    """Straight port of the reference's lookup-table loop, one id at a time."""
    vocab = tok.get_vocab_size(with_added_tokens=True)
    key_to_new, lookup = {}, []
    for tid in range(vocab):
        text = tok.decode([tid], skip_special_tokens=False)
        if cleanup:
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        if "\ufffd" in text:
            key = tok.id_to_token(tid)
        else:
            norm = ref_normalize(text)
            key = norm if norm else text
        if key not in key_to_new:
            key_to_new[key] = len(key_to_new)
        lookup.append(key_to_new[key])
    return np.array(lookup, dtype=np.int64), len(key_to_new)


def train_tokenizer(vocab_size: int = 600):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<pad>", "<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([TEXT] * 4, trainer)
    tok.add_tokens(["<|user|>", " THE"])
    return tok


@pytest.fixture(scope="module")
def tok():
    return train_tokenizer()


@pytest.fixture()
def tok_path(tmp_path, tok):
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    return path


def test_normalizer_port_matches_on_tricky_strings():
    # Pins the port itself on the cases the rule singles out.
    assert ref_normalize(" ") == " "
    assert ref_normalize(" \t\n ") == " "
    assert ref_normalize("  Héllo\tWörld  ") == "hello world"
    assert ref_normalize("ﬁ") == "fi"
    assert ref_normalize("\u212a") == "k"       # KELVIN SIGN -> K -> k
    assert ref_normalize("\u0301") == ""         # a lone combining mark vanishes


def test_compression_matches_reference_port(tok):
    lookup, size = build_compression(tok)
    ref_lookup, ref_size = ref_compression(tok)
    assert lookup.dtype == np.int64
    np.testing.assert_array_equal(lookup, ref_lookup)
    assert size == ref_size
    vocab = tok.get_vocab_size(with_added_tokens=True)
    assert lookup.shape == (vocab,)
    assert size < vocab                          # compression actually merged ids
    assert set(np.unique(lookup)) == set(range(size))


def test_compression_merges_what_the_rule_says(tok):
    lookup, _ = build_compression(tok)
    ids = tok.get_vocab()

    def cid(token_text):
        # The byte-level token that decodes to exactly this text.
        hits = [i for t, i in ids.items() if tok.decode([i], skip_special_tokens=False) == token_text]
        assert hits, token_text
        return lookup[hits[0]]

    # whitespace of any kind and length is one canonical " "
    assert cid(" ") == cid("\t") == cid("\n") == cid("\r")
    # case and surrounding spaces fold; accents strip
    assert cid("The") == cid("the") == cid(" the")
    assert cid("é") == cid("e")
    # fragments of multi-byte characters decode to U+FFFD and stay apart, keyed by the raw token
    fffd = [i for i in range(len(lookup)) if "\ufffd" in tok.decode([i], skip_special_tokens=False)]
    assert len(fffd) > 10
    assert len({int(lookup[i]) for i in fffd}) == len(fffd)


def test_transformers_fast_tokenizer_duck_typed(tok):
    class FastTokenizerLike:          # what transformers' PreTrainedTokenizerFast exposes
        def __init__(self, backend, cleanup):
            self.backend_tokenizer = backend
            self.clean_up_tokenization_spaces = cleanup

        def __len__(self):
            return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    lookup, size = build_compression(FastTokenizerLike(tok, cleanup=False))
    ref_lookup, ref_size = build_compression(tok)
    np.testing.assert_array_equal(lookup, ref_lookup)
    assert size == ref_size
    # transformers' decode cleans " ," style spaces when the flag is set; the reference saw that text
    lookup_c, size_c = build_compression(FastTokenizerLike(tok, cleanup=True))
    ref_c, ref_size_c = ref_compression(tok, cleanup=True)
    np.testing.assert_array_equal(lookup_c, ref_c)
    assert size_c == ref_size_c


def test_rejects_non_tokenizer():
    with pytest.raises(TypeError, match="tokenizers.Tokenizer"):
        build_compression(object())


def test_cache_hit_skips_rebuild(tok_path, monkeypatch):
    lookup, size = load_or_build_compression(tok_path)
    cache = cache_path_for(tok_path)
    assert cache == tok_path + ".engram_compress.npz" and os.path.exists(cache)
    assert sorted(os.listdir(os.path.dirname(tok_path))) == ["tokenizer.json", "tokenizer.json.engram_compress.npz"]

    def boom(_):
        raise AssertionError("cache hit expected, compression was rebuilt")

    monkeypatch.setattr(compress, "build_compression", boom)
    lookup2, size2 = load_or_build_compression(tok_path)
    np.testing.assert_array_equal(lookup2, lookup)
    assert size2 == size


def test_cache_invalidated_when_tokenizer_changes(tok_path):
    from tokenizers import Tokenizer

    lookup, size = load_or_build_compression(tok_path)
    changed = Tokenizer.from_file(tok_path)
    changed.add_tokens(["<|new-token|>", "ZZZ-unseen"])
    changed.save(tok_path)
    calls = []
    real = compress.build_compression

    def counting(t):
        calls.append(1)
        return real(t)

    compress.build_compression = counting
    try:
        lookup2, size2 = load_or_build_compression(tok_path)
    finally:
        compress.build_compression = real
    assert calls == [1]
    assert lookup2.shape[0] == lookup.shape[0] + 2 and size2 == size + 2
    np.testing.assert_array_equal(lookup2, ref_compression(changed)[0])
    # and the rewritten cache now hits for the new file
    np.testing.assert_array_equal(load_or_build_compression(tok_path)[0], lookup2)


def test_corrupt_or_foreign_cache_is_rebuilt(tok_path):
    lookup, size = load_or_build_compression(tok_path)
    cache = cache_path_for(tok_path)
    with open(cache, "wb") as f:
        f.write(b"not an npz")
    lookup2, size2 = load_or_build_compression(tok_path)
    np.testing.assert_array_equal(lookup2, lookup)
    # a cache written for other bytes (same length, different sha) is not trusted either
    np.savez(cache, lookup=np.zeros_like(lookup), compressed_vocab_size=np.int64(1),
             sha256=np.str_("0" * 64), version=np.int64(compress.CACHE_VERSION))
    np.testing.assert_array_equal(load_or_build_compression(tok_path)[0], lookup)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_path="):
        load_or_build_compression(str(tmp_path / "nope.json"))
