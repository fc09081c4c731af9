"""The backbone's transformer layer: megatron's, plus the Engram slot, mHC streams and full recompute.

One class, :class:`BackboneLayer`, built by :mod:`engram_train.model.spec` wherever
the stock megatron ``TransformerLayer`` is not enough:

* **Engram** (docs/engram.md §1.7): at an Engram layer the block's output is added
  to the residual stream *before* the layer's attention (the block is an ``EngramBlock``, or a
  ``LngramBlock`` under ``engram.keys=latent``, docs/lngram.md, whose per-layer input is the
  documents' numbering instead of hash ids)::

      hidden = hidden + engram(hidden, hash_ids)
      hidden = <attention and MLP sublayers>(hidden)

  With ``n = hc_mult`` streams the residual is ``[S, B, n*H]`` and the block's
  ``[B, T, n, H]`` output is added stream by stream, branch ``g``'s gate computed
  from stream ``g`` (the reference demo's ``hidden_states[:, :, g, :]``).
* **mHC** (``hc_mult > 1``, :mod:`engram_train.model.hyper_connection`): each of the
  two sublayers is wrapped in its own :class:`HyperConnection`; megatron's own
  attention, MLP / MoE and norms compute ``F``.  The first layer copies the
  embedding into the streams; the decoder's final norm collapses them
  (:class:`~engram_train.model.hyper_connection.CollapseAndNorm`).  megatron's
  ``TransformerBlock`` carries the streams as one ``[S, B, n*H]`` tensor, so its
  sequence-parallel scatter (dim 0) and everything else between layers work as is.
* **Full recompute** (``model.recompute=full``): the attention and MLP sublayers
  (with their mixing) run under megatron's ``tensor_parallel.checkpoint`` (RNG
  trackers restored) and are recomputed in backward.  The Engram block stays
  *outside* the recomputed region: its lookup is a table exchange (an all-to-all
  under ``engram.partition=all``, rows the host prefetch pipeline hands over once)
  that must not run twice, and its row gradients must be pushed once.  Its
  activations are kept.  This is megatron's "full, uniform, one layer per chunk"
  with the Engram block carved out (megatron's block-level recompute cannot
  carve it out, so ours replaces it).

Layer numbering: configs (``engram.layer_ids``) are 0-based like the reference demo;
megatron's ``layer_number`` is 1-based.  This module is the one place that converts:
``layer_number == layer_id + 1``.

Hash ids.  megatron's ``TransformerBlock`` calls every layer with the same fixed
keyword arguments, so the ids cannot travel through the call.  Each model owns one
:class:`EngramContext`; the model wrapper opens ``context.step(hash_ids, rows)`` around
its forward and every Engram layer reads its own ids there: the *full* sequence
``[B, T, (N-1)*K]`` on every tensor-parallel rank.  Backward does not need them
(the block is not recomputed).  ``rows`` come with the batch when the tables' owner
gathered the lookups ahead (host-resident tables); the layer passes its block on to
the table, which finishes the lookup from it.

Sequence parallelism.  A layer holds ``[S/tp, B, n*H]``: the Engram slot gathers the
full sequence (the causal conv needs earlier positions, which may live on another
rank), runs the block on it and keeps its own chunk.  The block is replicated on
the TP ranks and computes the same values on each, so the gather's backward is a
*split*, not a reduce-scatter: ``tensor_parallel_output_grad=False``.  Engram
parameter gradients are complete and equal on every TP rank.  mHC mixing is per
token and needs no communication.
"""

from __future__ import annotations

import contextlib
import functools
from typing import Dict, Iterator, Optional

import torch
import torch.nn.functional as F
from megatron.core import tensor_parallel
from megatron.core.tensor_parallel.mappings import (
    gather_from_sequence_parallel_region,
    scatter_to_sequence_parallel_region,
)
from megatron.core.transformer.transformer_layer import TransformerLayer

from engram_train.model.hyper_connection import HyperConnection, expand_streams


def layer_number_of(layer_id: int) -> int:
    """megatron's 1-based ``layer_number`` of the 0-based config layer id."""
    return layer_id + 1


def layer_id_of(layer_number: int) -> int:
    """The 0-based config layer id of megatron's 1-based ``layer_number``."""
    return layer_number - 1


