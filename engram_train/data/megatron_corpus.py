"""``data.corpus=megatron``: existing Megatron ``.bin``/``.idx`` prefixes, blended with weights.

``data.prefixes`` takes Megatron's ``--data-path`` syntax as a list, ``[0.7, /data/web_text_document,
0.3, /data/code_text_document]`` (weights normalized; a list of prefixes alone blends by size), or
one such list per split, ``{train: [...], valid: [...]}`` (Megatron's ``--train-data-path`` /
``--valid-data-path``).  With one list, megatron-core cuts each prefix's documents into train and
valid ranges by ``data.valid_fraction`` (its ``split`` string).  Samples are drawn by megatron-core's
``BlendedMegatronDatasetBuilder`` (``loader.BlendOrder``); nothing here blends.

Start-up checks (``check_prefixes``, rank 0, before any model is built), one line naming the file:
both files of every prefix exist; all prefixes share one token dtype; no token id reaches the
tokenizer's vocabulary -- every id of a prefix up to ``FULL_SCAN_TOKENS`` tokens, otherwise
``SAMPLED_DOCUMENTS`` documents spread over it and the largest id its dtype can hold; the
tokenizer has an EOS token (documents that do not end in it are reported, not refused: Megatron's
``preprocess_data.py`` appends it only with ``--append-eod``).

Identity (``blend_identity``): the resolved prefixes, weights, the split, and the size and mtime
of every file -- part of the data fingerprint that checkpoints carry, so a resumed run on another
blend is refused.
"""

from __future__ import annotations

import json
import logging
import numbers
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

import numpy as np

from engram_train.errors import DataError, MissingInputError

log = logging.getLogger(__name__)

Blend = Tuple[List[str], Optional[List[float]]]   # megatron-core's (prefixes, weights or None)
SPLIT_KEYS = ("train", "valid")
FULL_SCAN_TOKENS = 64 * 2**20
SAMPLED_DOCUMENTS = 256


def _is_weight(x) -> bool:
    return isinstance(x, numbers.Real) and not isinstance(x, bool)


def parse_blend(value, key: str = "data.prefixes") -> Blend:
    """Megatron's ``[w1, p1, w2, p2, ...]`` or ``[p1, p2, ...]`` as ``(prefixes, weights)``."""
    from engram_train.config.schema import ConfigError

    items = list(value) if isinstance(value, (list, tuple)) or hasattr(value, "__iter__") and not isinstance(
        value, (str, dict)) else None
    if not items:
        raise ConfigError(f"{key}={value!r}: give a list of prefixes with weights, e.g. "
                          f"[0.7, /data/web_text_document, 0.3, /data/code_text_document]")
    if all(isinstance(x, str) for x in items):
        return [str(x) for x in items], None
    if len(items) % 2:
        raise ConfigError(f"{key}={items!r}: a weighted list has an even length (weight, prefix, weight, "
                          f"prefix, ...); it has {len(items)} entries.  Fix: give every prefix one weight.")
    weights, prefixes = items[0::2], items[1::2]
    for w, p in zip(weights, prefixes):
        if not _is_weight(w) or not isinstance(p, str):
            raise ConfigError(f"{key}={items!r}: expected weight, prefix pairs, got {w!r}, {p!r}.  Fix: "
                              f"[0.7, /data/web_text_document, 0.3, /data/code_text_document].")
        if not w > 0:
            raise ConfigError(f"{key}={items!r}: weight {w!r} of {p} must be > 0.  Fix: give positive weights "
                              f"(they are normalized), or drop the prefix.")
    return [str(p) for p in prefixes], [float(w) for w in weights]


def blends(data_cfg) -> Dict[str, Blend]:
    """``{"all": blend}`` for one list, ``{"train": ..., "valid": ...}`` for per-split lists."""
    from engram_train.config.schema import ConfigError

    value = data_cfg.prefixes
    if value is None:
        raise ConfigError("data.prefixes=None: data.corpus=megatron reads Megatron .bin/.idx prefixes.  Fix: "
                          "data.prefixes='[0.7,/data/web_text_document,0.3,/data/code_text_document]'.")
    if hasattr(value, "keys"):
        unknown = sorted(set(value.keys()) - set(SPLIT_KEYS))
        if unknown or set(value.keys()) != set(SPLIT_KEYS):
            raise ConfigError(f"data.prefixes has keys {sorted(value.keys())}: a per-split blend needs exactly "
                              f"{list(SPLIT_KEYS)}.  Fix: data.prefixes={{train: [...], valid: [...]}}, or one list.")
        return {s: parse_blend(value[s], f"data.prefixes.{s}") for s in SPLIT_KEYS}
    return {"all": parse_blend(value)}


def all_prefixes(data_cfg) -> List[str]:
    out: List[str] = []
    for prefixes, _ in blends(data_cfg).values():
        out.extend(p for p in prefixes if p not in out)
    return out


