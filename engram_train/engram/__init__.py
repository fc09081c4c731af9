"""Engram conditional memory (Cheng et al., arXiv 2601.07372; docs/engram.md).

Device-agnostic pieces, used by ``data/`` (hashing in the loader) and ``model/``
(the block inside a layer):

- ``compress``: tokenizer compression to canonical ids, cached next to the tokenizer.
- ``hashing``: ``NgramHasher``, n-gram hash ids of every Engram layer at once.
- ``table``: ``MultiHeadEmbeddingTable``, one table of all heads of a layer.
- ``block``: ``EngramBlock``, gated fusion and short causal conv.
- ``params``: optimizer groups (tables at 5x learning rate, no weight decay).
- ``port``: the demo's ``TransformerBlock`` weights <-> ``EngramBlock``.

Engram layer ids are 0-based, like the reference demo's ``layer_ids=[1, 15]``:
id ``l`` is the ``(l+1)``-th transformer layer, and it also seeds that layer's
hash multipliers.
"""

from engram_train.engram.block import EngramBlock
from engram_train.engram.compress import build_compression, load_or_build_compression
from engram_train.engram.hashing import NgramHasher, hasher_from_config
from engram_train.engram.params import engram_param_groups
from engram_train.engram.port import demo_state_dict, load_demo_state_dict
from engram_train.engram.table import HashIdOutOfRangeError, MultiHeadEmbeddingTable

__all__ = [
    "EngramBlock",
    "HashIdOutOfRangeError",
    "MultiHeadEmbeddingTable",
    "NgramHasher",
    "build_compression",
    "demo_state_dict",
    "engram_param_groups",
    "hasher_from_config",
    "load_demo_state_dict",
    "load_or_build_compression",
]