class EngramContext:
    """Per-step inputs of a model's Engram layers: ``{layer_id: hash_ids [B, T, (N-1)*K]}``, and the
    rows of those lookups when the tables' owner gathered them ahead (opaque here: ``rows.get(layer_id)``
    is what the layer hands its table)."""

    def __init__(self):
        self._hash_ids: Optional[Dict[int, torch.Tensor]] = None
        self._rows = None

    @contextlib.contextmanager
    def step(self, hash_ids: Optional[Dict[int, torch.Tensor]], rows=None) -> Iterator[None]:
        """Make ``hash_ids`` (and ``rows``) visible to the Engram layers for the duration of one forward."""
        self._hash_ids, self._rows = hash_ids, rows
        try:
            yield
        finally:
            self._hash_ids, self._rows = None, None

    def rows(self, layer_id: int):
        """The rows of this layer's lookup gathered ahead, or None (looked up in the forward)."""
        return self._rows.get(layer_id) if self._rows is not None else None

    def hash_ids(self, layer_id: int) -> torch.Tensor:
        if self._hash_ids is None:
            raise RuntimeError(
                f"Engram layer {layer_id} ran without hash ids: call the model with "
                "engram_hash_ids={layer_id: LongTensor[B, T, (max_ngram-1)*heads_per_ngram]}")
        if layer_id not in self._hash_ids:
            raise KeyError(f"engram_hash_ids has no entry for Engram layer {layer_id} "
                           f"(got layers {sorted(self._hash_ids)})")
        return self._hash_ids[layer_id]


