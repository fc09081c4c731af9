"""Latent keys of Lngram (docs/lngram.md §1-2): route symbols and exact n-gram addresses.

Pure tensor arithmetic, no modules, no parameters, so that the block, the
inspection tool and the tests share one definition of an address.

- ``route_symbols(logits [..., R, M]) -> [..., R]``: hard bits ``logits > 0``
  packed little-endian, ``a = sum_j bit_j 2^j`` in ``[0, K = 2^M)``.
- ``order_address(symbols [B, T, R], n, M) -> [B, T, R]``: the window ending
  at ``t`` addresses row ``r K^n + sum_{i<n} a[t-n+1+i, r] K^i`` of order
  ``n``'s table (the oldest symbol in the lowest digit).  Positions whose
  window starts before the sequence get an address built from zero symbols;
  :func:`window_valid` says which windows are real.
- ``window_valid(segments [B, T], n) -> bool [B, T]``: the window ending at
  ``t`` lies in the sequence and in one document (``segments`` numbers the
  documents of a packed sequence).
- ``document_segments(tokens, eos_id)``: that numbering, a document ending at
  its EOS token.

A layer's tables are one array of ``sum_n R K^n`` rows (orders in config
order, order ``n`` at ``order_offsets[n]``): the table store holds it like
one Engram head.
"""

from __future__ import annotations

from typing import Dict, List, Sequence

import torch


def num_symbols(bits: int) -> int:
    return 1 << int(bits)


def order_rows(routes: int, bits: int, order: int) -> int:
    """Rows of order ``order``'s table: ``R K^n`` (Python int: never overflows)."""
    return int(routes) * num_symbols(bits) ** int(order)


def table_layout(routes: int, bits: int, orders: Sequence[int]) -> List[int]:
    """Rows of each order's table, in ``orders`` order (the store's head sizes)."""
    return [order_rows(routes, bits, n) for n in orders]


def order_offsets(routes: int, bits: int, orders: Sequence[int]) -> Dict[int, int]:
    """First row of each order's table in the layer's one array."""
    out, start = {}, 0
    for n, rows in zip(orders, table_layout(routes, bits, orders)):
        out[int(n)] = start
        start += rows
    return out


def route_symbols(logits: torch.Tensor) -> torch.Tensor:
    """Hard bits of ``logits [..., R, M]`` packed into int64 symbols ``[..., R]``."""
    bits = logits.shape[-1]
    weights = torch.ones(bits, dtype=torch.int64, device=logits.device) << torch.arange(
        bits, dtype=torch.int64, device=logits.device)
    return ((logits > 0).to(torch.int64) * weights).sum(-1)


def order_address(symbols: torch.Tensor, order: int, bits: int) -> torch.Tensor:
    """In-table address of the order-``order`` window ending at each position, ``[B, T, R]`` int64."""
    B, T, R = symbols.shape
    padded = torch.cat([symbols.new_zeros(B, order - 1, R), symbols], dim=1)   # zeros before the sequence
    addr = torch.arange(R, dtype=torch.int64, device=symbols.device) << (bits * order)   # r K^n
    addr = addr.expand(B, T, R).clone()
    for i in range(order):
        addr |= padded[:, i:i + T] << (bits * i)
    return addr


def window_valid(segments: torch.Tensor, order: int) -> torch.Tensor:
    """``[B, T]``: the window of ``order`` symbols ending at ``t`` is inside the sequence and one document."""
    B, T = segments.shape
    valid = torch.zeros(B, T, dtype=torch.bool, device=segments.device)
    if T >= order:
        valid[:, order - 1:] = segments[:, :T - order + 1] == segments[:, order - 1:]
    return valid


def document_segments(tokens: torch.Tensor, eos_id: int) -> torch.Tensor:
    """Document index of every position of packed ``tokens [B, T]``: a document ends with its EOS."""
    eos = (tokens == eos_id).to(torch.int64)
    return torch.cumsum(eos, dim=1) - eos
