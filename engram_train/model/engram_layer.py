"""The transformer layer that carries an Engram block, and the per-step context feeding it.

Where Engram sits (docs/engram.md §1.7): at an Engram layer the block's output is
added to the residual stream *before* that layer's attention, i.e. before its
input layernorm::

    hidden = hidden + engram(hidden, hash_ids)
    hidden = <the stock megatron TransformerLayer>(hidden)

Layer numbering: configs (``engram.layer_ids``) are 0-based like the
reference demo; megatron's ``layer_number`` is 1-based.  This module is the
one place that converts: ``layer_number == layer_id + 1``.

Hash ids.  megatron's ``TransformerBlock`` calls every layer with the same
fixed keyword arguments, so the ids cannot travel through the call.  Instead
each model owns one :class:`EngramContext`; the model wrapper opens
``context.step(hash_ids)`` around its forward and every Engram layer reads
its own ids there.  The ids are the *full* sequence ``[B, T, (N-1)*K]`` on
every tensor-parallel rank (hashes depend only on tokens, which every TP rank
has).  The context is empty outside a forward; backward does not need it.

Layout.  megatron is sequence-first ``[S, B, H]``; the block wants
``[B, T, G=1, H]``.  Under sequence parallelism a layer holds only
``[S/tp, B, H]``: the layer gathers the full sequence (the causal conv needs
earlier positions, which may live on another rank), runs the block on it and
keeps its own chunk.  The block is replicated on the TP ranks and computes
the same values on each, so the gather's backward must be a *split* (each
rank already holds the full gradient), not a reduce-scatter:
``gather_from_sequence_parallel_region(x, tensor_parallel_output_grad=False)``.
Engram parameter gradients are therefore complete and equal on every TP rank.
"""

from __future__ import annotations

import contextlib
from typing import Dict, Iterator, Optional

import torch
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_layer import TransformerLayer


def layer_number_of(layer_id: int) -> int:
    """megatron's 1-based ``layer_number`` of the 0-based config layer id."""
    return layer_id + 1


def layer_id_of(layer_number: int) -> int:
    """The 0-based config layer id of megatron's 1-based ``layer_number``."""
    return layer_number - 1


class EngramContext:
    """Per-step inputs of a model's Engram layers: ``{layer_id: hash_ids [B, T, (N-1)*K]}``."""

    def __init__(self):
        self._hash_ids: Optional[Dict[int, torch.Tensor]] = None

    @contextlib.contextmanager
    def step(self, hash_ids: Optional[Dict[int, torch.Tensor]]) -> Iterator[None]:
        """Make ``hash_ids`` visible to the Engram layers for the duration of one forward."""
        self._hash_ids = hash_ids
        try:
            yield
        finally:
            self._hash_ids = None

    def hash_ids(self, layer_id: int) -> torch.Tensor:
        if self._hash_ids is None:
            raise RuntimeError(
                f"Engram layer {layer_id} ran without hash ids: call the model with "
                "engram_hash_ids={layer_id: LongTensor[B, T, (max_ngram-1)*heads_per_ngram]}")
        if layer_id not in self._hash_ids:
            raise KeyError(f"engram_hash_ids has no entry for Engram layer {layer_id} "
                           f"(got layers {sorted(self._hash_ids)})")
        return self._hash_ids[layer_id]


class EngramTransformerLayer(TransformerLayer):
    """megatron ``TransformerLayer`` with ``hidden += engram(hidden, hash_ids)`` in front.

    Built from a spec like any layer; the extra keyword arguments come from
    ``ModuleSpec.params`` (see :func:`engram_train.model.spec.engram_layer_spec`).
    ``engram_table_provider(layer_id, table_sizes, embed_dim) -> table module``
    supplies the block's table (the table store's); without one the block
    builds its own ``MultiHeadEmbeddingTable``.
    """

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None, *, engram_layer_id: int,
                 engram_block_kwargs: dict, engram_context: EngramContext, engram_table_provider=None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)
        if self.layer_number != layer_number_of(engram_layer_id):
            raise RuntimeError(f"Engram layer id {engram_layer_id} was built as megatron layer_number "
                               f"{self.layer_number} (expected {layer_number_of(engram_layer_id)})")
        from engram_train.engram.block import EngramBlock

        self.engram_layer_id = engram_layer_id
        kwargs = dict(engram_block_kwargs)
        if engram_table_provider is not None:
            # The table comes from outside (memory/: partitioned, or elsewhere); the block never
            # allocates one of its own, so no rank holds a whole partitioned table, even briefly.
            kwargs["table"] = engram_table_provider(
                engram_layer_id, kwargs["table_sizes"], kwargs["n_embed_per_ngram"] // kwargs["heads_per_ngram"])
        # .to(dtype) casts floating-point parameters and buffers only: a store table has neither.
        self.engram = EngramBlock(**kwargs).to(dtype=config.params_dtype)
        self.engram_context = engram_context

    def engram_residual(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``engram(hidden)`` for this rank's ``[S_local, B, H]`` slice of the residual stream."""
        sp = self.config.sequence_parallel and self.tp_group.size() > 1
        full = (gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False,
                                                     group=self.tp_group)
                if sp else hidden_states)
        hash_ids = self.engram_context.hash_ids(self.engram_layer_id)
        s, b = full.shape[0], full.shape[1]
        if tuple(hash_ids.shape[:2]) != (b, s):
            raise ValueError(f"hash ids of Engram layer {self.engram_layer_id} have shape "
                             f"{tuple(hash_ids.shape)}, expected [B={b}, T={s}, ...]")
        out = self.engram(full.transpose(0, 1).unsqueeze(2), hash_ids)   # [B, T, 1, H]
        out = out.squeeze(2).transpose(0, 1).contiguous()                 # [S, B, H]
        return scatter_to_sequence_parallel_region(out, group=self.tp_group) if sp else out

    def forward(self, *args, **kwargs):
        if "hidden_states" in kwargs:
            kwargs["hidden_states"] = kwargs["hidden_states"] + self.engram_residual(kwargs["hidden_states"])
        else:
            args = (args[0] + self.engram_residual(args[0]),) + tuple(args[1:])
        return super().forward(*args, **kwargs)
