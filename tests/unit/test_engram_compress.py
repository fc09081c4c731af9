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


def test_rejects_non_tokenizer():
    with pytest.raises(TypeError, match=r"tokenizers.Tokenizer.*lacks decode\(ids, skip_special_tokens=False\)"):
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

    def counting(t, **kw):
        calls.append(1)
        return real(t, **kw)

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
             sha256=np.str_("0" * 64), decoding=np.str_("file:tokenizer.json"), version=np.int64(compress.CACHE_VERSION))
    np.testing.assert_array_equal(load_or_build_compression(tok_path)[0], lookup)


def test_missing_tokenizer_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="tokenizer_path="):
        load_or_build_compression(str(tmp_path / "nope.json"))


# ---- Hugging Face tokenizers: the object path and the saved-directory path ---------------------------------------
#
# ``HFLike`` states what transformers (5.7 and later) does when the reference calls
# ``tokenizer.decode([tid], skip_special_tokens=False)`` on a fast tokenizer loaded from a directory:
# the tokenizers decoder, then ``clean_up_tokenization`` when tokenizer_config.json sets
# ``clean_up_tokenization_spaces`` and the model is not BPE.  ``bpe_cleanup=True`` is the rule of
# earlier releases (cleanup for every model).  transformers itself is not a dependency; the
# reference loop below is the demo's, run over this object.

# Added tokens: accented (the byte-level decoder turns "é" of an added token into U+FFFD), whitespace
# only, and pairs that transformers' cleanup merges ("hello ," and "hello,") and normalization does not.
ADDED = ["Café", "CAFÉ", "   ", "\t\n", " \r\n\t ", "hello ,", "hello,", "don 't", "don't", "wait .", "wait."]


class HFLike:
    def __init__(self, backend, clean_up_tokenization_spaces=False, bpe_cleanup=False):
        self.backend_tokenizer = backend
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.bpe_cleanup = bpe_cleanup

    @classmethod
    def from_pretrained(cls, directory, bpe_cleanup=False):
        import json
        from tokenizers import Tokenizer

        with open(os.path.join(directory, "tokenizer_config.json")) as f:
            config = json.load(f)
        return cls(Tokenizer.from_file(os.path.join(directory, "tokenizer.json")),
                   config.get("clean_up_tokenization_spaces", False), bpe_cleanup)

    def __len__(self):
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def convert_ids_to_tokens(self, tid):
        return self.backend_tokenizer.id_to_token(tid)

    def decode(self, ids, skip_special_tokens=False):
        text = self.backend_tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
        is_bpe = type(self.backend_tokenizer.model).__name__ == "BPE"
        if self.clean_up_tokenization_spaces and (not is_bpe or self.bpe_cleanup):
            for old, new in _CLEANUP:
                text = text.replace(old, new)
        return text


def ref_compression_of_object(tokenizer):
    """The reference's lookup loop over a transformers-like tokenizer object, one id at a time."""
    key_to_new, lookup = {}, []
    for tid in range(len(tokenizer)):
        text = tokenizer.decode([tid], skip_special_tokens=False)
        if "\ufffd" in text:
            key = tokenizer.convert_ids_to_tokens(tid)
        else:
            norm = ref_normalize(text)
            key = norm if norm else text
        if key not in key_to_new:
            key_to_new[key] = len(key_to_new)
        lookup.append(key_to_new[key])
    return np.array(lookup, dtype=np.int64), len(key_to_new)


def _byte_level_bpe():
    tok = train_tokenizer(500)
    tok.add_tokens(ADDED)
    return tok