class BackboneLayer(TransformerLayer):
    """megatron ``TransformerLayer`` with an optional Engram block in front, ``hc_mult`` mHC streams
    and full recompute of its sublayers (module docstring).

    Built from a spec like any layer; the extra keyword arguments come from ``ModuleSpec.params``
    (:func:`engram_train.model.spec.backbone_layer_spec`).  ``engram_table_provider(layer_id,
    table_sizes, embed_dim) -> table module`` supplies the block's table (the table store's);
    without one the block builds its own ``MultiHeadEmbeddingTable``.
    """

    def __init__(self, config, submodules, layer_number: int = 1, hidden_dropout=None,
                 pg_collection=None, vp_stage=None, *, hc_mult: int = 1, hc_sinkhorn_iters: int = 20,
                 recompute: bool = False, engram_layer_id: Optional[int] = None,
                 engram_block_kwargs: Optional[dict] = None, engram_context: Optional[EngramContext] = None,
                 engram_table_provider=None):
        super().__init__(config=config, submodules=submodules, layer_number=layer_number,
                         hidden_dropout=hidden_dropout, pg_collection=pg_collection, vp_stage=vp_stage)
        self.hc_mult = hc_mult
        self.recompute = recompute
        if hc_mult > 1:
            sp = bool(config.sequence_parallel)
            self.attn_hc = HyperConnection(hc_mult, config.hidden_size, hc_sinkhorn_iters,
                                           config.init_method_std, sp)
            self.mlp_hc = HyperConnection(hc_mult, config.hidden_size, hc_sinkhorn_iters,
                                          config.init_method_std, sp)
        self.engram = None
        self.engram_layer_id = engram_layer_id
        if engram_layer_id is not None:
            self._build_engram(engram_layer_id, engram_block_kwargs, engram_context, engram_table_provider)

    def _build_engram(self, layer_id: int, block_kwargs: dict, context: EngramContext, table_provider) -> None:
        if self.layer_number != layer_number_of(layer_id):
            raise RuntimeError(f"Engram layer id {layer_id} was built as megatron layer_number "
                               f"{self.layer_number} (expected {layer_number_of(layer_id)})")
        from engram_train.engram.block import EngramBlock
        from engram_train.lngram.block import LngramBlock

        kwargs = dict(block_kwargs)
        # The memory kind (engram.keys): Engram's block, or Lngram's for latent keys.
        block_class = {"engram": EngramBlock, "lngram": LngramBlock}[kwargs.pop("block_class", "engram")]
        if table_provider is not None:
            # The table comes from outside (memory/: partitioned, or elsewhere); the block never
            # allocates one of its own, so no rank holds a whole partitioned table, even briefly.
            kwargs["table"] = table_provider(layer_id, *block_class.table_shape(kwargs))
        # .to(dtype) casts floating-point parameters and buffers only: a store table has neither.
        self.engram = block_class(**kwargs).to(dtype=self.config.params_dtype)
        self.engram_context = context

    # --- Engram ---------------------------------------------------------------------------------

    def engram_residual(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``engram(hidden)`` for this rank's ``[S_local, B, n*H]`` slice of the residual streams."""
        sp = self.config.sequence_parallel and self.tp_group.size() > 1
        full = (gather_from_sequence_parallel_region(hidden_states, tensor_parallel_output_grad=False,
                                                     group=self.tp_group)
                if sp else hidden_states)
        hash_ids = self.engram_context.hash_ids(self.engram_layer_id)
        s, b = full.shape[0], full.shape[1]
        if tuple(hash_ids.shape[:2]) != (b, s):
            raise ValueError(f"hash ids of Engram layer {self.engram_layer_id} have shape "
                             f"{tuple(hash_ids.shape)}, expected [B={b}, T={s}, ...]")
        streams = full.transpose(0, 1).unflatten(-1, (self.hc_mult, -1))   # [B, T, n, H]
        rows = self.engram_context.rows(self.engram_layer_id)
        out = (self.engram(streams, hash_ids) if rows is None else self.engram(streams, hash_ids, rows=rows))
        out = out.flatten(-2).transpose(0, 1).contiguous()   # [S, B, n*H]
        return scatter_to_sequence_parallel_region(out, group=self.tp_group) if sp else out

    # --- forward --------------------------------------------------------------------------------

    def forward(self, hidden_states, *args, **kwargs):
        hidden = hidden_states
        if self.hc_mult > 1 and self.layer_number == 1:
            hidden = expand_streams(hidden, self.hc_mult)   # the embedding, copied into the streams
        if self.engram is not None:
            hidden = hidden + self.engram_residual(hidden)
        body = functools.partial(self._sublayers, args, kwargs)
        if self.recompute and self.training and torch.is_grad_enabled():
            hidden = tensor_parallel.checkpoint(body, False, hidden)
        else:
            hidden = body(hidden)
        return hidden, kwargs.get("context")

    def _sublayers(self, args, kwargs, hidden: torch.Tensor) -> torch.Tensor:
        """Attention and MLP sublayers of ``hidden [S, B, n*H]`` (what full recompute replays)."""
        if self.hc_mult == 1:
            return TransformerLayer.forward(self, hidden, *args, **kwargs)[0]
        streams = hidden.unflatten(-1, (self.hc_mult, -1))
        streams = self.attn_hc.apply_to(streams, functools.partial(self._attention, kwargs))
        streams = self.mlp_hc.apply_to(streams, functools.partial(self._mlp, kwargs))
        return streams.flatten(-2)

    def _dropout(self, output_with_bias) -> torch.Tensor:
        out, bias = output_with_bias
        if bias is not None:
            out = out + bias
        return F.dropout(out, p=self.hidden_dropout, training=self.training)

    def _attention(self, kwargs, y: torch.Tensor) -> torch.Tensor:
        """``F_attn(norm(y))`` of one mixed stream ``y [S, B, H]`` (megatron's modules, no residual)."""
        return self._dropout(self.self_attention(
            self.input_layernorm(y),
            attention_mask=kwargs.get("attention_mask"),
            inference_context=kwargs.get("inference_context"),
            rotary_pos_emb=kwargs.get("rotary_pos_emb"),
            rotary_pos_cos=kwargs.get("rotary_pos_cos"),
            rotary_pos_sin=kwargs.get("rotary_pos_sin"),
            rotary_pos_cos_sin=kwargs.get("rotary_pos_cos_sin"),
            attention_bias=kwargs.get("attention_bias"),
            packed_seq_params=kwargs.get("packed_seq_params"),
            sequence_len_offset=kwargs.get("sequence_len_offset"),
        ))

    def _mlp(self, kwargs, y: torch.Tensor) -> torch.Tensor:
        """``F_mlp(norm(y))``: dense MLP or MoE (router, experts, shared experts)."""
        return self._dropout(self.mlp(self.pre_mlp_layernorm(y), padding_mask=kwargs.get("padding_mask")))
