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

Invariants:
- ``lookup`` has one entry per id of the tokenizer *including* added tokens,
  its values are exactly ``0..V'-1`` and ``V' == lookup.max() + 1``.
- The on-disk cache (``<tokenizer.json>.engram_compress.npz``) is keyed by the
  sha256 of the tokenizer file's bytes and by ``CACHE_VERSION``; any other
  content is recomputed, never trusted.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
from typing import Any, Tuple

import numpy as np

log = logging.getLogger(__name__)

# Bump when the normalization rule changes, so that old caches are recomputed.
CACHE_VERSION = 1
CACHE_SUFFIX = ".engram_compress.npz"

# A private-use character carries a lone space through Strip (the reference's trick).
_SENTINEL = "\ue000"
_REPLACEMENT_CHAR = "\ufffd"

# transformers' ``clean_up_tokenization`` (applied by a fast tokenizer's ``decode``
# when ``clean_up_tokenization_spaces`` is set), kept so wrapped tokenizers
# compress exactly as the reference, which decodes through transformers.
_CLEANUP_REPLACEMENTS = (
    (" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"),
    (" n't", "n't"), (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re"),
)


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


def _backend(tokenizer: Any):
    """The ``tokenizers.Tokenizer`` behind ``tokenizer`` (itself, or a transformers fast tokenizer's backend)."""
    backend = getattr(tokenizer, "backend_tokenizer", tokenizer)
    for method in ("decode_batch", "id_to_token", "get_vocab_size"):
        if not callable(getattr(backend, method, None)):
            raise TypeError(
                f"tokenizer={type(tokenizer).__name__}: expected a tokenizers.Tokenizer or a transformers fast "
                f"tokenizer (with .backend_tokenizer); it lacks {method}(). Pass tokenizers.Tokenizer.from_file(path)."
            )
    return backend


def build_compression(tokenizer: Any) -> Tuple[np.ndarray, int]:
    """Compute ``(lookup, compressed_vocab_size)`` for a HF tokenizer; see the module docstring for the rule.

    ``tokenizer`` is a ``tokenizers.Tokenizer`` or anything with ``.backend_tokenizer``
    (a transformers fast tokenizer); for the latter ``len(tokenizer)`` gives the
    vocabulary size and its ``clean_up_tokenization_spaces`` flag is honoured,
    as transformers' ``decode`` would.
    """
    backend = _backend(tokenizer)
    if hasattr(tokenizer, "backend_tokenizer") and hasattr(tokenizer, "__len__"):
        vocab_size = len(tokenizer)
    else:
        vocab_size = backend.get_vocab_size(with_added_tokens=True)
    cleanup = bool(getattr(tokenizer, "clean_up_tokenization_spaces", False)) and tokenizer is not backend

    # One call into Rust for all single-id decodes; identical to decoding each id alone.
    texts = backend.decode_batch([[i] for i in range(vocab_size)], skip_special_tokens=False)
    normalizer = _normalizer()
    key_to_new: dict = {}
    lookup = np.empty(vocab_size, dtype=np.int64)
    for tid, text in enumerate(texts):
        if cleanup:
            for old, new in _CLEANUP_REPLACEMENTS:
                text = text.replace(old, new)
        if _REPLACEMENT_CHAR in text:
            key = backend.id_to_token(tid)
        else:
            key = normalizer.normalize_str(text) or text
        lookup[tid] = key_to_new.setdefault(key, len(key_to_new))
    return lookup, len(key_to_new)


def cache_path_for(tokenizer_path: str) -> str:
    return tokenizer_path + CACHE_SUFFIX


def _read_cache(path: str, digest: str):
    try:
        with np.load(path, allow_pickle=False) as z:
            if int(z["version"]) != CACHE_VERSION or str(z["sha256"]) != digest:
                return None
            lookup = z["lookup"].astype(np.int64, copy=False)
            size = int(z["compressed_vocab_size"])
    except (OSError, KeyError, ValueError) as e:   # unreadable or foreign file: recompute
        log.warning("ignoring unreadable Engram compression cache %s (%s)", path, e)
        return None
    if lookup.ndim != 1 or lookup.size == 0 or int(lookup.max()) + 1 != size:
        return None
    return lookup, size


def _write_cache(path: str, digest: str, lookup: np.ndarray, size: int) -> None:
    directory = os.path.dirname(os.path.abspath(path))
    try:
        fd, tmp = tempfile.mkstemp(dir=directory, prefix=os.path.basename(path) + ".", suffix=".tmp")
    except OSError as e:   # read-only tokenizer directory: run uncached rather than fail
        log.warning("cannot write Engram compression cache next to %s (%s); it will be recomputed next time", path, e)
        return
    try:
        with os.fdopen(fd, "wb") as f:
            np.savez(f, lookup=lookup, compressed_vocab_size=np.int64(size),
                     sha256=np.str_(digest), version=np.int64(CACHE_VERSION))
        os.chmod(tmp, 0o644)    # mkstemp makes it private; other users of a shared tokenizer read it too
        os.replace(tmp, path)   # atomic: concurrent ranks see the old file or the whole new one
    except OSError as e:        # e.g. a full disk: the result is still valid, only the cache is lost
        log.warning("could not write Engram compression cache %s (%s)", path, e)
        try:
            os.unlink(tmp)
        except OSError:
            pass


def load_or_build_compression(tokenizer_path: str) -> Tuple[np.ndarray, int]:
    """``build_compression`` of the tokenizer.json at ``tokenizer_path``, cached next to it.

    A 128k vocabulary takes seconds to compress; the cache makes later starts
    instant.  It is reused only when it was computed from the same file bytes.
    """
    from tokenizers import Tokenizer

    if not os.path.isfile(tokenizer_path):
        raise FileNotFoundError(f"tokenizer_path={tokenizer_path!r}: no such file; pass the path of a tokenizer.json")
    with open(tokenizer_path, "rb") as f:
        raw = f.read()
    digest = hashlib.sha256(raw).hexdigest()
    cache = cache_path_for(tokenizer_path)
    if os.path.exists(cache):
        hit = _read_cache(cache, digest)
        if hit is not None:
            return hit
    # Build from the bytes that were hashed, so a concurrent rewrite cannot mislabel the cache.
    lookup, size = build_compression(Tokenizer.from_str(raw.decode("utf-8")))
    _write_cache(cache, digest, lookup, size)
    return lookup, size
