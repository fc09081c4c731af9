"""Lngram block: latent keys, exact n-gram tables, readout over routes, short conv (docs/lngram.md).

At a memory layer, with hidden states ``h [B, T, H]`` (the layer's input, before attention):

    z      = W_r RMSNorm_router(h)                      [B, T, R, M] route logits
    a      = pack(z > 0)                                [B, T, R]    symbols in [0, K = 2^M)
    m_n    = table_n[r K^n + sum_i a[t-n+1+i] K^i]      per order n; a zero vector where the window
                                                        starts before the sequence or crosses a document
    x_r    = concat_n m_n[r]                            route token of route r
    k, v   = W_kv RMSNorm_memory(x_r)                   GQA-like: readout_kv_heads key/value heads
    q      = W_q RMSNorm_query(h)                       readout_heads query heads
    p      = softmax([q.k_1, ..., q.k_R, s] / ...)      over the routes and a zero-valued sink of
                                                        fixed logit s = log(R (1 - m) / m)
    o      = W_o sum_r p_r v_r
    out    = o + SiLU(DWConv(RMSNorm_conv(o)))          zero-initialized, kernel 4, dilation max(n)

and the caller adds ``out`` to the residual stream before the layer's attention.

Gradients: tables, readout and conv get their exact gradients through autograd
(the table's own lookup hands sparse row gradients to the table store).  The
hard bits have none, so the router gets a surrogate (:class:`RouterSurrogate`):

- ``one_bit`` (the paper's default): for bit ``j`` of the symbol at each of the
  ``n`` positions of a window, ``dL/dz_j += <g, E(bit=1) - E(bit=0)>`` where
  ``g`` is the gradient at the looked-up row and ``E`` the rows at the address
  with that bit set or cleared (one of them is the row read); then
  ``dL/dz *= scale * tau * p (1 - p)``, ``p = sigmoid(tau z)``.  ``n M`` extra
  rows per window, read in backward.
- ``exact``: the gradient of the expected row under independent bits
  ``P(bit_j) = p_j``: ``dL/dz_j += scale * tau * sum_c P(c) (c_j - p_j) <g, E(c)>``
  over all ``K`` codes of the position.  ``n K`` extra rows per window.

Counterfactual rows are read through the table module itself (``table(ids [N, 1])``
under ``no_grad``), so a partitioned table serves them through its placement's
exchange; the block deduplicates them before they travel.
"""

from __future__ import annotations

import math
from typing import Callable, List, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from engram_train.engram.table import MultiHeadEmbeddingTable
from engram_train.lngram.keys import order_address, order_offsets, route_symbols, table_layout, window_valid

NORM_EPS = 1e-6
SURROGATES = ("one_bit", "exact", "none")


class _Windows:
    """The looked-up windows of one order: their in-table addresses and where their symbols live."""

    __slots__ = ("order", "offset", "addr", "end", "start", "count")

    def __init__(self, order: int, offset: int, addr: torch.Tensor, end: torch.Tensor, start: int):
        self.order, self.offset, self.addr, self.end, self.start = order, offset, addr, end, start
        self.count = addr.numel()


