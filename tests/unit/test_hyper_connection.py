"""mHC residual streams against an independent statement of the equations, and inside the backbone.

The oracle below is written from the equations (docs/architecture.md, "mHC residual
streams") with scalar loops over tokens, streams and matrix entries: no ``einsum``,
no batched softmax, no code of ``engram_train.model.hyper_connection``.  Forward
values and the gradients of the streams and of every mixing parameter must agree.
"""

from __future__ import annotations

import math

import pytest
import torch

from engram_train.config.schema import EngramConfig, ModelConfig, ParallelConfig
from engram_train.model.hyper_connection import HyperConnection, StreamCollapse, expand_streams

EPS = 1e-6


def _sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def _mixing_oracle(x, W, scale, bias, n, iters):
    """pre [n], post [n], comb [n][n] (lists of 0-d tensors) of one token's streams ``x [n, H]``."""
    flat = x.reshape(-1)
    rms = torch.sqrt(sum(v * v for v in flat) / flat.numel() + EPS)
    m = [sum(W[k, c] * flat[c] for c in range(flat.numel())) / rms for k in range(2 * n + n * n)]
    pre = [_sigmoid(m[i] * scale[0] + bias[i]) + EPS for i in range(n)]
    post = [2.0 * _sigmoid(m[n + i] * scale[1] + bias[n + i]) for i in range(n)]
    logits = [[m[2 * n + i * n + j] * scale[2] + bias[2 * n + i * n + j] for j in range(n)] for i in range(n)]
    comb = []
    for i in range(n):                                           # row softmax
        top = max(float(v.detach()) for v in logits[i])
        e = [torch.exp(v - top) for v in logits[i]]
        total = sum(e)
        comb.append([v / total for v in e])
    for _ in range(iters):                                       # column, then row normalization
        cols = [sum(comb[i][j] for i in range(n)) for j in range(n)]
        comb = [[comb[i][j] / (cols[j] + EPS) for j in range(n)] for i in range(n)]
        rows = [sum(comb[i]) for i in range(n)]
        comb = [[comb[i][j] / (rows[i] + EPS) for j in range(n)] for i in range(n)]
    return pre, post, comb


def _hc_oracle(X, W, scale, bias, n, iters, sublayer):
    S, B = X.shape[:2]
    out = [[None] * B for _ in range(S)]
    for s in range(S):
        for b in range(B):
            x = X[s, b]
            pre, post, comb = _mixing_oracle(x, W, scale, bias, n, iters)
            y = sum(pre[i] * x[i] for i in range(n))
            f = sublayer(y)
            out[s][b] = torch.stack([post[j] * f + sum(comb[i][j] * x[i] for i in range(n)) for j in range(n)])
    return torch.stack([torch.stack(row) for row in out])


def _randomized(module, seed):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5 + (1.0 if p is module.scale else 0.0))
    return module


@pytest.mark.parametrize("n", [1, 2, 4])
def test_hyper_connection_equals_the_equations(n):
    H, S, B, iters = 6, 3, 2, 20
    hc = _randomized(HyperConnection(n, H, sinkhorn_iters=iters), seed=n)
    g = torch.Generator().manual_seed(10 + n)
    X = torch.randn(S, B, n, H, generator=g, requires_grad=True)
    F = torch.randn(H, H, generator=g) / math.sqrt(H)
    sublayer = lambda y: torch.tanh(y @ F)                                   # noqa: E731

    out = hc.apply_to(X, sublayer)
    W, scale, bias = (p.detach().clone().requires_grad_(True) for p in (hc.weight, hc.scale, hc.bias))
    X2 = X.detach().clone().requires_grad_(True)
    ref = _hc_oracle(X2, W, scale, bias, n, iters, sublayer)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)

    probe = torch.randn(out.shape, generator=g)
    (out * probe).sum().backward()
    (ref * probe).sum().backward()
    for ours, theirs, name in [(X.grad, X2.grad, "streams"), (hc.weight.grad, W.grad, "W"),
                               (hc.scale.grad, scale.grad, "scale"), (hc.bias.grad, bias.grad, "bias")]:
        torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-5, msg=f"gradient of {name}")
    assert X.grad.abs().max() > 0 and hc.weight.grad.abs().max() > 0


