"""Tokenizer compression: many surface forms of a token share one canonical id.

Rule (docs/engram.md §1.1, the reference demo's ``CompressedTokenizer``):
every id ``0..V-1`` of the base tokenizer is decoded alone with special tokens
kept; a text holding U+FFFD (a byte-level fragment of a multi-byte character)
is keyed by its raw token string, any other text by its normalized form
(NFKC, NFD, strip accents, lowercase, collapse ``[ \\t\\r\\n]+`` to one space,
strip, except that a text that is exactly one space stays one space), falling
back to the decoded text when normalization leaves nothing.  Keys are numbered
in the order ids first produce them.  The result is ``lookup[old_id] ->
canonical_id`` (int64) and ``V'``, the number of canonical ids.

"Decoded alone" is whatever the reference's tokenizer object returns, so there
are two decodings:

- ``tokenizer``: the user's object (a transformers tokenizer, or anything with
  ``decode(ids, skip_special_tokens=False)`` and ``len()``) decodes each id: exact
  for that object, whatever its library version does.
- ``file``: a saved tokenizer (``tokenizer.json`` plus the ``tokenizer_config.json``
  next to it) decoded the way current transformers (5.7 and later) decodes it:
  the ``tokenizers`` decoder, then transformers' ``clean_up_tokenization`` only when
  the config sets ``clean_up_tokenization_spaces`` and the model is not BPE (or
  ``clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output`` is set).

Invariants:
- ``lookup`` has one entry per id of the tokenizer *including* added tokens,
  its values are exactly ``0..V'-1`` and ``V' == lookup.max() + 1``.
- The on-disk cache (``<tokenizer.json>.engram_compress.npz``) is keyed by the
  sha256 of the tokenizer file's bytes, by the decoding (which one, and for
  ``file`` whether cleanup applied) and by ``CACHE_VERSION``; any other content
  is recomputed, never trusted, so a lookup is never reused across decodings.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import tempfile
from typing import Any, Optional, Tuple

import numpy as np

from engram_train.errors import DataError

log = logging.getLogger(__name__)

# Bump when the normalization rule changes, so that old caches are recomputed.
CACHE_VERSION = 2
CACHE_SUFFIX = ".engram_compress.npz"
TOKENIZER_FILE = "tokenizer.json"
TOKENIZER_CONFIG_FILE = "tokenizer_config.json"

# A private-use character carries a lone space through Strip (the reference's trick).
_SENTINEL = "\ue000"
_REPLACEMENT_CHAR = "\ufffd"

# transformers' ``clean_up_tokenization``: what its ``decode`` applies to the text when
# ``clean_up_tokenization_spaces`` is set (and, from 5.7 on, the model is not BPE).
_CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)
_FORCE_BPE_CLEANUP = "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output"


def _normalizer():
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFKC(),
        normalizers.NFD(),
        normalizers.StripAccents(),
        normalizers.Lowercase(),
        normalizers.Replace(Regex(r"[ \t\r\n]+"), " "),
        normalizers.Replace(Regex(r"^ $"), _SENTINEL),
        normalizers.Strip(),
        normalizers.Replace(_SENTINEL, " "),
    ])


def clean_up_tokenization(text: str) -> str:
    for old, new in _CLEANUP_REPLACEMENTS:
        text = text.replace(old, new)
    return text


def _is_backend(tokenizer: Any) -> bool:
    try:
        from tokenizers import Tokenizer
    except ImportError:   # pragma: no cover - tokenizers is a dependency
        return False
    return isinstance(tokenizer, Tokenizer)


def _raw_token_fn(tokenizer: Any):
    """id -> raw token string, the key of a text holding U+FFFD (transformers: convert_ids_to_tokens)."""
    for owner, method in ((tokenizer, "convert_ids_to_tokens"), (tokenizer, "id_to_token"),
                          (getattr(tokenizer, "backend_tokenizer", None), "id_to_token")):
        fn = getattr(owner, method, None)
        if callable(fn):
            return fn
    return None


def _compress_texts(texts, raw_token) -> Tuple[np.ndarray, int]:
    normalizer = _normalizer()
    key_to_new: dict = {}
    lookup = np.empty(len(texts), dtype=np.int64)
    for tid, text in enumerate(texts):
        if _REPLACEMENT_CHAR in text:
            key = raw_token(tid)
        else:
            key = normalizer.normalize_str(text) or text
        lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
    return lookup, len(key_to_new)


def build_compression(tokenizer: Any, *, cleanup: bool = False) -> Tuple[np.ndarray, int]:
    """``(lookup, compressed_vocab_size)`` of ``tokenizer``; see the module docstring for the rule.

    ``tokenizer`` is either a ``tokenizers.Tokenizer`` (decoded by its own decoder; ``cleanup``
    then applies transformers' ``clean_up_tokenization``, as ``load_or_build_compression`` decides
    from ``tokenizer_config.json``), or any object with ``decode(ids, skip_special_tokens=False)``,
    ``len()`` (the vocabulary with added tokens) and ``convert_ids_to_tokens`` or ``id_to_token``
    -- a transformers tokenizer.  The object's own ``decode`` is then the truth, as in the
    reference, and ``cleanup`` must stay False (the object applies its own).
    """
    if _is_backend(tokenizer):
        vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        # One call into Rust for all single-id decodes; identical to decoding each id alone.
        texts = tokenizer.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
        if cleanup:
            texts = [clean_up_tokenization(t) for t in texts]
        return _compress_texts(texts, tokenizer.id_to_token)
    decode, raw_token = getattr(tokenizer, "decode", None), _raw_token_fn(tokenizer)
    missing = [what for what, ok in (("decode(ids, skip_special_tokens=False)", callable(decode)),
                                     ("__len__", hasattr(tokenizer, "__len__")),
                                     ("convert_ids_to_tokens or id_to_token", raw_token is not None)) if not ok]
    if missing:
        raise TypeError(f"tokenizer={type(tokenizer).__name__}: expected a tokenizers.Tokenizer or a tokenizer object "
                        f"like transformers' (it lacks {', '.join(missing)}); pass "
                        f"tokenizers.Tokenizer.from_file(path) or AutoTokenizer.from_pretrained(dir)")
    if cleanup:
        raise ValueError("cleanup=True: a tokenizer object applies its own clean-up in decode(); pass cleanup=False")
    texts = [decode([tid], skip_special_tokens=False) for tid in range(len(tokenizer))]
    return _compress_texts(texts, raw_token)


def tokenizer_file(path: str) -> str:
    """The ``tokenizer.json`` that ``path`` names: the file itself, or the one inside a directory."""
    return os.path.join(path, TOKENIZER_FILE) if os.path.isdir(path) else path


def file_cleanup(tokenizer_path: str, tokenizer_json: Optional[dict] = None) -> bool:
    """Whether current transformers cleans up the decoded text of the saved tokenizer at ``tokenizer_path``.

    Read from the ``tokenizer_config.json`` next to it (absent: no cleanup, transformers' default).
    """
    config_path = os.path.join(os.path.dirname(os.path.abspath(tokenizer_path)), TOKENIZER_CONFIG_FILE)
    if not os.path.isfile(config_path):
        return False
    try:
        with open(config_path, encoding="utf-8") as f:
            config = json.load(f)
    except (OSError, ValueError) as e:
        raise DataError(f"{config_path} is not a readable JSON file ({e}).  Fix: repair it or remove it "
                        f"(it is read for clean_up_tokenization_spaces and the special tokens)") from None
    if not isinstance(config, dict) or not config.get("clean_up_tokenization_spaces", False):
        return False
    if tokenizer_json is None:
        with open(tokenizer_path, encoding="utf-8") as f:
            tokenizer_json = json.load(f)
    model_type = (tokenizer_json.get("model") or {}).get("type")
    return model_type != "BPE" or bool(config.get(_FORCE_BPE_CLEANUP, False))


def object_decoding(tokenizer: Any) -> str:
    """The cache's name for decoding through ``tokenizer``: its class and its library's version."""
    cls = type(tokenizer)
    package = cls.__module__.split(".")[0]
    version = getattr(sys.modules.get(package), "__version__", "?")
    return f"tokenizer:{cls.__module__}.{cls.__qualname__}@{package}=={version}"


def cache_path_for(tokenizer_path: str) -> str:
    return tokenizer_file(tokenizer_path) + CACHE_SUFFIX


def _read_cache(path: str, digest: str, decoding: str):
    try:
        with np.load(path, allow_pickle=False) as z:
            if (int(z["version"]) != CACHE_VERSION or str(z["sha256"]) != digest
                    or str(z["decoding"]) != decoding):
                return None
            lookup = z["lookup"].astype(np.int64, copy=False)
            size = int(z["compressed_vocab_size"])
    except (OSError, KeyError, ValueError) as e:   # unreadable or foreign file: recompute
        log.warning("ignoring unreadable Engram compression cache %s (%s)", path, e)
        return None
    if lookup.ndim != 1 or lookup.size == 0 or int(lookup.max()) + 1 != size:
        return None
    return lookup, size


def _write_cache(path: str, digest: str, decoding: str, lookup: np.ndarray, size: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:   # read-only tokenizer directory: run uncached rather than fail
        log.warning("cannot write Engram compression cache next to %s (%s); it will be recomputed next time", path, e)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, lookup=lookup, compressed_vocab_size=np.int64(size), sha256=np.str_(digest),
                     decoding=np.str_(decoding), version=np.int64(CACHE_VERSION))
        os.chmod(tmp, 0o644)    # mkstemp makes it private; other users of a shared tokenizer read it too
        os.replace(tmp, path)   # atomic: concurrent ranks see the old file or the whole new one
    except OSError as e:        # e.g. a full disk: the result is still valid, only the cache is lost
        log.warning("could not write Engram compression cache %s (%s)", path, e)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def load_or_build_compression(tokenizer_path: str, tokenizer: Any = None) -> Tuple[np.ndarray, int]:
    """``build_compression`` of the saved tokenizer at ``tokenizer_path``, cached next to it.

    ``tokenizer_path`` is a ``tokenizer.json`` or a Hugging Face tokenizer directory holding one.
    Without ``tokenizer`` the ``file`` decoding applies (``tokenizer_config.json`` next to the
    file decides the cleanup); with ``tokenizer`` (an object loaded from the same files) each id is
    decoded through it.  A 128k vocabulary takes seconds to compress; the cache makes later starts
    instant.  It is reused only for the same file bytes and the same decoding.
    """
    from tokenizers import Tokenizer

    path = tokenizer_file(tokenizer_path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"tokenizer_path={tokenizer_path!r}: no such file; pass the path of a tokenizer.json "
                                f"or of a directory holding one")
    with open(path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    if tokenizer is not None:
        decoding, cleanup = object_decoding(tokenizer), False
    else:
        cleanup = file_cleanup(path, json.loads(raw.decode("utf-8")))
        decoding = "file:tokenizer.json" + ("+clean_up_tokenization" if cleanup else "")
    cache = cache_path_for(path)
    if os.path.exists(cache):
        hit = _read_cache(cache, digest, decoding)
        if hit is not None:
            return hit
    # Build from the bytes that were hashed, so a concurrent rewrite cannot mislabel the cache.
    if tokenizer is not None:
        lookup, size = build_compression(tokenizer)
    else:
        lookup, size = build_compression(Tokenizer.from_str(raw.decode("utf-8")), cleanup=cleanup)
    _write_cache(cache, digest, decoding, lookup, size)
    return lookup, size
