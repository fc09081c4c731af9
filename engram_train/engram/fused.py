"""The Engram block's elementwise math as two hand-written autograd functions.

At Engram's sizes (hidden 128-4096, a few thousand tokens a micro-batch) the block's
elementwise work over ``[B, T, G, H]`` costs as much as its matmuls.  Composed from
torch ops, each RMSNorm, the gate and the short conv are a dozen passes over that
tensor each way, autograd keeps most intermediates, and on CPU oneDNN's depthwise
conv backward alone costs more than the rest of the block.  These functions compute
the same values in a few passes and save only what their closed-form backward reads
(for ``y = x r w`` with ``r = rsqrt(mean(x^2) + eps)``: ``dx = r (w dy - xhat
mean(xhat w dy))``, ``dw = sum(dy xhat)``, ``xhat = x r``):

``engram_gate(key, query, key_weight, query_weight, key_eps, query_eps)``
    ``alpha = sigmoid(sign(g) sqrt(max(|g|, floor)))`` with ``g = RMSNorm_k(key) .
    RMSNorm_q(query) / sqrt(H)``, from the key projection and the hidden states.  The
    normalized key and query are never formed: ``g = r_k r_q sum(key query w_k w_q) /
    sqrt(H)``.  Where ``|g| < floor`` no gradient flows (autograd's ``clamp_min`` rule:
    it passes where ``|g| >= floor``).
``short_conv(x, norm_weight, conv_weight, eps, dilation)``
    ``SiLU(causal depthwise conv(RMSNorm(x)))`` in the ``[B, T, G*H]`` layout: the conv
    is ``K`` shifted multiply-adds along T (tap ``k`` reads ``t - (K-1-k) dilation``;
    positions before the sequence read zero), no transposes, no padded copy.  The conv
    weight is the ``nn.Conv1d`` parameter's ``[C, 1, K]`` tensor.

Low-precision inputs are computed in float32 and the results cast back; a norm's eps
of None is its input dtype's (``nn.RMSNorm``'s default, e.g. ``finfo(bfloat16).eps``).
tests/unit/test_engram_fused.py pins each function against plain autograd,
tests/unit/test_engram_block.py the whole block against an independent reference.
"""

from __future__ import annotations

import math
from typing import Optional

import torch

GATE_FLOOR = 1e-6                  # |g| floor before the signed square root


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def _rstd(x: torch.Tensor, eps: float) -> torch.Tensor:
    """The reciprocal RMS over the last dim, keepdim."""
    return torch.linalg.vector_norm(x, dim=-1, keepdim=True).square_().div_(x.shape[-1]).add_(eps).rsqrt_()