def _byte_fallback_bpe():
    """Llama-style: Metaspace pieces, <0xNN> byte tokens decoded by ByteFallback (lone high bytes give U+FFFD)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    base = Tokenizer(models.BPE())
    base.pre_tokenizer = pre_tokenizers.Metaspace()
    base.train_from_iterator([TEXT] * 4, trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"],
                                                             show_progress=False))
    import json

    model = json.loads(base.to_str())["model"]
    vocab = dict(model["vocab"])
    for b in range(256):
        vocab.setdefault(f"<0x{b:02X}>", len(vocab))
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    tok = Tokenizer(models.BPE(vocab, merges, unk_token="<unk>", byte_fallback=True))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.add_special_tokens(["<unk>", "<s>", "</s>"])
    tok.add_tokens(ADDED)
    return tok


def _wordpiece():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.normalizer = normalizers.BertNormalizer(lowercase=False)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(cleanup=False)   # transformers' flag, not the decoder's, does the cleanup
    tok.train_from_iterator([TEXT] * 4, trainers.WordPieceTrainer(
        vocab_size=400, special_tokens=["[UNK]", "[PAD]", "[SEP]"], show_progress=False))
    tok.add_tokens(ADDED)
    return tok


KINDS = {"bpe": _byte_level_bpe, "byte_fallback_bpe": _byte_fallback_bpe, "wordpiece": _wordpiece}


@pytest.fixture(scope="module")
def hf_tokenizers():
    return {kind: make() for kind, make in KINDS.items()}


def _save_dir(tmp_path, backend, cleanup, name="tok"):
    import json

    d = tmp_path / name
    d.mkdir()
    backend.save(str(d / "tokenizer.json"))
    (d / "tokenizer_config.json").write_text(json.dumps({"clean_up_tokenization_spaces": cleanup,
                                                         "tokenizer_class": "PreTrainedTokenizerFast"}))
    return str(d)


@pytest.mark.parametrize("cleanup", [False, True], ids=["cleanup_off", "cleanup_on"])
@pytest.mark.parametrize("kind", list(KINDS))
def test_hf_tokenizers_object_and_directory_match_reference(kind, cleanup, hf_tokenizers, tmp_path):
    d = _save_dir(tmp_path, hf_tokenizers[kind], cleanup)
    hf = HFLike.from_pretrained(d)
    ref_lookup, ref_size = ref_compression_of_object(hf)
    assert ref_size < len(hf)
    for lookup, size in (build_compression(hf),                      # the user's tokenizer object
                         load_or_build_compression(d),               # the saved directory
                         load_or_build_compression(os.path.join(d, "tokenizer.json")),   # its file: cache hit
                         load_or_build_compression(d, tokenizer=hf)):   # object, cached next to the file
        np.testing.assert_array_equal(lookup, ref_lookup)
        assert size == ref_size
    if kind == "byte_fallback_bpe":   # lone high bytes decode to U+FFFD and stay apart, keyed by "<0xNN>"
        ids = [hf.backend_tokenizer.token_to_id(f"<0x{b:02X}>") for b in (0xC3, 0xA9, 0xE2)]
        assert len({int(ref_lookup[i]) for i in ids}) == 3
        assert ref_lookup[hf.backend_tokenizer.token_to_id("<0x41>")] == ref_lookup[hf.backend_tokenizer.token_to_id("a")]
    if kind == "bpe":                 # an accented added token decodes to U+FFFD through the byte-level decoder
        cafe = hf.backend_tokenizer.token_to_id("Café")
        assert "\ufffd" in hf.decode([cafe])


def test_cleanup_flag_merges_for_wordpiece_and_not_for_bpe(hf_tokenizers, tmp_path):
    """The added token pairs do exercise the flag: WordPiece merges "hello ," with "hello,", BPE (5.7+) does not."""
    def pair_merged(kind, cleanup, name):
        d = _save_dir(tmp_path, hf_tokenizers[kind], cleanup, name)
        lookup, _ = load_or_build_compression(d)
        backend = hf_tokenizers[kind]
        return lookup[backend.token_to_id("hello ,")] == lookup[backend.token_to_id("hello,")]

    assert pair_merged("wordpiece", True, "wp_on") and not pair_merged("wordpiece", False, "wp_off")
    assert not pair_merged("bpe", True, "bpe_on") and not pair_merged("bpe", False, "bpe_off")
    # earlier transformers cleaned BPE text too: the object path follows the object it is given
    d = _save_dir(tmp_path, hf_tokenizers["bpe"], True, "bpe_old")
    old = HFLike.from_pretrained(d, bpe_cleanup=True)
    lookup, size = build_compression(old)
    np.testing.assert_array_equal(lookup, ref_compression_of_object(old)[0])
    assert lookup[old.backend_tokenizer.token_to_id("hello ,")] == lookup[old.backend_tokenizer.token_to_id("hello,")]


def test_cache_is_never_reused_across_decodings(hf_tokenizers, tmp_path, monkeypatch):
    d = _save_dir(tmp_path, hf_tokenizers["bpe"], True)
    old = HFLike.from_pretrained(d, bpe_cleanup=True)          # decodes differently from the file rule
    from_file, _ = load_or_build_compression(d)
    from_object, _ = load_or_build_compression(d, tokenizer=old)
    assert not np.array_equal(from_file, from_object)
    np.testing.assert_array_equal(from_object, ref_compression_of_object(old)[0])
    np.testing.assert_array_equal(load_or_build_compression(d)[0], from_file)   # and back
    # flipping the flag in tokenizer_config.json (same tokenizer.json bytes) recomputes a WordPiece lookup
    wp = _save_dir(tmp_path, hf_tokenizers["wordpiece"], False, "wp")
    off, _ = load_or_build_compression(wp)
    import json

    with open(os.path.join(wp, "tokenizer_config.json"), "w") as f:
        json.dump({"clean_up_tokenization_spaces": True}, f)
    on, _ = load_or_build_compression(wp)
    np.testing.assert_array_equal(on, ref_compression_of_object(HFLike.from_pretrained(wp))[0])
    assert not np.array_equal(on, off)
    # a hit of the same decoding is a hit
    monkeypatch.setattr(compress, "build_compression", lambda *a, **k: pytest.fail("expected a cache hit"))
    np.testing.assert_array_equal(load_or_build_compression(wp)[0], on)
