"""Engram block: table lookup, gated fusion and short causal conv (docs/engram.md §1.5-1.7).

For ``G = hc_mult`` residual branches with hidden states ``h[b]`` and the
layer's concatenated n-gram embedding ``e``:

    k[b]  = RMSNorm_key[b](W_K[b] e + c_K[b])          per-branch key projection
    q[b]  = RMSNorm_query[b](h[b])
    g[b]  = (k[b] . q[b]) / sqrt(hidden);  g = sign(g) * sqrt(max(|g|, 1e-6))
    v[b]  = sigmoid(g[b]) * (W_V e + c_V)               value projection shared by branches
    out   = v + SiLU(CausalDepthwiseConv(concat_b RMSNorm_conv[b](v[b])))

with the conv's kernel ``kernel_size`` and dilation ``max_ngram``.  The caller
adds ``out`` to the residual stream before the layer's attention.

Reference-exact details (engram_demo_v1.py):
- key/query norms use ``nn.RMSNorm``'s default eps (``torch.finfo(dtype).eps``),
  the conv norms ``norm_eps = 1e-5``; projections carry biases; the conv has none.
- The reference pads the conv on both sides and keeps the first T outputs;
  left padding only, as here, gives the same values.
Paper's training policy: the conv starts at zero, so a fresh block outputs ``v``.

Layout: the G key projections are one ``nn.Linear(d_e, G*hidden)`` (branch-major
rows) and each set of G RMSNorm weights one flat ``[G*hidden]`` parameter, so every
branch runs in one kernel; ``load_reference_state_dict`` maps the reference's
per-branch names onto them.

Compute: the key and value projections run as one matmul over their concatenated
weights; the key/query norms with the gate, and the conv norm with the conv and its
SiLU, are hand-written autograd functions (:mod:`engram_train.engram.fused`) that read
the modules' parameters: the block never calls ``key_norm``, ``query_norm``,
``conv_norm`` or ``conv`` as modules (they hold the weights, under the names
checkpoints use; ``BranchRMSNorm.forward`` stays for inspection tools).
"""

from __future__ import annotations

from typing import Dict, List, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_train.config.schema import ConfigError, require
from engram_train.engram.fused import engram_gate, short_conv
from engram_train.engram.table import MultiHeadEmbeddingTable

REFERENCE_NORM_EPS = 1e-5          # ShortConv's RMSNorm eps in the reference


class BranchRMSNorm(nn.Module):
    """One RMSNorm per residual branch over the last dim of ``[..., G, H]``.

    The weight is flat, ``[G*H]`` branch-major, so it stays 1-D like every norm
    weight (optimizer policy: no weight decay for ``ndim < 2``).
    """

    def __init__(self, branches: int, hidden_size: int, eps: Optional[float]):
        super().__init__()
        self.branches = branches
        self.hidden_size = hidden_size
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(branches * hidden_size))

    def branch_weight(self, i: int) -> torch.Tensor:
        return self.weight[i * self.hidden_size:(i + 1) * self.hidden_size]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.hidden_size,), eps=self.eps) * self.weight.view(self.branches, self.hidden_size)

    def extra_repr(self) -> str:
        return f"branches={self.branches}, hidden_size={self.hidden_size}, eps={self.eps}"


REFERENCE_OFFSETS_KEY = "multi_head_embedding.offsets"
REFERENCE_TABLE_KEY = "multi_head_embedding.embedding.weight"


def reference_hc_mult(state_dict: Mapping[str, torch.Tensor]) -> int:
    """Residual branches of reference weights: how many ``key_projs.{i}.weight`` they hold (0: none)."""
    return sum(1 for k in state_dict if k.startswith("key_projs.") and k.endswith(".weight"))


def reference_table_sizes(state_dict: Mapping[str, torch.Tensor]) -> Optional[List[int]]:
    """Each head's rows, from the reference's offsets buffer and table rows (None without both)."""
    offsets, table = state_dict.get(REFERENCE_OFFSETS_KEY), state_dict.get(REFERENCE_TABLE_KEY)
    if offsets is None or table is None:
        return None
    bounds = [int(v) for v in torch.as_tensor(offsets).flatten()] + [int(table.shape[0])]
    return [b - a for a, b in zip(bounds[:-1], bounds[1:])]


def hc_mult_mismatch(ours: int, theirs: int) -> str:
    return (f"model.hc_mult={ours}: the weights have {theirs} residual branches (key_projs.0..{theirs - 1}, "
            f"made with hc_mult={theirs}); set model.hc_mult={theirs} (the residual streams; engram.hc_mult "
            f"follows it) or port weights made with hc_mult={ours}")


