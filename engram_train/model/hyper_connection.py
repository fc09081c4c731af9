"""Manifold-constrained hyper-connections (mHC): ``n`` residual streams instead of one.

Xie et al., "mHC: Manifold-Constrained Hyper-Connections" (arXiv 2512.24880), as
trained by the Engram paper's backbone (``hc_mult = n = 4``).  The residual stream
is ``X [..., n, H]``.  Around each sublayer ``F`` (attention, MLP):

    m     = (flatten(X) . W^T) * rsqrt(mean(flatten(X)^2) + eps)   W: [(2n + n^2), n*H], fp32
    pre   = sigmoid(m_pre  * s0 + b_pre) + eps                      [n]
    post  = 2 * sigmoid(m_post * s1 + b_post)                       [n]
    comb  = Sinkhorn(m_comb * s2 + b_comb)                          [n, n]: row softmax, then
            ``sinkhorn_iters`` x (column normalization, row normalization)
    y     = sum_i pre_i X_i
    X'_j  = post_j * F(norm(y)) + sum_i comb[i, j] X_i

``comb`` is (approximately) doubly stochastic, so the streams' mixing neither
grows nor shrinks the residual signal.  The embedding is copied into the ``n``
streams (:func:`expand_streams`); before the final norm they collapse to one with
a sigmoid-weighted sum whose weights come from the same normalized projection
(:class:`StreamCollapse`).

Everything here is per token: under sequence parallelism each tensor-parallel
rank mixes its own tokens and no communication is added.  The mixing weights are
replicated on the TP ranks, so they carry megatron's ``sequence_parallel`` flag
(their gradients are all-reduced over TP, ``parallel/sp_grads.py``).  They are
created in fp32 and everything here is computed in fp32 whatever the model's
dtype (the streams are cast once where the coefficients are applied).  Under
DeepSpeed's bf16 the module's copy of every parameter is cast to bf16 (the fp32
master copy lives in the ZeRO optimizer), so the weights are read back as fp32.

Initialization: ``W`` is drawn from ``N(0, init_std)``, scales start at 1 and
biases at 0.  With ``W = 0`` every stream would get the same coefficients and
streams that start equal (the copied embedding) would stay equal forever; the
random projection breaks that symmetry from the first token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

HC_EPS = 1e-6   # RMS of the flattened streams, the ``pre`` floor and Sinkhorn's denominators


def sinkhorn(logits: torch.Tensor, iters: int, eps: float = HC_EPS) -> torch.Tensor:
    """Row softmax of ``logits [..., n, n]``, then ``iters`` x (column, row) normalization."""
    comb = torch.softmax(logits, dim=-1)
    for _ in range(iters):
        comb = comb / (comb.sum(dim=-2, keepdim=True) + eps)
        comb = comb / (comb.sum(dim=-1, keepdim=True) + eps)
    return comb


def expand_streams(hidden: torch.Tensor, n: int) -> torch.Tensor:
    """``[..., H]`` -> ``[..., n*H]``: the embedding copied into ``n`` streams (stream-major)."""
    return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], n, hidden.shape[-1]).flatten(-2)


class _StreamProjection(nn.Module):
    """``(flatten(X) . W^T) * rsqrt(mean(flatten(X)^2) + eps)`` with an fp32 ``W [out, n*H]``."""

    def __init__(self, n: int, hidden_size: int, out_features: int, init_std: float, sequence_parallel: bool):
        super().__init__()
        self.n, self.hidden_size = n, hidden_size
        self.weight = nn.Parameter(torch.empty(out_features, n * hidden_size, dtype=torch.float32))
        nn.init.normal_(self.weight, std=init_std)
        setattr(self.weight, "sequence_parallel", sequence_parallel)

    def project(self, streams: torch.Tensor) -> torch.Tensor:
        """``streams [..., n, H]`` -> logits ``[..., out]`` (fp32)."""
        x = streams.flatten(-2).float()
        return F.linear(x, self.weight.float()) * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + HC_EPS)


class HyperConnection(_StreamProjection):
    """The mixing of one sublayer: ``forward(X [..., n, H]) -> (pre [..., n], post [..., n], comb [..., n, n])``."""

    def __init__(self, n: int, hidden_size: int, sinkhorn_iters: int = 20, init_std: float = 0.02,
                 sequence_parallel: bool = False):
        super().__init__(n, hidden_size, 2 * n + n * n, init_std, sequence_parallel)
        self.sinkhorn_iters = sinkhorn_iters
        # One learned scale per part (pre, post, comb) and one bias per coefficient.
        self.scale = nn.Parameter(torch.ones(3, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(2 * n + n * n, dtype=torch.float32))
        for p in (self.scale, self.bias):
            setattr(p, "sequence_parallel", sequence_parallel)

    def forward(self, streams: torch.Tensor):
        n = self.n
        m = self.project(streams)
        m_pre, m_post, m_comb = m.split([n, n, n * n], dim=-1)
        b_pre, b_post, b_comb = self.bias.float().split([n, n, n * n])
        s = self.scale.float()
        pre = torch.sigmoid(m_pre * s[0] + b_pre) + HC_EPS
        post = 2.0 * torch.sigmoid(m_post * s[1] + b_post)
        comb = sinkhorn((m_comb * s[2] + b_comb).unflatten(-1, (n, n)), self.sinkhorn_iters)
        return pre, post, comb

    def apply_to(self, streams: torch.Tensor, sublayer) -> torch.Tensor:
        """``X' [..., n, H]`` of the sublayer ``sublayer(y [..., H]) -> [..., H]`` (the norm is its business)."""
        pre, post, comb = self(streams)
        x = streams.float()
        y = (pre.unsqueeze(-1) * x).sum(dim=-2)
        out = sublayer(y.to(streams.dtype)).float()
        mixed = torch.einsum("...ij,...ih->...jh", comb, x)
        return (post.unsqueeze(-1) * out.unsqueeze(-2) + mixed).to(streams.dtype)

    def extra_repr(self) -> str:
        return f"n={self.n}, hidden_size={self.hidden_size}, sinkhorn_iters={self.sinkhorn_iters}"