class _Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, key, query, key_weight, query_weight, key_eps, query_eps):
        G, H = key.shape[-2:]
        k, q = _f32(key), _f32(query)
        wk, wq = _f32(key_weight).view(G, H), _f32(query_weight).view(G, H)
        rk, rq = _rstd(k, key_eps), _rstd(q, query_eps)                   # [..., G, 1]
        # (k rk wk) . (q rq wq) = rk rq sum(k q wk wq): the normalized key and query are never formed
        s = torch.mul(k, wk * wq).mul_(q).sum(-1, keepdim=True)
        g = (s * rk * rq).div_(math.sqrt(H)).squeeze(-1)
        root = g.abs().clamp_min_(GATE_FLOOR).sqrt_()                     # sqrt(max(|g|, floor))
        alpha = (root * g.sign()).sigmoid_()
        ctx.save_for_backward(k, q, wk, wq, rk, rq, s, g, root, alpha)
        ctx.dtypes = (key.dtype, query.dtype, key_weight.dtype, query_weight.dtype)
        return alpha.to(key.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable   # the closed form is not itself differentiated
    def backward(ctx, dalpha):
        k, q, wk, wq, rk, rq, s, g, root, alpha = ctx.saved_tensors
        H = k.shape[-1]
        # d alpha/d g = alpha (1 - alpha) sign(g)^2 1[|g| >= floor] / (2 sqrt(|g|)); autograd's clamp_min
        # passes the gradient where |g| >= floor, and sign(g)^2 = 1 there
        dg = (_f32(dalpha) * alpha * (1 - alpha) / root).masked_fill_(g.abs() < GATE_FLOOR, 0.0)
        a = (dg.unsqueeze(-1) * rk * rq).div_(2 * math.sqrt(H))          # d/d(sum k q wk wq), [..., G, 1]
        # through each reciprocal RMS: d rk/d k = -rk^3 k / H
        dk = dq = dwk = dwq = None
        if ctx.needs_input_grad[0]:
            dk = torch.mul(q, wk * wq).mul_(a).addcmul_(k, -a * s * rk * rk / H).to(ctx.dtypes[0])
        if ctx.needs_input_grad[1]:
            dq = torch.mul(k, wk * wq).mul_(a).addcmul_(q, -a * s * rq * rq / H).to(ctx.dtypes[1])
        if ctx.needs_input_grad[2] or ctx.needs_input_grad[3]:
            p = torch.mul(k, q).mul_(a).sum(tuple(range(k.ndim - 2)))       # d/d(wk wq), [G, H]
            dwk = (p * wq).reshape(-1).to(ctx.dtypes[2])
            dwq = (p * wk).reshape(-1).to(ctx.dtypes[3])
        return dk, dq, dwk, dwq, None, None


def engram_gate(key: torch.Tensor, query: torch.Tensor, key_weight: torch.Tensor, query_weight: torch.Tensor,
                key_eps: Optional[float] = None, query_eps: Optional[float] = None) -> torch.Tensor:
    """The gate ``alpha [..., G]`` from the key projection and the hidden states ``[..., G, H]``, each through
    its RMSNorm (weights ``[G*H]``; ``eps=None``: the input dtype's eps)."""
    if key.shape != query.shape or key.ndim < 3:   # the weight gradients sum over the leading dims
        raise ValueError(f"engram_gate: key and query must have one shape [..., G, H] with a leading dim; "
                         f"got {tuple(key.shape)} and {tuple(query.shape)}")
    return _Gate.apply(key, query, key_weight, query_weight,
                       torch.finfo(key.dtype).eps if key_eps is None else float(key_eps),
                       torch.finfo(query.dtype).eps if query_eps is None else float(query_eps))


def _causal_taps(T: int, K: int, dilation: int):
    """``(k, shift)`` of each conv tap that reaches inside a sequence of length T (tap K-1 reads t itself)."""
    return [(k, (K - 1 - k) * dilation) for k in range(K) if (K - 1 - k) * dilation < T]


class _ShortConv(torch.autograd.Function):
    # With xhat = x r (the unweighted normalized input) the norm weight folds into each tap's weight,
    # z = sum_k (w_k wn) xhat[t - s_k]; backward reuses the sums S_k = sum_{b,t} dz[t] xhat[t - s_k]:
    # dW_k = wn S_k and d wn = sum_k w_k S_k, and the norm's backward starts from d xhat.
    @staticmethod
    def forward(ctx, x, norm_weight, conv_weight, eps, dilation):
        B, T, G, H = x.shape
        xf = _f32(x)
        wn = _f32(norm_weight)                                            # [C]
        wc = _f32(conv_weight)[:, 0, :].t().contiguous()                  # [K, C]: each tap contiguous
        wt = wc * wn                                                      # the taps on xhat
        K = wc.shape[0]
        r = _rstd(xf, eps)
        xhat = torch.mul(xf, r).reshape(B, T, G * H)
        z = torch.mul(xhat, wt[K - 1])
        for k, s in _causal_taps(T, K, dilation):
            if s:
                z[:, s:].addcmul_(xhat[:, :T - s], wt[k])
        ctx.save_for_backward(r, wn, wc, wt, xhat, z)
        ctx.meta = (dilation, x.dtype, norm_weight.dtype, conv_weight.dtype)
        return torch.nn.functional.silu(z).view(B, T, G, H).to(x.dtype)

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dy):
        r, wn, wc, wt, xhat, z = ctx.saved_tensors
        dilation, x_dtype, wn_dtype, wc_dtype = ctx.meta
        B, T, C = xhat.shape
        G = r.shape[-2]
        K = wc.shape[0]
        dz = torch.ops.aten.silu_backward(_f32(dy).reshape(B, T, C), z)
        taps = _causal_taps(T, K, dilation)
        dwc = dwn = dx = None
        if ctx.needs_input_grad[1] or ctx.needs_input_grad[2]:
            sums = wc.new_zeros(wc.shape)                                 # S_k, [K, C]
            for k, s in taps:
                sums[k] = torch.mul(dz[:, s:], xhat[:, :T - s]).sum((0, 1))
            if ctx.needs_input_grad[2]:
                dwc = (sums * wn).t().unsqueeze(1).to(wc_dtype).contiguous()
            if ctx.needs_input_grad[1]:
                dwn = (sums * wc).sum(0).to(wn_dtype)
        if ctx.needs_input_grad[0]:
            dxhat = torch.mul(dz, wt[K - 1])
            for k, s in taps:
                if s:
                    dxhat[:, :T - s].addcmul_(dz[:, s:], wt[k])
            xh, dxh = xhat.view(B, T, G, -1), dxhat.view(B, T, G, -1)
            # dx = r (dxhat - xhat mean(xhat dxhat)), the RMSNorm's closed form
            dot = torch.linalg.vecdot(xh, dxh, dim=-1).unsqueeze(-1).div_(-xh.shape[-1])
            dx = torch.addcmul(dxh, xh, dot).mul_(r).to(x_dtype)
        return dx, dwn, dwc, None, None


def short_conv(x: torch.Tensor, norm_weight: torch.Tensor, conv_weight: torch.Tensor, eps: Optional[float],
               dilation: int) -> torch.Tensor:
    """``SiLU(causal depthwise conv(rms_norm(x)))``: ``x [B, T, G, H]``, ``norm_weight [G*H]``,
    ``conv_weight [G*H, 1, K]`` (an ``nn.Conv1d(groups=G*H, bias=False)`` weight); ``eps=None``: the input
    dtype's eps."""
    return _ShortConv.apply(x, norm_weight, conv_weight, torch.finfo(x.dtype).eps if eps is None else float(eps),
                            int(dilation))