class RouterSurrogate(torch.autograd.Function):
    """Identity on the looked-up rows; backward also returns the router's surrogate gradient.

    ``rows [N, d]`` are the rows of every order's windows (order after order, ``windows``
    says where each order starts); ``logits [B, T, R, M]`` fp32; ``read(ids [U]) -> [U, d]``
    reads table rows without gradient (collective for partitioned tables: every rank of the
    placement calls it once per layer per backward).
    """

    @staticmethod
    def forward(ctx, rows, logits, read: Callable, windows: List[_Windows], bits: int, routes: int,
                mode: str, temperature: float, scale: float):
        ctx.save_for_backward(rows.detach(), logits.detach())
        ctx.read, ctx.windows, ctx.bits, ctx.routes = read, windows, bits, routes
        ctx.mode, ctx.temperature, ctx.scale = mode, temperature, scale
        return rows.clone()

    @staticmethod
    def backward(ctx, grad):
        rows, logits = ctx.saved_tensors
        M, R = ctx.bits, ctx.routes
        grad = grad.float()
        probs = torch.sigmoid(ctx.temperature * logits.float())
        flat_grad = torch.zeros(logits.numel(), dtype=torch.float32, device=logits.device)
        j = torch.arange(M, dtype=torch.int64, device=logits.device)
        K = 1 << M
        # All counterfactual ids of the layer first: one deduplicated read.
        wanted = []
        for w in ctx.windows:
            for i in range(w.order):
                if ctx.mode == "one_bit":
                    alt = w.addr.unsqueeze(1) ^ (1 << (M * i + j))                      # [N, M]
                else:
                    digit = (w.addr >> (M * i)) & (K - 1)
                    base = w.addr - (digit << (M * i))
                    alt = base.unsqueeze(1) + (torch.arange(K, device=logits.device) << (M * i))   # [N, K]
                wanted.append(alt + w.offset)
        if not wanted:
            return grad, None, None, None, None, None, None, None, None
        flat_ids = torch.cat([x.reshape(-1) for x in wanted])
        uniq, inv = torch.unique(flat_ids, return_inverse=True)
        table_rows = ctx.read(uniq).float()
        used = 0
        for w in ctx.windows:
            g = grad[w.start:w.start + w.count]                          # [N, d]
            cur = (rows[w.start:w.start + w.count].float() * g).sum(-1)   # [N]
            for i in range(w.order):
                width = M if ctx.mode == "one_bit" else K
                idx = inv[used:used + w.count * width].view(w.count, width)
                used += w.count * width
                alt_rows = table_rows.index_select(0, idx.reshape(-1)).view(w.count, width, -1)
                dots = torch.bmm(alt_rows, g.unsqueeze(-1)).squeeze(-1)    # [N, width]
                # The symbol at position i of a window ending at t sits at t - (n-1-i), same route.
                src = w.end - (w.order - 1 - i) * R                       # flat index over [B, T, R]
                if ctx.mode == "one_bit":
                    bit = (w.addr.unsqueeze(1) >> (M * i + j)) & 1
                    score = (dots - cur.unsqueeze(1)) * (1 - 2 * bit).to(dots.dtype)
                else:
                    p = probs.view(-1, M).index_select(0, src)            # [N, M]
                    codes = (torch.arange(K, device=logits.device).unsqueeze(1) >> j) & 1   # [K, M]
                    cb = codes.to(p.dtype)
                    prob_code = torch.where(codes.bool().unsqueeze(0), p.unsqueeze(1),
                                            1 - p.unsqueeze(1)).prod(-1)   # [N, K]
                    score = torch.einsum("nk,nkm->nm", prob_code * dots, cb.unsqueeze(0) - p.unsqueeze(1))
                flat_grad.index_add_(0, (src.unsqueeze(1) * M + j).reshape(-1), score.reshape(-1))
        grad_z = flat_grad.view_as(logits) * (ctx.scale * ctx.temperature)
        if ctx.mode == "one_bit":
            grad_z = grad_z * probs * (1 - probs)
        return grad, grad_z.to(logits.dtype), None, None, None, None, None, None, None


def local_table(routes: int, bits: int, orders: Sequence[int], memory_dim: int, init_std: float) -> nn.Module:
    """A whole table of a layer's orders as a model parameter (without the table store)."""
    table = MultiHeadEmbeddingTable([sum(table_layout(routes, bits, orders))], memory_dim)
    with torch.no_grad():
        table.weight.normal_(0.0, init_std) if init_std > 0 else table.weight.zero_()
    return table