class StreamCollapse(_StreamProjection):
    """``X [..., n, H] -> sum_i w_i X_i`` with ``w = sigmoid(m * s + b) + eps`` (before the final norm)."""

    def __init__(self, n: int, hidden_size: int, init_std: float = 0.02, sequence_parallel: bool = False):
        super().__init__(n, hidden_size, n, init_std, sequence_parallel)
        self.scale = nn.Parameter(torch.ones(1, dtype=torch.float32))
        self.bias = nn.Parameter(torch.zeros(n, dtype=torch.float32))
        for p in (self.scale, self.bias):
            setattr(p, "sequence_parallel", sequence_parallel)

    def forward(self, streams: torch.Tensor) -> torch.Tensor:
        w = torch.sigmoid(self.project(streams) * self.scale.float() + self.bias.float()) + HC_EPS
        return (w.unsqueeze(-1) * streams.float()).sum(dim=-2).to(streams.dtype)


class CollapseAndNorm(nn.Module):
    """The decoder's final norm under mHC: collapse the ``n`` streams of ``[S, B, n*H]``, then normalize.

    Built by megatron's ``TransformerBlock`` where its final layernorm goes (same
    constructor arguments); ``norm`` is the backend's norm class.
    """

    def __init__(self, config, hidden_size: int, eps: float = 1e-5, *, norm: type, hc_mult: int):
        super().__init__()
        self.hc_mult = hc_mult
        self.collapse = StreamCollapse(hc_mult, hidden_size, init_std=config.init_method_std,
                                       sequence_parallel=bool(config.sequence_parallel))
        self.norm = norm(config=config, hidden_size=hidden_size, eps=eps)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.norm(self.collapse(hidden.unflatten(-1, (self.hc_mult, -1))))
