"""Data: corpus -> tokenizer -> megatron-core indexed dataset; micro-batches carry Engram hash ids.

``prepare_data(data_cfg)`` makes ``data.dir`` (idempotent); ``build_train_loader`` /
``build_valid_batches`` read it.  See each module's docstring for the invariants.

Names load on first use: checking and preparing data (``prepare``, ``corpus``, ``tokenizer``)
does not import torch, so ``engram-train`` and ``tools/prepare_data.py`` report a bad input
before paying for it.
"""

import importlib

_WHERE = {
    "Corpus": "corpus", "load_corpus": "corpus", "split_documents": "corpus",
    "SampleOrder": "loader", "TrainBatches": "loader", "build_engram_hasher": "loader",
    "build_train_loader": "loader", "build_valid_batches": "loader", "check_vocab": "loader",
    "micro_batch_indices": "loader",
    "PreparedData": "prepare", "fingerprint": "prepare", "prepare_data": "prepare",
    "EOS_TOKEN": "tokenizer", "PAD_TOKEN": "tokenizer", "Tokenizer": "tokenizer",
}

__all__ = list(_WHERE)


def __getattr__(name):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_WHERE[name]}"), name)
