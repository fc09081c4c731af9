"""Streaming, parallel preparation of text corpora of any size (``tools/prepare_data.py --workers N``).

``prepare_stream`` reads ``.txt``, ``.jsonl`` and ``.jsonl.gz`` files as a stream of documents,
tokenizes them in ``workers`` processes and writes megatron-core indexed datasets::

    <dir>/tokenizer.json            the given tokenizer, or a BPE trained on a bounded sample
    <dir>/train.bin/.idx, valid.bin/.idx   merged by megatron-core's IndexedDatasetBuilder.add_index
    <dir>/shards/{train,valid}-NNNNN.bin/.idx   instead, with --no-merge (a blend of shards)
    <dir>/meta.json                 written last: its presence means complete

Train with ``data.corpus=megatron data.tokenizer=<dir>/tokenizer.json
data.prefixes={train:[<dir>/train],valid:[<dir>/valid]}``.

Invariants:

* Memory is bounded independently of the corpus: at most ``2 x workers`` batches of documents
  (``BATCH_BYTES`` each) are in flight, a shard's builder holds the lengths of one shard's
  documents, and BPE training reads at most ``bpe_sample_bytes`` of text.  Merging into one file
  (the default) keeps megatron-core's per-document lengths of the whole split in lists (tens of
  bytes per document); ``--no-merge`` avoids even that.
* The split is per document, by a hash of ``split_seed`` and the document's text: no global list,
  and duplicated documents land in the same split.
* Work goes to ``<dir>/.partial/``; each finished shard is recorded in ``state.json``, so an
  interrupted run re-run with the same inputs and options resumes after its last finished shard
  (the documents before it are read again, not tokenized).  ``meta.json`` is removed first and
  written last, so a directory is never both incomplete and looking complete.  A ``.partial``
  left by other inputs or options is refused (``--restart`` discards it).
* Output does not depend on the number of workers: batches are written in stream order.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections import deque
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np

from engram_train.errors import DataError, UserError
from engram_train.platform.memory import peak_rss_bytes

from .corpus import _decode_user_text, _read_jsonl, expand_files, file_kind, files_identity, open_binary
from .tokenizer import Tokenizer, tokenizer_json_path, train_bpe

log = logging.getLogger(__name__)

STREAM_FORMAT_VERSION = 1
BATCH_BYTES = 1 << 20
BATCH_DOCS = 512


# ----------------------------------------------------------------------------- documents


def _text_documents(path: Path, doc_chars: int) -> Iterator[str]:
    """A .txt file cut at blank lines into documents of at least ``doc_chars`` characters, line by line."""
    chunk: List[str] = []
    paragraph: List[str] = []
    size = 0

    def flush_paragraph():
        nonlocal size
        if paragraph:
            text = "\n".join(paragraph)
            chunk.append(text)
            size += len(text) + 2
            paragraph.clear()

    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, 1):
            line = _decode_user_text(raw, f"{path}:{lineno}").rstrip("\r\n")
            if line.strip():
                paragraph.append(line)
                continue
            flush_paragraph()
            if doc_chars > 0 and size >= doc_chars:
                yield "\n\n".join(chunk)
                chunk.clear()
                size = 0
    flush_paragraph()
    if chunk:
        yield "\n\n".join(chunk)


def iter_documents(paths: Sequence[Path], text_key: str, doc_chars: int) -> Iterator[str]:
    for p in paths:
        if file_kind(p) == "jsonl":
            if p.name.endswith(".gz"):
                open_binary(p).close()   # not gzip: one line naming the file, before anything is read
            yield from _read_jsonl(p, text_key)
        else:
            yield from _text_documents(p, doc_chars)


def is_valid(text: str, valid_fraction: float, split_seed: int) -> bool:
    """The document's split: a hash of the seed and its text, uniform in [0, 1), below the fraction."""
    h = hashlib.blake2b(text.encode("utf-8"), digest_size=8, key=str(split_seed).encode())
    return int.from_bytes(h.digest(), "little") / 2.0**64 < valid_fraction


def _batches(docs: Iterator[str]) -> Iterator[List[str]]:
    batch, size = [], 0
    for d in docs:
        batch.append(d)
        size += len(d)
        if size >= BATCH_BYTES or len(batch) >= BATCH_DOCS:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


# ----------------------------------------------------------------------------- workers

_WORKER = {}


def _worker_init(tokenizer_path: str, valid_fraction: float, split_seed: int, dtype: str) -> None:
    _WORKER.update(tok=Tokenizer(tokenizer_path), valid_fraction=valid_fraction, split_seed=split_seed,
                   dtype=np.dtype(dtype))


