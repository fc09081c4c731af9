"""Data: corpus -> tokenizer -> megatron-core indexed dataset; micro-batches carry Engram hash ids.

``prepare_data(data_cfg)`` makes ``data.dir`` (idempotent); ``build_train_loader`` /
``build_valid_batches`` read it.  See each module's docstring for the invariants.
"""

from .corpus import Corpus, load_corpus, split_documents
from .loader import (
    SampleOrder,
    TrainBatches,
    build_engram_hasher,
    build_train_loader,
    build_valid_batches,
    check_vocab,
    micro_batch_indices,
)
from .prepare import PreparedData, fingerprint, prepare_data
from .tokenizer import EOS_TOKEN, PAD_TOKEN, Tokenizer

__all__ = [
    "Corpus", "load_corpus", "split_documents",
    "SampleOrder", "TrainBatches", "build_engram_hasher", "build_train_loader", "build_valid_batches",
    "check_vocab", "micro_batch_indices",
    "PreparedData", "fingerprint", "prepare_data",
    "EOS_TOKEN", "PAD_TOKEN", "Tokenizer",
]
