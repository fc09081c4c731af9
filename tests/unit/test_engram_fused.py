"""The Engram block's hand-written autograd functions against plain autograd over torch ops.

Each reference below is the textbook composition (``F.rms_norm``, the gate's formula with
``clamp_min``, a left-padded grouped ``F.conv1d`` on the transposed layout), written here and
differentiated by autograd; values and every gradient must agree, including the gate's floor
region (where autograd's ``clamp_min`` passes no gradient), sequences shorter than the conv's
receptive field, and hidden states in the model's transposed ``[S, B]`` layout.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engram_train.engram.fused import GATE_FLOOR, engram_gate, short_conv


def ref_gate(key, query, wk, wq, eps_k, eps_q):
    G, H = key.shape[-2:]
    k = F.rms_norm(key, (H,), eps=eps_k) * wk.view(G, H)
    q = F.rms_norm(query, (H,), eps=eps_q) * wq.view(G, H)
    g = (k * q).sum(-1) / math.sqrt(H)
    return (g.abs().clamp_min(1e-6).sqrt() * g.sign()).sigmoid()


def ref_short_conv(x, wn, wc, eps, dilation):
    B, T, G, H = x.shape
    K = wc.shape[-1]
    y = (F.rms_norm(x, (H,), eps=eps) * wn.view(G, H)).reshape(B, T, G * H).transpose(1, 2)
    y = F.conv1d(F.pad(y, ((K - 1) * dilation, 0)), wc, groups=G * H, dilation=dilation)
    return F.silu(y).transpose(1, 2).reshape(B, T, G, H)


def leaves(*tensors):
    return [t.detach().clone().requires_grad_(True) for t in tensors]


def transposed_hidden(B, T, G, H, dtype=torch.float32, seed=0):
    """Hidden states as the model hands them to the block: a [B, T, G, H] view of [T, B, G*H]."""
    g = torch.Generator().manual_seed(seed)
    return torch.randn(T, B, G * H, generator=g, dtype=dtype).transpose(0, 1).unflatten(-1, (G, H))


def check(ours, ref, inputs_ours, inputs_ref, tol, seed=5):
    torch.testing.assert_close(ours, ref, rtol=tol, atol=tol)
    cot = torch.randn(ref.shape, generator=torch.Generator().manual_seed(seed), dtype=ref.dtype)
    gi_ours = torch.autograd.grad(ours, inputs_ours, cot)
    gi_ref = torch.autograd.grad(ref, inputs_ref, cot)
    for i, (a, b) in enumerate(zip(gi_ours, gi_ref)):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol, msg=f"gradient of input {i}")
    return gi_ours


@pytest.mark.parametrize("G, eps", [(1, None), (3, 1e-5)])
def test_gate_equals_autograd_with_transposed_hidden(G, eps):
    B, T, H = 2, 5, 16
    g = torch.Generator().manual_seed(1)
    key = torch.randn(B, T, G, H, generator=g)
    wk, wq = 1 + 0.3 * torch.randn(G * H, generator=g), 1 + 0.3 * torch.randn(G * H, generator=g)
    query = transposed_hidden(B, T, G, H)
    assert not query.is_contiguous()
    ours_in, ref_in = leaves(key, wk, wq), leaves(key, wk, wq)
    q_ours = query.detach().requires_grad_(True)        # a leaf, still the transposed layout
    q_ref = query.detach().clone().requires_grad_(True)
    e = torch.finfo(torch.float32).eps if eps is None else eps
    alpha = engram_gate(ours_in[0], q_ours, ours_in[1], ours_in[2], eps, eps)
    want = ref_gate(ref_in[0], q_ref, ref_in[1], ref_in[2], e, e)
    assert alpha.shape == (B, T, G)
    check(alpha, want, [ours_in[0], q_ours, ours_in[1], ours_in[2]], [ref_in[0], q_ref, ref_in[1], ref_in[2]], 1e-5)


def test_gate_floor_region_passes_no_gradient_like_clamp_min():
    """Tokens whose |g| is 0, below the floor and above it: the floored ones output sigmoid(+-1e-3) and
    send no gradient to key or query (autograd's clamp_min rule), the others match autograd."""
    H = 4
    eps = 1e-12
    # key [1, 0, 0, 0] and query [d, 1, 0, 0] (unit weights): normalized [2, 0, 0, 0] and
    # [2d, 2, 0, 0] / sqrt(1 + d^2), so g = 2 d / sqrt(1 + d^2)
    ds = torch.tensor([0.0, 3e-7, -3e-7, 5e-6, -2e-5, 0.3], dtype=torch.float64)
    key = torch.zeros(1, len(ds), 1, H, dtype=torch.float64)
    key[..., 0] = 1.0
    query = torch.zeros(1, len(ds), 1, H, dtype=torch.float64)
    query[0, :, 0, 0], query[0, :, 0, 1] = ds, 1.0
    w = torch.ones(H, dtype=torch.float64)
    a, b = leaves(key, query), leaves(key, query)
    alpha = engram_gate(a[0], a[1], w, w, eps, eps)
    want = ref_gate(b[0], b[1], w, w, eps, eps)
    gk, gq = check(alpha, want, a, b, 1e-12)
    floored = torch.tensor([True, True, True, False, False, False])
    g = 2 * ds / torch.sqrt(1 + ds * ds)
    assert bool(((g.abs() < GATE_FLOOR) == floored).all())
    torch.testing.assert_close(alpha[0, :3, 0], torch.sigmoid(torch.tensor([0.0, 1e-3, -1e-3], dtype=torch.float64)))
    assert torch.count_nonzero(gk[0, floored]) == 0 and torch.count_nonzero(gq[0, floored]) == 0
    assert bool((gq[0, ~floored].abs().sum(-1) > 0).all())


@pytest.mark.parametrize("B, T, G, H, K, dilation", [
    (2, 13, 1, 8, 4, 3),      # every tap inside the sequence
    (3, 7, 2, 4, 4, 3),       # T shorter than the receptive field (1 + 3*3): the first taps read padding
    (2, 2, 2, 4, 4, 3),       # only the current token's tap
    (1, 9, 3, 4, 2, 2),       # another kernel and dilation
])
def test_short_conv_equals_autograd(B, T, G, H, K, dilation):
    g = torch.Generator().manual_seed(2)
    x = torch.randn(B, T, G, H, generator=g)
    wn = 1 + 0.3 * torch.randn(G * H, generator=g)
    wc = 0.5 * torch.randn(G * H, 1, K, generator=g)
    a, b = leaves(x, wn, wc), leaves(x, wn, wc)
    y = short_conv(*a, 1e-5, dilation)
    check(y, ref_short_conv(*b, 1e-5, dilation), a, b, 1e-5)


def test_short_conv_takes_a_transposed_input():
    x = transposed_hidden(2, 6, 2, 4, seed=3)
    wn, wc = torch.rand(8) + 0.5, torch.randn(8, 1, 4)
    a, b = leaves(wn, wc), leaves(wn, wc)
    xa, xb = x.detach().requires_grad_(True), x.detach().clone().requires_grad_(True)
    check(short_conv(xa, *a, 1e-5, 3), ref_short_conv(xb, *b, 1e-5, 3), [xa, *a], [xb, *b], 1e-5)


def test_gradcheck_float64():
    g = torch.Generator().manual_seed(4)
    key, query = torch.randn(2, 3, 2, 5, generator=g, dtype=torch.float64), transposed_hidden(2, 3, 2, 5, torch.float64)
    wk, wq = (1 + 0.3 * torch.randn(10, generator=g, dtype=torch.float64) for _ in range(2))
    ins = [t.detach().requires_grad_(True) for t in (key, query, wk, wq)]
    assert torch.autograd.gradcheck(lambda k, q, a, b: engram_gate(k, q, a, b, 1e-6, 1e-6), ins)
    x = torch.randn(2, 7, 2, 3, generator=g, dtype=torch.float64)
    wn = 1 + 0.3 * torch.randn(6, generator=g, dtype=torch.float64)
    wc = torch.randn(6, 1, 4, generator=g, dtype=torch.float64)
    ins = [t.detach().requires_grad_(True) for t in (x, wn, wc)]
    assert torch.autograd.gradcheck(lambda x, n, c: short_conv(x, n, c, 1e-5, 2), ins)


def test_bfloat16_inputs_compute_in_float32_and_return_bfloat16():
    g = torch.Generator().manual_seed(6)
    key, query = torch.randn(2, 5, 2, 8, generator=g), torch.randn(2, 5, 2, 8, generator=g)
    wk, wq, wn = (1 + 0.3 * torch.randn(16, generator=g) for _ in range(3))
    wc = 0.5 * torch.randn(16, 1, 4, generator=g)
    bf = [t.bfloat16().requires_grad_(True) for t in (key, query, wk, wq, wn, wc)]
    eps = torch.finfo(torch.bfloat16).eps          # eps=None: the input dtype's
    alpha = engram_gate(bf[0], bf[1], bf[2], bf[3])
    want = ref_gate(*(t.bfloat16().float() for t in (key, query, wk, wq)), eps, eps)
    assert alpha.dtype == torch.bfloat16
    torch.testing.assert_close(alpha.float(), want, rtol=1e-2, atol=1e-2)
    y = short_conv(bf[1], bf[4], bf[5], 1e-5, 3)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref_short_conv(*(t.bfloat16().float() for t in (query, wn, wc)), 1e-5, 3),
                               rtol=2e-2, atol=2e-2)
    (alpha.float().sum() + y.float().sum()).backward()
    for t in bf:
        assert t.grad.dtype == torch.bfloat16 and bool(torch.isfinite(t.grad.float()).all())