def test_sinkhorn_makes_the_mixing_doubly_stochastic():
    hc = _randomized(HyperConnection(4, 8, sinkhorn_iters=20), seed=3)
    X = torch.randn(5, 2, 4, 8)
    _, _, comb = hc(X)
    torch.testing.assert_close(comb.sum(-1), torch.ones(5, 2, 4), atol=1e-5, rtol=0)   # rows: exact
    assert (comb > 0).all()
    col_error = {}
    for iters in (0, 1, 20, 200):
        other = HyperConnection(4, 8, sinkhorn_iters=iters) if iters else None
        if other is None:
            other = HyperConnection(4, 8, sinkhorn_iters=1)
            other.sinkhorn_iters = 0          # the row softmax alone
        other.load_state_dict(hc.state_dict())
        col_error[iters] = (other(X)[2].sum(-2) - 1).abs().max().item()
    # columns approach 1 as the iterations go (approximately doubly stochastic at the default 20)
    assert col_error[0] > col_error[1] > col_error[20] > col_error[200], col_error
    assert col_error[20] < 0.1 and col_error[200] < 1e-3, col_error


@pytest.mark.parametrize("n", [1, 2, 4])
def test_stream_collapse_equals_the_equations(n):
    H = 5
    col = _randomized(StreamCollapse(n, H), seed=7 + n)
    X = torch.randn(2, 3, n, H, requires_grad=True)
    out = col(X)
    W, scale, bias = (p.detach().clone().requires_grad_(True) for p in (col.weight, col.scale, col.bias))
    X2 = X.detach().clone().requires_grad_(True)
    rows = []
    for s in range(2):
        row = []
        for b in range(3):
            flat = X2[s, b].reshape(-1)
            rms = torch.sqrt(sum(v * v for v in flat) / flat.numel() + EPS)
            w = [_sigmoid(sum(W[i, c] * flat[c] for c in range(flat.numel())) / rms * scale[0] + bias[i]) + EPS
                 for i in range(n)]
            row.append(sum(w[i] * X2[s, b, i] for i in range(n)))
        rows.append(torch.stack(row))
    ref = torch.stack(rows)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)
    out.sum().backward()
    ref.sum().backward()
    torch.testing.assert_close(X.grad, X2.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(col.weight.grad, W.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(col.bias.grad, bias.grad, rtol=1e-4, atol=1e-6)


def test_expand_streams_copies_the_embedding():
    h = torch.randn(3, 2, 5)
    x = expand_streams(h, 4)
    assert x.shape == (3, 2, 20)
    for i in range(4):
        assert torch.equal(x[..., i * 5:(i + 1) * 5], h)


# ---- inside the backbone -------------------------------------------------------------------------

B, T, VOCAB = 2, 12, 100
TABLE_SIZES = {0: [31, 37, 41, 43], 2: [47, 53, 59, 61]}


@pytest.fixture(scope="module")
def parallel():
    from engram_train.parallel.state import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=1234)
    yield
    destroy_parallel()


def _build(hc_mult=4, recompute="none", seed=0, **model_kw):
    from engram_train.model.gpt import build_model
    from engram_train.parallel.parallelize import parallelize

    torch.manual_seed(seed)
    model = ModelConfig(num_layers=3, hidden_size=32, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=48, max_seq_length=T, num_experts=4, moe_ffn_hidden_size=16,
                        moe_router_topk=2, moe_layer_freq=2, hc_mult=hc_mult, recompute=recompute, **model_kw)
    engram = EngramConfig(layer_ids=[0, 2], max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=16)
    return parallelize(build_model(model, engram, ParallelConfig(), VOCAB, TABLE_SIZES), 1234)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    pos = torch.arange(T).expand(B, T)
    hash_ids = {l: torch.randint(0, min(s), (B, T, 4), generator=g) for l, s in TABLE_SIZES.items()}
    return tokens, pos, labels, hash_ids


def test_engram_at_four_streams_follows_the_reference_rules(parallel):
    """At every Engram layer the block's per-stream output (branch g gated by stream g, the reference's
    rules: ``RefEngram``) is added to each stream before the attention sublayer's mixing."""
    from tests.unit.test_engram_block import RefEngram

    model = _build(hc_mult=4)
    layers = model.gpt.decoder.layers
    for blk in model.engram_blocks().values():
        with torch.no_grad():
            blk.conv.weight.normal_(0.0, 0.3)          # the conv starts at zero: make it count
    seen = {}
    hooks = []
    for i in (0, 2):
        hooks.append(layers[i].register_forward_pre_hook(
            lambda m, a, kw, i=i: seen.__setitem__(("in", i), kw["hidden_states"]), with_kwargs=True))
        hooks.append(layers[i].attn_hc.register_forward_pre_hook(
            lambda m, a, i=i: seen.__setitem__(("mix", i), a[0])))
    emb = {}
    hooks.append(model.gpt.embedding.register_forward_hook(lambda m, a, out: emb.__setitem__("out", out)))
    tokens, pos, labels, hash_ids = _batch()
    with torch.no_grad():
        model(tokens, pos, labels, hash_ids)
    for h in hooks:
        h.remove()

    H = 32
    assert seen[("in", 0)].shape == (T, B, H)                     # the embedding enters layer 0 ...
    assert torch.equal(seen[("in", 0)], emb["out"])
    assert seen[("in", 2)].shape == (T, B, 4 * H)                 # ... and streams leave it
    for i in (0, 2):
        blk = model.engram_blocks()[i]
        ref = RefEngram(H, 4, TABLE_SIZES[i], 16, 2, 3)
        ref.load_state_dict(dict(blk.reference_state_dict(), **{
            "multi_head_embedding.offsets": torch.tensor([sum(TABLE_SIZES[i][:k]) for k in range(4)])}))
        x = seen[("in", i)]
        streams = torch.stack([x] * 4, dim=2) if i == 0 else x.unflatten(-1, (4, H))   # [S, B, 4, H]
        with torch.no_grad():
            expected = streams + ref(streams.transpose(0, 1), hash_ids[i]).transpose(0, 1)
        torch.testing.assert_close(seen[("mix", i)], expected, rtol=1e-5, atol=1e-6)
        assert (expected - streams).abs().max() > 1e-3


def test_four_streams_train_and_every_parameter_learns(parallel):
    model = _build(hc_mult=4)
    assert type(model.gpt.decoder.final_layernorm).__name__ == "CollapseAndNorm"
    names = [n for n, _ in model.named_parameters()]
    assert sum(".attn_hc." in n or ".mlp_hc." in n for n in names) == 3 * 2 * 3   # layers x sublayers x (W, s, b)
    batch = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for _ in range(4):
        loss = model(*batch).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # (an expert may receive no token in a step of 24 tokens: experts are left out)
    missing = [n for n, p in model.named_parameters()
               if ".local_experts." not in n and (p.grad is None or not p.grad.abs().max() > 0)]
    assert not missing, missing


@pytest.mark.parametrize("hc_mult", [1, 4])
def test_recompute_gives_the_same_values_and_gradients(parallel, hc_mult):
    """``selective`` and ``full`` recompute change memory, not numbers: bit for bit in fp32, with dropout
    on (the replay must restore the CPU generator and megatron's tracker streams) and expert-bias
    routing (tokens counted once, in the replay)."""
    from engram_train.model.layer import BackboneLayer
    from engram_train.platform.cpu_backend import cpu_model_parallel_manual_seed

    kw = dict(hidden_dropout=0.1, attention_dropout=0.1, moe_router_score_function="sigmoid",
              moe_router_enable_expert_bias=True, moe_router_load_balancing_type="none")
    runs = {}
    for recompute in ("none", "selective", "full"):
        cpu_model_parallel_manual_seed(1234)      # the same RNG streams for every run
        model = _build(hc_mult=hc_mult, recompute=recompute, **kw)
        model.train()
        loss = model(*_batch()).mean()
        loss.backward()
        counts = [l.mlp.router.local_tokens_per_expert.clone() for l in model.gpt.decoder.layers
                  if hasattr(l.mlp, "router")]
        runs[recompute] = (loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}, counts)

    cpu_model_parallel_manual_seed(1234)
    full = _build(hc_mult=hc_mult, recompute="full", **kw)
    assert all(type(l) is BackboneLayer and l.recompute for l in full.gpt.decoder.layers)
    calls = []
    for layer in full.gpt.decoder.layers:      # every layer's attention runs again in backward
        layer.self_attention.register_forward_hook(lambda m, a, o: calls.append(torch.is_grad_enabled()))
    full(*_batch()).mean().backward()
    assert calls == [False] * 3 + [True] * 3, calls
    for recompute in ("selective", "full"):
        assert torch.equal(runs[recompute][0], runs["none"][0])
        for name, grad in runs["none"][1].items():
            assert torch.equal(runs[recompute][1][name], grad), (recompute, name)
        # the routers counted each token once: B*T tokens x top-2 per MoE layer
        assert [c.sum().item() for c in runs[recompute][2]] == [B * T * 2] * 2
        assert all(torch.equal(a, b) for a, b in zip(runs[recompute][2], runs["none"][2]))
    # dropout is on: another RNG state gives another loss (the comparison above is not vacuous)
    cpu_model_parallel_manual_seed(4321)
    other = _build(hc_mult=hc_mult, recompute="none", **kw)
    assert not torch.equal(other(*_batch()).mean().detach(), runs["none"][0])