class EngramBlock(nn.Module):
    """The Engram module of one layer: ``forward(hidden [B, T, G, H], hash_ids [B, T, heads]) -> [B, T, G, H]``.

    ``table_sizes`` are ``NgramHasher.table_sizes[layer_id]``.  ``table`` replaces the
    built-in ``MultiHeadEmbeddingTable`` (e.g. a partitioned or host-resident one);
    callers that gather rows themselves call ``fuse(hidden, rows)``.  ``norm_eps`` is
    the conv norms' eps; ``gate_norm_eps`` (None: dtype eps) the key/query norms'.
    After each call ``last_gate_mean`` holds the detached mean gate, for metrics.
    """

    def __init__(self, hidden_size: int, hc_mult: int, table_sizes: Sequence[int], n_embed_per_ngram: int,
                 heads_per_ngram: int, max_ngram: int, kernel_size: int = 4, norm_eps: float = REFERENCE_NORM_EPS,
                 table: Optional[nn.Module] = None, table_init_std: float = 1.0,
                 gate_norm_eps: Optional[float] = None):
        super().__init__()
        require(hidden_size >= 1, "hidden_size", hidden_size, "must be >= 1")
        require(hc_mult >= 1, "hc_mult", hc_mult, "must be >= 1 (1 for a plain residual stream)")
        require(max_ngram >= 2, "max_ngram", max_ngram, "must be >= 2 (bigrams at least)")
        require(heads_per_ngram >= 1, "heads_per_ngram", heads_per_ngram, "must be >= 1")
        require(n_embed_per_ngram >= 1 and n_embed_per_ngram % heads_per_ngram == 0, "n_embed_per_ngram",
                n_embed_per_ngram, f"must be a positive multiple of heads_per_ngram={heads_per_ngram}; "
                f"e.g. {max(1, n_embed_per_ngram // heads_per_ngram) * heads_per_ngram}")
        table_sizes = [int(s) for s in table_sizes]
        heads = (max_ngram - 1) * heads_per_ngram
        require(len(table_sizes) == heads, "table_sizes", table_sizes,
                f"needs (max_ngram-1)*heads_per_ngram={heads} sizes; pass NgramHasher.table_sizes[layer_id]")
        require(all(s >= 2 for s in table_sizes), "table_sizes", table_sizes, "every table size must be >= 2")
        require(kernel_size >= 1, "kernel_size", kernel_size, "must be >= 1")

        self.hidden_size = hidden_size
        self.hc_mult = hc_mult
        self.max_ngram = max_ngram
        self.heads_per_ngram = heads_per_ngram
        self.n_embed_per_ngram = n_embed_per_ngram
        self.kernel_size = kernel_size
        self.dilation = max_ngram
        self.table_sizes: List[int] = table_sizes
        engram_dim = (max_ngram - 1) * n_embed_per_ngram

        self.table = table if table is not None else MultiHeadEmbeddingTable(
            table_sizes, n_embed_per_ngram // heads_per_ngram, init_std=table_init_std)
        self.key_proj = nn.Linear(engram_dim, hc_mult * hidden_size)
        self.value_proj = nn.Linear(engram_dim, hidden_size)
        self.key_norm = BranchRMSNorm(hc_mult, hidden_size, gate_norm_eps)     # reference: norm1
        self.query_norm = BranchRMSNorm(hc_mult, hidden_size, gate_norm_eps)   # reference: norm2
        self.conv_norm = BranchRMSNorm(hc_mult, hidden_size, norm_eps)         # reference: short_conv.norms
        channels = hc_mult * hidden_size
        # Holds the conv's weight (checkpoint names, reference layout); fused.short_conv applies it.
        self.conv = nn.Conv1d(channels, channels, kernel_size, groups=channels, bias=False, dilation=self.dilation)
        self.last_gate_mean: Optional[torch.Tensor] = None
        nn.init.zeros_(self.conv.weight)

    @staticmethod
    def table_shape(kwargs: dict):
        """``(table_sizes, embed_dim)`` of the table the block built from ``kwargs`` reads."""
        return kwargs["table_sizes"], kwargs["n_embed_per_ngram"] // kwargs["heads_per_ngram"]

    def forward(self, hidden: torch.Tensor, hash_ids: torch.Tensor, rows=None) -> torch.Tensor:
        """``rows``: this lookup's rows, gathered ahead by the table's owner (a table store's host tables);
        the table finishes the lookup from them."""
        return self.fuse(hidden, self.table(hash_ids) if rows is None else self.table(hash_ids, rows))

    def fuse(self, hidden: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """Everything after the lookup: ``hidden [B, T, G, H]``, ``embeddings [B, T, d_e]`` -> ``[B, T, G, H]``."""
        if hidden.ndim != 4 or tuple(hidden.shape[2:]) != (self.hc_mult, self.hidden_size):
            raise ValueError(f"hidden: expected shape [B, T, hc_mult={self.hc_mult}, hidden_size={self.hidden_size}], "
                             f"got {tuple(hidden.shape)}; a plain residual stream needs hidden.unsqueeze(2)")
        G, H = self.hc_mult, self.hidden_size
        e = embeddings.to(self.value_proj.weight.dtype)
        # Key and value projections as one matmul (one pass over e, a wider and faster GEMM on CPU).
        kv = F.linear(e, torch.cat([self.key_proj.weight, self.value_proj.weight]),
                      torch.cat([self.key_proj.bias, self.value_proj.bias]))
        key, projected = kv.split([G * H, H], dim=-1)        # split's backward is one cat, not two padded slices
        key = key.unflatten(-1, (G, H))
        alpha = engram_gate(key, hidden, self.key_norm.weight, self.query_norm.weight,
                            self.key_norm.eps, self.query_norm.eps)                       # [B, T, G]
        self.last_gate_mean = alpha.detach().float().mean()
        value = alpha.unsqueeze(-1) * projected.unsqueeze(-2)                    # [B, T, G, H]
        return value + self.short_conv(value)

    def short_conv(self, value: torch.Tensor) -> torch.Tensor:
        """``SiLU(conv(RMSNorm_conv(value)))``, ``[B, T, G, H]``: the conv's weight is ``self.conv``'s, applied
        causally in this layout (``fused.short_conv``); ``self.conv`` is never called."""
        return short_conv(value.contiguous(), self.conv_norm.weight, self.conv.weight, self.conv_norm.eps,
                          self.dilation)

    # ---- reference weights -------------------------------------------------------------------------------------

    def _reference_views(self) -> Dict[str, torch.Tensor]:
        """Reference parameter name -> the slice of our parameter holding it."""
        G, H = self.hc_mult, self.hidden_size
        table_weight = getattr(self.table, "weight", None)
        if not isinstance(table_weight, torch.Tensor):
            raise TypeError(f"table={type(self.table).__name__}: has no .weight tensor to exchange with reference "
                            f"weights; load the rows into that table through its own API")
        views = {
            "multi_head_embedding.embedding.weight": table_weight,
            "short_conv.conv.weight": self.conv.weight,
            "value_proj.weight": self.value_proj.weight,
            "value_proj.bias": self.value_proj.bias,
        }
        for i in range(G):
            rows = slice(i * H, (i + 1) * H)
            views[f"short_conv.norms.{i}.weight"] = self.conv_norm.branch_weight(i)
            views[f"key_projs.{i}.weight"] = self.key_proj.weight[rows]
            views[f"key_projs.{i}.bias"] = self.key_proj.bias[rows]
            views[f"norm1.{i}.weight"] = self.key_norm.branch_weight(i)
            views[f"norm2.{i}.weight"] = self.query_norm.branch_weight(i)
        return views

    def table_offsets(self) -> torch.Tensor:
        """First row of each head in the table (the reference's ``multi_head_embedding.offsets``)."""
        starts = [0]
        for size in self.table_sizes[:-1]:
            starts.append(starts[-1] + size)
        return torch.tensor(starts, dtype=torch.int64)

    def reference_state_dict(self) -> Dict[str, torch.Tensor]:
        """Our weights under the reference ``Engram`` module's names (detached copies), offsets buffer included,
        so that the reference's ``load_state_dict(strict=True)`` takes them."""
        sd = {k: v.detach().clone() for k, v in self._reference_views().items()}
        sd[REFERENCE_OFFSETS_KEY] = self.table_offsets()
        return sd

    @torch.no_grad()
    def load_reference_state_dict(self, state_dict: Mapping[str, torch.Tensor]) -> None:
        """Load weights saved by the reference ``Engram`` module (all of its parameters, strictly).

        Weights of another ``hc_mult`` or other table sizes are refused with one line naming the
        key to set (``engram.hc_mult``, ``engram.table_size_per_ngram``); ``engram.port`` also strips
        the demo's ``engram.`` prefix and works out the table sizes to set.
        """
        sd = dict(state_dict)
        branches = reference_hc_mult(sd)
        if branches and branches != self.hc_mult:
            raise ConfigError(hc_mult_mismatch(self.hc_mult, branches))
        sizes = reference_table_sizes(sd)
        if sizes is not None and sizes != self.table_sizes:
            raise ConfigError(f"engram.table_size_per_ngram: the weights' tables have {len(sizes)} heads of sizes "
                              f"{sizes}, this block's {self.table_sizes}; set engram.table_size_per_ngram (and "
                              f"engram.layer_ids, heads_per_ngram, max_ngram) to what the weights were made with "
                              f"(the demo: 5 x its raw vocabulary for every order)")
        sd.pop(REFERENCE_OFFSETS_KEY, None)
        views = self._reference_views()
        missing = sorted(set(views) - set(sd))
        unexpected = sorted(set(sd) - set(views))
        if missing or unexpected:
            raise KeyError(f"load_reference_state_dict: missing keys {missing}, unexpected keys {unexpected} "
                           f"(block built with hc_mult={self.hc_mult}; the reference's hc_mult must match)")
        for name, dst in views.items():
            src = torch.as_tensor(sd[name])
            if tuple(src.shape) != tuple(dst.shape):
                raise ValueError(f"state_dict[{name!r}]: shape {tuple(src.shape)} does not match this block's "
                                 f"{tuple(dst.shape)}; check hidden_size, n_embed_per_ngram, heads_per_ngram, "
                                 f"max_ngram, kernel_size and table_sizes")
            dst.copy_(src)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, hc_mult={self.hc_mult}, max_ngram={self.max_ngram}, "
                f"heads_per_ngram={self.heads_per_ngram}, n_embed_per_ngram={self.n_embed_per_ngram}, "
                f"kernel_size={self.kernel_size}, dilation={self.dilation}")
