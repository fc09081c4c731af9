"""DeepSeekMoE routing and multi-latent attention in one CPU process (issue 15).

The routing oracle is DeepSeek-V3's rule written out in plain torch from the router's and experts'
weights (never megatron's functions): scores ``s = sigmoid(x W_r^T)``; the top-k experts by ``s + b``
(the expert bias chooses, it never weights); weights ``s_e / sum_topk s`` times the scaling factor; the
layer's output ``shared(x) + sum_e w_e expert_e(x)`` with SwiGLU experts.  The balancing oracle is the
update ``b += rate * sign(mean load - load)`` over the tokens the training forwards routed.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engram_train.config.schema import EngramConfig, ModelConfig, ParallelConfig

B, T, VOCAB, H = 2, 16, 100, 64
E, TOPK, SCALE, RATE = 8, 3, 2.5, 0.01


@pytest.fixture(scope="module", autouse=True)
def parallel():
    from engram_train.parallel.state import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=1234)
    yield
    destroy_parallel()


def _model_cfg(**kw):
    base = dict(num_layers=2, hidden_size=H, num_attention_heads=4, ffn_hidden_size=96, max_seq_length=T,
                num_experts=E, moe_ffn_hidden_size=32, moe_router_topk=TOPK, moe_shared_expert_ffn_hidden_size=48,
                moe_router_score_function="sigmoid", moe_router_enable_expert_bias=True,
                moe_router_load_balancing_type="none", moe_router_bias_update_rate=RATE,
                moe_router_topk_scaling_factor=SCALE, attention="mla", q_lora_rank=32, kv_lora_rank=24,
                qk_head_dim=16, qk_pos_emb_head_dim=8, v_head_dim=12)
    base.update(kw)
    return ModelConfig(**base)


def _build(**kw):
    from engram_train.model.gpt import build_model
    from engram_train.parallel.parallelize import parallelize

    torch.manual_seed(0)
    return parallelize(build_model(_model_cfg(**kw), EngramConfig(enabled=False), ParallelConfig(), VOCAB, None), 1)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    return tokens, torch.arange(T).expand(B, T), torch.randint(0, VOCAB, (B, T), generator=g)


def _swiglu(x, fc1, fc2):
    gate, up = fc1.chunk(2, dim=0)
    return (F.silu(x @ gate.t()) * (x @ up.t())) @ fc2.t()


def _capture_mlp_io(model):
    """``{layer index: (mlp input [S*B, H], mlp output [S*B, H])}`` of the next forward."""
    seen = {}

    def hook(i):
        def fn(_m, args, out):
            seen[i] = (args[0].detach().reshape(-1, H), out[0].detach().reshape(-1, H))
        return fn

    handles = [layer.mlp.register_forward_hook(hook(i)) for i, layer in enumerate(model.gpt.decoder.layers)]
    return seen, handles


def _route(x, router_w, bias):
    """DeepSeek-V3: ([tokens, TOPK] expert ids, [tokens, TOPK] weights)."""
    scores = torch.sigmoid(x @ router_w.t())
    chosen = torch.topk(scores + bias, TOPK, dim=1).indices
    s = scores.gather(1, chosen)
    return chosen, s / s.sum(dim=1, keepdim=True) * SCALE


def test_moe_layer_is_shared_experts_plus_sigmoid_bias_routed_experts():
    model = _build()
    with torch.no_grad():
        for layer in model.gpt.decoder.layers:   # a bias large enough to change choices
            layer.mlp.router.expert_bias.copy_(torch.linspace(-0.3, 0.3, E))
    seen, handles = _capture_mlp_io(model)
    model(*_batch())
    for h in handles:
        h.remove()
    changed = 0
    for i, layer in enumerate(model.gpt.decoder.layers):
        mlp = layer.mlp
        x, out = seen[i]
        chosen, w = _route(x, mlp.router.weight, mlp.router.expert_bias)
        changed += (chosen.sort(1).values != _route(x, mlp.router.weight, torch.zeros(E))[0].sort(1).values).any(1).sum()
        want = _swiglu(x, mlp.shared_experts.linear_fc1.weight, mlp.shared_experts.linear_fc2.weight)
        for e in range(E):
            ex = mlp.experts.local_experts[e]
            rows, slot = (chosen == e).nonzero(as_tuple=True)
            if rows.numel():
                want = want.index_add(0, rows, w[rows, slot, None] * _swiglu(x[rows], ex.linear_fc1.weight,
                                                                                 ex.linear_fc2.weight))
        torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-6)
    assert changed > 0, "the expert bias never changed a choice: the test would not see it ignored"


def test_expert_bias_moves_once_per_step_by_the_routed_load_and_not_in_evaluation():
    from engram_train.train.evaluate import forward_per_token

    model = _build()
    routers = [layer.mlp.router for layer in model.gpt.decoder.layers]
    start = [torch.randn(E, generator=torch.Generator().manual_seed(i)) * 0.05 for i in range(len(routers))]
    with torch.no_grad():
        for r, b in zip(routers, start):
            r.expert_bias.copy_(b)
    seen, handles = _capture_mlp_io(model)
    load = [torch.zeros(E) for _ in routers]
    for micro in range(2):   # two micro-batches of one optimizer step
        model(*_batch(micro)).mean().backward()
        for i, r in enumerate(routers):
            chosen, _ = _route(seen[i][0], r.weight, r.expert_bias)
            load[i] += torch.bincount(chosen.flatten(), minlength=E).float()
    model.eval()
    with torch.no_grad():   # evaluation routes tokens too, but must not count them
        forward_per_token(model, dict(tokens=_batch(5)[0], position_ids=_batch(5)[1], labels=_batch(5)[2]))
    model.train()
    for h in handles:
        h.remove()
    model.update_expert_bias()
    for r, b, n in zip(routers, start, load):
        assert n.sum() == 2 * B * T * TOPK
        want = b + RATE * torch.sign(n.mean() - n)
        assert torch.equal(r.expert_bias, want), (r.expert_bias, want)
        assert r.expert_bias.dtype == torch.float32
        assert torch.count_nonzero(r.local_tokens_per_expert) == 0   # the next step counts afresh
    moved = [r.expert_bias.clone() for r in routers]
    model.update_expert_bias()   # nothing routed since: every load equals the mean (0), sign 0
    assert all(torch.equal(r.expert_bias, m) for r, m in zip(routers, moved))


def test_update_expert_bias_is_a_no_op_without_the_bias():
    model = _build(moe_router_score_function="softmax", moe_router_enable_expert_bias=False,
                   moe_router_load_balancing_type="aux_loss")
    assert all(layer.mlp.router.expert_bias is None for layer in model.gpt.decoder.layers)
    before = {k: v.clone() for k, v in model.state_dict().items() if isinstance(v, torch.Tensor)}
    model.update_expert_bias()
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items() if isinstance(v, torch.Tensor))


def test_mla_model_trains_on_cpu_with_latent_norms():
    model = _build()
    attn = model.gpt.decoder.layers[0].self_attention
    assert type(attn).__name__ == "MLASelfAttention"
    assert type(attn.q_layernorm).__name__ == type(attn.kv_layernorm).__name__ == "RMSNorm"
    assert type(attn.rotary_pos_emb).__name__ == "RotaryEmbedding"   # plain RoPE, as DeepSeek-V3 pretrains
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    batch = _batch()
    losses = []
    for _ in range(3):
        opt.zero_grad()
        loss = model(*batch).mean()
        loss.backward()
        assert attn.linear_kv_down_proj.weight.grad.abs().sum() > 0
        assert attn.q_layernorm.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


def test_sdpa_core_attention_with_wider_query_key_heads_than_value_heads():
    """MLA hands the core attention q/k heads of qk_head_dim + qk_pos_emb_head_dim and value heads of
    v_head_dim; the CPU core attention must equal causal softmax(q k^T * scale) v."""
    from megatron.core.transformer.enums import AttnMaskType

    from engram_train.model.gpt import transformer_config
    from engram_train.platform.cpu_backend import SDPAttention

    cfg = transformer_config(_model_cfg(), ParallelConfig())
    scale = 0.37
    core = SDPAttention(cfg, 1, AttnMaskType.causal, "self", softmax_scale=scale, k_channels=24, v_channels=12)
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(T, B, 4, 24, generator=g), torch.randn(T, B, 4, 24, generator=g)
    v = torch.randn(T, B, 4, 12, generator=g)
    out = core(q, k, v, None)
    assert out.shape == (T, B, 4 * 12)
    want = torch.empty(T, B, 4, 12)
    for b in range(B):
        for n in range(4):
            logits = q[:, b, n] @ k[:, b, n].t() * scale
            logits = logits.masked_fill(torch.ones(T, T).triu(1).bool(), -math.inf)
            want[:, b, n] = logits.softmax(-1) @ v[:, b, n]
    torch.testing.assert_close(out, want.reshape(T, B, -1), rtol=1e-5, atol=1e-6)
    default = SDPAttention(cfg, 1, AttnMaskType.causal, "self", k_channels=24, v_channels=12)
    assert default.softmax_scale == pytest.approx(1 / math.sqrt(24))