def _encode(texts: List[str]) -> Tuple[List[bool], List[np.ndarray], int, int]:
    w = _WORKER
    tok = w["tok"]
    out = []
    for ids in tok.encode_batch(texts):
        ids.append(tok.eos_id)
        out.append(np.asarray(ids, dtype=w["dtype"]))
    flags = [is_valid(t, w["valid_fraction"], w["split_seed"]) for t in texts]
    return flags, out, sum(len(t.encode()) for t in texts), peak_rss_bytes()


# ----------------------------------------------------------------------------- the preparation


class Progress:
    def __init__(self, total_bytes: int, enabled: bool):
        self.total, self.enabled = total_bytes, enabled
        self.t0 = self.last = time.time()
        self.docs = self.tokens = self.bytes = 0

    def add(self, docs: int, tokens: int, nbytes: int, force: bool = False) -> None:
        self.docs += docs
        self.tokens += tokens
        self.bytes += nbytes
        now = time.time()
        if self.enabled and (force or now - self.last >= 10):
            self.last = now
            rate = self.bytes / max(now - self.t0, 1e-9)
            eta = (self.total - self.bytes) / rate if rate > 0 and self.total > self.bytes else 0
            log.info("prepare: %d documents, %d tokens, %.0f MB of %.0f MB, %.1f MB/s, ETA %ds", self.docs,
                     self.tokens, self.bytes / 1e6, self.total / 1e6, rate / 1e6, eta)


def _settings(paths, text_key, doc_chars, tokenizer, vocab_size, valid_fraction, split_seed, shard_bytes,
              bpe_sample_bytes) -> dict:
    tok = None
    if tokenizer:
        with open(tokenizer_json_path(tokenizer), "rb") as f:
            tok = hashlib.sha256(f.read()).hexdigest()
    return {"format_version": STREAM_FORMAT_VERSION, "inputs": files_identity(paths), "text_key": text_key,
            "doc_chars": doc_chars, "tokenizer": tok, "vocab_size": None if tok else vocab_size,
            "bpe_sample_bytes": None if tok else bpe_sample_bytes, "valid_fraction": valid_fraction,
            "split_seed": split_seed, "shard_bytes": shard_bytes}