class LngramBlock(nn.Module):
    """The Lngram module of one layer: ``forward(hidden [B, T, 1, H], segments [B, T, 1]) -> [B, T, 1, H]``.

    ``segments`` numbers the documents of each packed sequence (:func:`keys.document_segments`);
    windows that cross a document boundary read a zero vector.  ``table`` is the table store's
    (``table(ids [N, 1]) -> [N, memory_dim]``); without one the block builds a whole table.
    After each call ``last_gate_mean`` holds the detached mean readout mass on the routes
    (1 - mass on the sink), ``last_symbols`` the route symbols (for inspection).
    """

    def __init__(self, hidden_size: int, routes: int, bits: int, orders: Sequence[int], memory_dim: int,
                 readout_heads: int, readout_kv_heads: int, kernel_size: int = 4, route_mass_prior: float = 0.5,
                 surrogate: str = "one_bit", temperature: float = 1.0, scale: float = 1.0,
                 init_std: float = 0.02, table_init_std: float = 0.0, table: Optional[nn.Module] = None):
        super().__init__()
        self.hidden_size, self.routes, self.bits = hidden_size, routes, bits
        self.orders = [int(n) for n in orders]
        self.memory_dim = memory_dim
        self.readout_heads, self.readout_kv_heads = readout_heads, readout_kv_heads
        self.head_dim = hidden_size // readout_heads
        self.surrogate, self.temperature, self.scale = surrogate, float(temperature), float(scale)
        self.offsets = order_offsets(routes, bits, self.orders)
        self.table_sizes = [sum(table_layout(routes, bits, self.orders))]
        self.sink_logit = math.log(routes * (1 - route_mass_prior) / route_mass_prior)
        self.table = table if table is not None else local_table(routes, bits, self.orders, memory_dim,
                                                                 table_init_std)
        route_dim = len(self.orders) * memory_dim
        self.router_norm = nn.Parameter(torch.ones(hidden_size))
        self.router = nn.Linear(hidden_size, routes * bits, bias=False)
        self.query_norm = nn.Parameter(torch.ones(hidden_size))
        self.query_proj = nn.Linear(hidden_size, readout_heads * self.head_dim, bias=False)
        self.memory_norm = nn.Parameter(torch.ones(route_dim))
        self.kv_proj = nn.Linear(route_dim, 2 * readout_kv_heads * self.head_dim, bias=False)
        self.out_proj = nn.Linear(readout_heads * self.head_dim, hidden_size, bias=False)
        self.conv_norm = nn.Parameter(torch.ones(hidden_size))
        self.dilation = max(self.orders)
        self.kernel_size = kernel_size
        self.conv = nn.Conv1d(hidden_size, hidden_size, kernel_size, groups=hidden_size, bias=False,
                              dilation=self.dilation)
        for lin in (self.router, self.query_proj, self.kv_proj, self.out_proj):
            nn.init.normal_(lin.weight, 0.0, init_std)
        nn.init.zeros_(self.conv.weight)
        self.last_gate_mean: Optional[torch.Tensor] = None
        self.last_symbols: Optional[torch.Tensor] = None

    @staticmethod
    def table_shape(kwargs: dict):
        """``(table_sizes, embed_dim)`` of the table the block built from ``kwargs`` reads."""
        return [sum(table_layout(kwargs["routes"], kwargs["bits"], kwargs["orders"]))], kwargs["memory_dim"]

    def _read(self, ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.table(ids.unsqueeze(1))

    def lookup(self, hidden: torch.Tensor, segments: torch.Tensor):
        """Route logits ``[B, T, R, M]`` and route tokens ``[B, T, R, len(orders) * memory_dim]`` (fp32)."""
        B, T, H = hidden.shape
        R, M, d = self.routes, self.bits, self.memory_dim
        logits = self.router(F.rms_norm(hidden, (H,), self.router_norm, NORM_EPS)).float().unflatten(-1, (R, M))
        symbols = route_symbols(logits.detach())
        self.last_symbols = symbols
        ids, windows, start = [], [], 0
        for n in self.orders:
            valid = window_valid(segments, n).unsqueeze(-1).expand(B, T, R).reshape(-1)
            end = valid.nonzero().squeeze(1)                              # flat [B, T, R] index of each window
            addr = order_address(symbols, n, M).reshape(-1)[end]
            windows.append(_Windows(n, self.offsets[n], addr, end, start))
            ids.append(addr + self.offsets[n])
            start += addr.numel()
        rows = self.table(torch.cat(ids).unsqueeze(1)).float()               # [N, d]: one lookup per layer
        if self.surrogate != "none" and torch.is_grad_enabled() and logits.requires_grad:
            rows = RouterSurrogate.apply(rows, logits, self._read, windows, M, R, self.surrogate,
                                         self.temperature, self.scale)
        tokens = []
        for w in windows:
            part = rows[w.start:w.start + w.count]
            tokens.append(part.new_zeros(B * T * R, d).index_copy(0, w.end, part))
        return logits, torch.cat(tokens, dim=-1).view(B, T, R, len(self.orders) * d)

    def forward(self, hidden: torch.Tensor, segments: torch.Tensor) -> torch.Tensor:
        if hidden.ndim != 4 or hidden.shape[2] != 1 or hidden.shape[3] != self.hidden_size:
            raise ValueError(f"hidden: expected shape [B, T, 1, hidden_size={self.hidden_size}], "
                             f"got {tuple(hidden.shape)}")
        h = hidden[:, :, 0]
        B, T, H = h.shape
        _, route_tokens = self.lookup(h, segments.reshape(B, T))
        dtype = self.kv_proj.weight.dtype
        Hq, Hkv, hd, R = self.readout_heads, self.readout_kv_heads, self.head_dim, self.routes
        q = self.query_proj(F.rms_norm(h, (H,), self.query_norm, NORM_EPS)).view(B, T, Hkv, Hq // Hkv, hd)
        kv = self.kv_proj(F.rms_norm(route_tokens.to(dtype), (route_tokens.shape[-1],), self.memory_norm, NORM_EPS))
        k, v = kv.view(B, T, R, 2, Hkv, hd).permute(3, 0, 1, 4, 2, 5)       # each [B, T, Hkv, R, hd]
        scores = torch.matmul(q, k.transpose(-1, -2)).float() / math.sqrt(hd)   # [B, T, Hkv, G, R]
        sink = scores.new_full(scores.shape[:-1] + (1,), self.sink_logit)
        probs = torch.softmax(torch.cat([scores, sink], dim=-1), dim=-1)
        self.last_gate_mean = (1 - probs[..., R]).detach().mean()
        mixed = torch.matmul(probs[..., :R].to(v.dtype), v)                  # the sink's value is zero
        out = self.out_proj(mixed.reshape(B, T, Hq * hd))
        return (out + self.short_conv(out)).unsqueeze(2)

    def short_conv(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x, (self.hidden_size,), self.conv_norm, NORM_EPS).transpose(1, 2)
        y = F.pad(y, ((self.kernel_size - 1) * self.dilation, 0))            # causal: pad the past only
        return F.silu(self.conv(y)).transpose(1, 2)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, routes={self.routes}, bits={self.bits}, orders={self.orders}, "
                f"memory_dim={self.memory_dim}, readout_heads={self.readout_heads}/{self.readout_kv_heads}, "
                f"surrogate={self.surrogate}, table_rows={self.table_sizes[0]}")
