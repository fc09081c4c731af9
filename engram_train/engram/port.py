"""Weights of DeepSeek's Engram demo <-> our ``EngramBlock`` (docs/engram.md, "Porting the demo's weights").

The demo keeps each ``Engram`` module in a ``TransformerBlock`` as ``.engram``: its
``state_dict()`` keys read ``engram.<name>`` (``layers.<l>.engram.<name>`` from the whole
model), ``<name>`` being the reference parameter names that ``EngramBlock.reference_state_dict``
uses, plus the ``multi_head_embedding.offsets`` buffer.

- ``load_demo_state_dict(block, sd, layer_id=..., layer_ids=...)`` strips the prefix and loads
  strictly.  Weights of another ``hc_mult`` are refused in one line naming ``model.hc_mult``;
  weights whose tables have other sizes in one line naming ``engram.table_size_per_ngram`` and,
  where it can be worked out, the value that reproduces them (the demo sizes its tables from the
  raw vocabulary, 5 x 129280; ours default to 5 x the compressed one).
- ``demo_state_dict(block)`` is the inverse: ``engram.``-prefixed keys, offsets included, which a
  demo ``TransformerBlock.load_state_dict(strict=True)`` takes.
"""

from __future__ import annotations

import re
from typing import Dict, List, Mapping, Optional, Sequence

import torch

from engram_train.config.schema import ConfigError
from engram_train.engram.block import (EngramBlock, REFERENCE_TABLE_KEY, hc_mult_mismatch, reference_hc_mult,
                                       reference_table_sizes)
from engram_train.engram.hashing import is_prime, prime_table_sizes

DEMO_PREFIX = "engram."


def strip_demo_prefix(state_dict: Mapping[str, torch.Tensor], layer_id: Optional[int] = None) -> Dict[str, torch.Tensor]:
    """The Engram module's own keys of a demo ``TransformerBlock`` (``engram.``) or model (``layers.<l>.engram.``)
    state dict; a bare ``Engram`` state dict is returned as it is."""
    keys = list(state_dict)
    if any(k.startswith(DEMO_PREFIX) for k in keys):
        return {k[len(DEMO_PREFIX):]: v for k, v in state_dict.items() if k.startswith(DEMO_PREFIX)}
    layers = sorted({int(m.group(1)) for k in keys if (m := re.match(r"layers\.(\d+)\.engram\.", k))})
    if layers:
        if layer_id is None or int(layer_id) not in layers:
            raise ConfigError(f"layer_id={layer_id!r}: the state dict holds the Engram modules of layers {layers}; "
                              f"name one of them")
        prefix = f"layers.{int(layer_id)}.{DEMO_PREFIX}"
        return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}
    return dict(state_dict)


def _primes_back(prime: int, steps: int) -> int:
    """The prime ``steps`` primes below ``prime`` (``prime`` itself for 0)."""
    p = prime
    while steps > 0 and p > 2:
        p -= 1
        if is_prime(p):
            steps -= 1
    return p


def suggest_table_size_per_ngram(sizes: Sequence[int], layer_id: int, layer_ids: Sequence[int], max_ngram: int,
                                 heads_per_ngram: int) -> Optional[List[int]]:
    """A ``table_size_per_ngram`` under which ``prime_table_sizes`` gives ``layer_id`` exactly ``sizes``, or None.

    Tried: one size for every order, walked back over the primes the earlier layers took (the
    demo's equal sizes); the smallest prime of each order (the weights' layer searched first).
    """
    sizes = [int(s) for s in sizes]
    layer_ids = [int(i) for i in layer_ids]
    if int(layer_id) not in layer_ids or len(sizes) != (max_ngram - 1) * heads_per_ngram:
        return None
    K = heads_per_ngram
    per_order = [min(sizes[i * K:(i + 1) * K]) for i in range(max_ngram - 1)]
    earlier = layer_ids.index(int(layer_id)) * len(sizes)
    candidates = [[_primes_back(min(sizes), earlier)] * (max_ngram - 1), per_order]
    for cand in candidates:
        if prime_table_sizes(layer_ids, max_ngram, K, cand)[int(layer_id)] == sizes:
            return cand
    return None


def load_demo_state_dict(block: EngramBlock, state_dict: Mapping[str, torch.Tensor], *, layer_id: Optional[int] = None,
                         layer_ids: Optional[Sequence[int]] = None) -> None:
    """Load a demo ``TransformerBlock``/model/``Engram`` state dict into ``block`` (strictly).

    ``layer_id`` (the block's Engram layer) and ``layer_ids`` (``engram.layer_ids``) pick the
    layer out of a whole model's state dict and let a table-size mismatch name the value to set.
    """
    sd = strip_demo_prefix(state_dict, layer_id)
    branches = reference_hc_mult(sd)
    if branches and branches != block.hc_mult:
        raise ConfigError(hc_mult_mismatch(block.hc_mult, branches))
    sizes = reference_table_sizes(sd)
    if sizes is None and REFERENCE_TABLE_KEY in sd and int(sd[REFERENCE_TABLE_KEY].shape[0]) != sum(block.table_sizes):
        sizes = []   # no offsets to tell the heads apart, but the row count already differs
    if sizes is not None and sizes != block.table_sizes:
        hint = None
        if sizes and layer_id is not None and layer_ids is not None:
            hint = suggest_table_size_per_ngram(sizes, layer_id, layer_ids, block.max_ngram, block.heads_per_ngram)
        what = f"heads of sizes {sizes}" if sizes else f"{int(sd[REFERENCE_TABLE_KEY].shape[0])} table rows"
        fix = (f"set engram.table_size_per_ngram={hint}" if hint is not None else
               "set engram.table_size_per_ngram to the sizes the weights were made with (the demo: 5 x its raw "
               "vocabulary, [646400, 646400] for DeepSeek-V3's 129280 ids), with the same engram.layer_ids")
        raise ConfigError(f"engram.table_size_per_ngram: the weights of layer {layer_id} have {what}, this block "
                          f"{block.table_sizes} (sum {sum(block.table_sizes)}); {fix}")
    block.load_reference_state_dict(sd)


def demo_state_dict(block: EngramBlock, prefix: str = DEMO_PREFIX) -> Dict[str, torch.Tensor]:
    """``block``'s weights as a demo ``TransformerBlock`` state dict (``prefix`` ``""``: a bare ``Engram``)."""
    return {prefix + k: v for k, v in block.reference_state_dict().items()}