def _files(prefix: str) -> Tuple[Path, Path]:
    return Path(prefix + ".bin"), Path(prefix + ".idx")


def check_files_exist(data_cfg) -> None:
    for prefix in all_prefixes(data_cfg):
        for path in _files(prefix):
            if not path.is_file():
                other = ".idx" if path.suffix == ".bin" else ".bin"
                raise MissingInputError(
                    f"data.prefixes: {path} does not exist (prefix {prefix}; a Megatron prefix names a "
                    f"{path.suffix} and a {other} file).  Fix: give the path without the suffix, as Megatron's "
                    f"preprocess_data.py wrote it (e.g. /data/web_text_document).")


def blend_identity(data_cfg) -> str:
    """The blend and the size/mtime of every file (cheap; changes when a file changes)."""
    check_files_exist(data_cfg)
    files = {}
    for prefix in all_prefixes(data_cfg):
        for path in _files(prefix):
            st = path.stat()
            files[str(path.resolve())] = [st.st_size, st.st_mtime_ns]
    b = {k: [[str(Path(p).resolve()) for p in v[0]], v[1]] for k, v in blends(data_cfg).items()}
    split = megatron_split(data_cfg.valid_fraction) if "all" in b else None
    return json.dumps({"blends": b, "split": split, "files": files}, sort_keys=True)


def megatron_split(valid_fraction: float) -> str:
    """megatron-core's ``split`` string (train, valid, test weights) for one list of prefixes."""
    return f"{1.0 - valid_fraction:.6g},{valid_fraction:.6g},0"


def _scan(prefix: str, eos_id: int) -> dict:
    """Token dtype, counts, the largest token id seen, and how many checked documents end in EOS."""
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    bin_path, idx_path = _files(prefix)
    try:
        ds = IndexedDataset(prefix, mmap=True)
    except Exception as e:   # megatron asserts on a bad header / a .bin of the wrong size
        raise DataError(f"{idx_path}: not a readable Megatron index ({type(e).__name__}: {e}).  Fix: regenerate "
                        f"{prefix}.bin/.idx with Megatron's preprocess_data.py or tools/prepare_data.py.") from None
    dtype = np.dtype(ds.index.dtype)
    lengths = ds.sequence_lengths
    num_tokens = int(lengths.sum(dtype=np.int64))
    n = len(ds)
    if num_tokens <= FULL_SCAN_TOKENS:
        checked = range(n)
        tokens = np.memmap(bin_path, dtype=dtype, mode="r")
        max_id = int(tokens.max()) if tokens.size else -1
        how = "every token"
    else:
        checked = np.unique(np.linspace(0, n - 1, SAMPLED_DOCUMENTS).astype(np.int64))
        max_id = max((int(np.max(ds[int(i)])) for i in checked if lengths[int(i)] > 0), default=-1)
        how = f"{len(checked)} sampled documents"
    ends_eos = sum(1 for i in checked if lengths[int(i)] > 0 and int(ds[int(i)][-1]) == eos_id)
    return {"dtype": dtype.name, "documents": n, "tokens": num_tokens, "max_token_id": max_id,
            "checked": how, "checked_documents": len(checked), "ends_in_eos": ends_eos}


def check_prefixes(data_cfg, vocab_size: int, eos_id: int, tokenizer_path: str) -> Dict[str, dict]:
    """Check every prefix against the tokenizer (module docstring); returns each prefix's scan."""
    check_files_exist(data_cfg)
    scans = {p: _scan(p, eos_id) for p in all_prefixes(data_cfg)}
    dtypes = {s["dtype"] for s in scans.values()}
    if len(dtypes) > 1:
        first = next(iter(scans))
        odd = next(p for p, s in scans.items() if s["dtype"] != scans[first]["dtype"])
        raise DataError(f"data.prefixes: {odd}.idx stores tokens as {scans[odd]['dtype']} but {first}.idx as "
                        f"{scans[first]['dtype']}; prefixes of one blend come from one tokenizer.  Fix: re-run the "
                        f"preprocessing of {odd} with the tokenizer of the others.")
    for prefix, s in scans.items():
        if s["max_token_id"] >= vocab_size:
            raise DataError(f"{prefix}.bin holds token id {s['max_token_id']} ({s['checked']}) but the tokenizer "
                            f"{tokenizer_path} has {vocab_size} ids.  Fix: set data.tokenizer to the tokenizer "
                            f"the prefix was preprocessed with.")
        if s["ends_in_eos"] == 0 and s["checked_documents"]:
            log.warning("data: no checked document of %s ends in EOS id %d: documents will run into each other "
                        "(Megatron's preprocess_data.py appends EOS with --append-eod)", prefix, eos_id)
    return scans