def test_each_norm_takes_its_own_eps_and_none_is_the_input_dtype_s():
    """Small inputs (RMS ~0.05, so an eps of 1e-2 moves the result): the key's eps is not the query's, and
    eps=None means the input dtype's eps (bfloat16's 2^-7), in the gate and in the short conv."""
    g = torch.Generator().manual_seed(8)
    key, query = 0.05 * torch.randn(2, 5, 2, 8, generator=g), 0.05 * torch.randn(2, 5, 2, 8, generator=g)
    wk, wq, wn = (1 + 0.3 * torch.randn(16, generator=g) for _ in range(3))
    wc = 0.5 * torch.randn(16, 1, 4, generator=g)
    ours_in, ref_in = leaves(key, query, wk, wq), leaves(key, query, wk, wq)
    check(engram_gate(*ours_in, 1e-2, 1e-6), ref_gate(*ref_in, 1e-2, 1e-6), ours_in, ref_in, 1e-5)
    assert not torch.allclose(engram_gate(key, query, wk, wq, 1e-6, 1e-2), ref_gate(key, query, wk, wq, 1e-2, 1e-6),
                              rtol=1e-3, atol=1e-3)   # the two eps matter here: swapping them shows
    bf = [t.bfloat16() for t in (key, query, wk, wq, wn, wc)]
    eps = torch.finfo(torch.bfloat16).eps
    f32 = [t.float() for t in bf]
    torch.testing.assert_close(engram_gate(*bf[:4]).float(), ref_gate(*f32[:4], eps, eps), rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(short_conv(bf[1], bf[4], bf[5], None, 3).float(),
                               ref_short_conv(f32[1], f32[4], f32[5], eps, 3), rtol=2e-2, atol=2e-2)
    # float32's eps instead would be off by far more than bfloat16's rounding at this scale
    assert not torch.allclose(ref_gate(*f32[:4], eps, eps), ref_gate(*f32[:4], 1.2e-7, 1.2e-7), rtol=2e-2, atol=2e-2)


def test_double_backward_is_refused_and_shapes_are_checked():
    """Second derivatives through the closed-form backwards raise instead of coming out wrong (the
    cotangent requires grad, as in gradgradcheck)."""
    g = torch.Generator().manual_seed(9)
    key, query = (torch.randn(2, 3, 1, 4, generator=g, requires_grad=True) for _ in range(2))
    w = torch.ones(4, requires_grad=True)
    alpha = engram_gate(key, query, w, w, 1e-6, 1e-6)
    (dk,) = torch.autograd.grad(alpha, [key], torch.ones_like(alpha, requires_grad=True), create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        dk.sum().backward()
    wc = torch.randn(4, 1, 4, requires_grad=True)
    y = short_conv(query, w, wc, 1e-5, 2)
    (dx,) = torch.autograd.grad(y, [query], torch.ones_like(y, requires_grad=True), create_graph=True)
    with pytest.raises(RuntimeError, match="twice"):
        dx.sum().backward()
    with pytest.raises(ValueError, match="one shape"):
        engram_gate(key[0, 0], query[0, 0], w, w)
    with pytest.raises(ValueError, match="one shape"):
        engram_gate(key, query[:, :1], w, w)