def prepare_stream(files: Sequence[str], out_dir: str, *, tokenizer: Optional[str] = None, vocab_size: int = 4096,
                   valid_fraction: float = 0.02, split_seed: int = 1234, text_key: str = "text",
                   doc_chars: int = 3000, workers: int = 1, shard_bytes: int = 256 << 20,
                   bpe_sample_bytes: int = 512 << 20, merge: bool = True, restart: bool = False,
                   progress: bool = True) -> dict:
    """Prepare ``files`` into ``out_dir`` (module docstring); returns the meta.json written."""
    if workers < 1:
        raise UserError(f"--workers={workers}: give 1 or more tokenizer processes (e.g. the number of cores).")
    paths = expand_files(list(files))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    settings = _settings(paths, text_key, doc_chars, tokenizer, vocab_size, valid_fraction, split_seed,
                         shard_bytes, bpe_sample_bytes)
    fp = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    with open(out / ".prepare.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        meta = _read_json(out / "meta.json")
        if meta is not None and meta.get("fingerprint") == fp and not restart:
            log.info("prepare: %s is up to date (fingerprint %s)", out, fp)
            return meta
        return _run(paths, out, fp, settings, tokenizer, vocab_size, valid_fraction, split_seed, text_key,
                    doc_chars, workers, shard_bytes, bpe_sample_bytes, merge, restart, progress)


def _read_json(path: Path) -> Optional[dict]:
    try:
        with open(path) as f:
            return json.load(f)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def _write_json(path: Path, obj: dict) -> None:
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
    os.replace(tmp, path)


def _run(paths, out: Path, fp, settings, tokenizer, vocab_size, valid_fraction, split_seed, text_key, doc_chars,
         workers, shard_bytes, bpe_sample_bytes, merge, restart, progress) -> dict:
    from megatron.core.datasets.indexed_dataset import DType, IndexedDatasetBuilder

    t0 = time.time()
    (out / "meta.json").unlink(missing_ok=True)   # from here on the directory reads incomplete
    work = out / ".partial"
    state = _read_json(work / "state.json")
    if state is not None and state.get("fingerprint") != fp and not restart:
        raise UserError(f"{out} holds an interrupted preparation of other inputs or options ({work}).  Fix: re-run "
                        f"with the options it was started with to resume it, or add --restart to discard it.")
    if state is None or restart:
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir(parents=True)
        state = {"fingerprint": fp, "settings": settings, "shards": []}
        _write_json(work / "state.json", state)
    elif state["shards"]:
        log.info("prepare: resuming %s after %d finished shards (%d documents)", out, len(state["shards"]),
                 sum(s["documents"] for s in state["shards"]))

    tok_path = work / "tokenizer.json"
    if not tok_path.is_file():
        if tokenizer:
            shutil.copyfile(tokenizer_json_path(tokenizer), tok_path)
        else:
            _train_bpe_on_sample(paths, text_key, doc_chars, valid_fraction, split_seed, vocab_size,
                                 bpe_sample_bytes, tok_path)
    tok = Tokenizer(str(tok_path))
    dtype = DType.optimal_dtype(tok.vocab_size)   # a numpy type (megatron's builder wants the type)

    total_bytes = sum(p.stat().st_size for p in paths)
    prog = Progress(total_bytes, progress)
    done_docs = sum(s["documents"] for s in state["shards"])
    docs = iter_documents(paths, text_key, doc_chars)
    for _ in range(done_docs):   # finished shards: read again, not tokenized
        next(docs)
    prog.add(done_docs, sum(s["tokens"] for s in state["shards"]), sum(s["bytes"] for s in state["shards"]))

    ctx = multiprocessing.get_context("spawn")   # workers start clean: no forked tokenizer threads or locks
    os.environ["TOKENIZERS_PARALLELISM"] = "false"   # one thread per worker process; spawn inherits it
    init = (str(tok_path), valid_fraction, split_seed, np.dtype(dtype).name)
    # One worker tokenizes in this process: no process to start, same output.
    executor = _InProcess(init) if workers == 1 else ProcessPoolExecutor(workers, mp_context=ctx,
                                                                          initializer=_worker_init, initargs=init)
    with executor as pool:
        batches = _batches(docs)
        pending: deque = deque()
        shard = None
        exhausted = False
        peak_worker = 0
        while True:
            while not exhausted and len(pending) < 2 * workers:
                batch = next(batches, None)
                if batch is None:
                    exhausted = True
                else:
                    pending.append(pool.submit(_encode, batch))
            if not pending:
                break
            flags, arrays, nbytes, worker_rss = pending.popleft().result()
            peak_worker = max(peak_worker, worker_rss)
            if shard is None:
                shard = _Shard(work, len(state["shards"]), dtype)
            shard.add(flags, arrays, nbytes)
            prog.add(len(arrays), sum(a.size for a in arrays), nbytes)
            if shard.bytes >= shard_bytes:
                state["shards"].append(shard.finish())
                _write_json(work / "state.json", state)
                shard = None
        if shard is not None:
            state["shards"].append(shard.finish())
            _write_json(work / "state.json", state)
    prog.add(0, 0, 0, force=True)
    if not state["shards"]:
        raise DataError(f"no non-blank document in {', '.join(map(str, paths))}.  Fix: add text, or check "
                        f"--jsonl-text-key={text_key!r}.")

    splits = {s: {"documents": sum(x[s]["documents"] for x in state["shards"]),
                  "tokens": sum(x[s]["tokens"] for x in state["shards"]),
                  "max_token_id": max(x[s]["max_token_id"] for x in state["shards"])} for s in ("train", "valid")}
    for s in ("train", "valid"):
        if splits[s]["documents"] == 0:
            raise DataError(f"the {s} split of {out} got no document ({splits['train']['documents'] + splits['valid']['documents']} "
                            f"in all).  Fix: change --valid-fraction, or add documents.")
    shard_names = [x["name"] for x in state["shards"]]
    for stale in ("train.bin", "train.idx", "valid.bin", "valid.idx"):
        (out / stale).unlink(missing_ok=True)
    shutil.rmtree(out / "shards", ignore_errors=True)
    if merge:
        for s in ("train", "valid"):
            builder = IndexedDatasetBuilder(str(work / f"merged-{s}.bin"), dtype=dtype)
            for name in shard_names:
                if state["shards"][shard_names.index(name)][s]["documents"]:
                    builder.add_index(str(work / f"{s}-{name}"))
            builder.finalize(str(work / f"merged-{s}.idx"))
            for ext in ("bin", "idx"):
                os.replace(work / f"merged-{s}.{ext}", out / f"{s}.{ext}")
        prefixes = {s: [str(out / s)] for s in ("train", "valid")}
    else:
        (out / "shards").mkdir()
        prefixes = {"train": [], "valid": []}
        for x in state["shards"]:
            for s in ("train", "valid"):
                if x[s]["documents"]:
                    for ext in ("bin", "idx"):
                        os.replace(work / f"{s}-{x['name']}.{ext}", out / "shards" / f"{s}-{x['name']}.{ext}")
                    prefixes[s].append(str(out / "shards" / f"{s}-{x['name']}"))
    os.replace(tok_path, out / "tokenizer.json")
    meta = {"format": "engram_train stream", "format_version": STREAM_FORMAT_VERSION, "fingerprint": fp,
            "settings": settings, "vocab_size": tok.vocab_size, "eos_id": tok.eos_id, "dtype": np.dtype(dtype).name,
            "splits": splits, "shards": len(shard_names), "prefixes": prefixes,
            "seconds": round(time.time() - t0, 1),
            "peak_rss_mb": {"main": round(peak_rss_bytes() / 2**20, 1), "worker": round(peak_worker / 2**20, 1)},
            "mb_per_s": round(prog.bytes / 1e6 / max(time.time() - t0, 1e-9), 2),
            "train_with": ["data.corpus=megatron", f"data.tokenizer={out / 'tokenizer.json'}",
                           "data.prefixes={train:[" + ",".join(prefixes["train"]) + "],valid:["
                           + ",".join(prefixes["valid"]) + "]}"]}
    bpe = _read_json(work / "bpe_sample.json")
    if bpe is not None:
        meta["bpe_sample"] = bpe
    shutil.rmtree(work, ignore_errors=True)
    _write_json(out / "meta.json", meta)
    return meta


class _InProcess:
    """``ProcessPoolExecutor``'s ``submit`` for one worker, run at once in this process."""

    def __init__(self, init):
        _worker_init(*init)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def submit(self, fn, *args):
        from concurrent.futures import Future

        f = Future()
        f.set_result(fn(*args))
        return f


class _Shard:
    def __init__(self, work: Path, index: int, dtype):
        from megatron.core.datasets.indexed_dataset import IndexedDatasetBuilder

        self.name = f"{index:05d}"
        self.work = work
        for stale in work.glob(f"*-{self.name}.*"):   # a shard an interrupted run left half written
            stale.unlink()
        self.builders = {s: IndexedDatasetBuilder(str(work / f"{s}-{self.name}.bin"), dtype=dtype)
                         for s in ("train", "valid")}
        self.stats = {s: {"documents": 0, "tokens": 0, "max_token_id": -1} for s in ("train", "valid")}
        self.bytes = 0

    def add(self, flags, arrays, nbytes) -> None:
        for valid, ids in zip(flags, arrays):
            s = "valid" if valid else "train"
            self.builders[s].add_document(ids, [ids.size])
            st = self.stats[s]
            st["documents"] += 1
            st["tokens"] += int(ids.size)
            st["max_token_id"] = max(st["max_token_id"], int(ids.max()))
        self.bytes += nbytes

    def finish(self) -> dict:
        for s, b in self.builders.items():
            b.finalize(str(self.work / f"{s}-{self.name}.idx"))
        return {"name": self.name, "bytes": self.bytes,
                "documents": sum(v["documents"] for v in self.stats.values()),
                "tokens": sum(v["tokens"] for v in self.stats.values()), **self.stats}


def _train_bpe_on_sample(paths, text_key, doc_chars, valid_fraction, split_seed, vocab_size, limit, tok_path):
    """A byte-level BPE on the first ``limit`` bytes of training documents; says how much it read."""
    seen = {"documents": 0, "bytes": 0}

    def sample():
        for d in iter_documents(paths, text_key, doc_chars):
            if seen["bytes"] >= limit:
                return
            if not is_valid(d, valid_fraction, split_seed):
                seen["documents"] += 1
                seen["bytes"] += len(d.encode())
                yield d

    t = time.time()
    tok = train_bpe(sample(), vocab_size)
    tmp = tok_path.with_suffix(".tmp")
    tok.save(str(tmp))
    os.replace(tmp, tok_path)
    total = sum(p.stat().st_size for p in paths)
    seen.update(limit_bytes=limit, corpus_bytes=total, seconds=round(time.time() - t, 1))
    _write_json(tok_path.parent / "bpe_sample.json", seen)
    log.info("prepare: trained a byte-level BPE of %d tokens on a sample of %d training documents (%.1f MB; "
             "--bpe-sample-mb caps it at %.0f MB; the corpus files hold %.1f MB) in %.1fs", vocab_size,
             seen["documents"], seen["bytes"] / 1e6, limit / 1e6, total / 1e6, seen["seconds"])
