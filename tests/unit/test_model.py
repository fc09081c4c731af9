"""The Engram-MoE megatron backbone in one CPU process, and the CPU backend's pieces."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from engram_train.config.schema import ConfigError, EngramConfig, ModelConfig, ParallelConfig

B, T, VOCAB = 2, 16, 100
TABLE_SIZES = {0: [31, 37, 41, 43], 2: [47, 53, 59, 61]}


@pytest.fixture(scope="module", autouse=True)
def parallel():
    from engram_train.parallel.state import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=1234)
    yield
    destroy_parallel()


def _cfgs(**engram):
    model = ModelConfig(num_layers=3, hidden_size=64, num_attention_heads=4, num_query_groups=2,
                        ffn_hidden_size=96, max_seq_length=T, num_experts=4, moe_ffn_hidden_size=32,
                        moe_router_topk=2, moe_layer_freq=2)
    kw = dict(layer_ids=[0, 2], max_ngram=3, heads_per_ngram=2, n_embed_per_ngram=16)
    kw.update(engram)
    return model, EngramConfig(**kw), ParallelConfig()


def _build(**engram):
    from engram_train.model.gpt import build_model
    from engram_train.parallel.parallelize import parallelize

    torch.manual_seed(0)
    m, e, p = _cfgs(**engram)
    return parallelize(build_model(m, e, p, VOCAB, TABLE_SIZES), 1234)


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    pos = torch.arange(T).expand(B, T)
    hash_ids = {l: torch.randint(0, min(s), (B, T, 4), generator=g) for l, s in TABLE_SIZES.items()}
    return tokens, pos, labels, hash_ids


def test_loss_is_per_token_finite_and_decreases():
    model = _build()
    batch = _batch()
    opt = torch.optim.SGD(model.parameters(), lr=0.2)
    losses = []
    for _ in range(4):
        loss = model(*batch)
        assert loss.shape == (B, T) and loss.dtype == torch.float32
        assert torch.isfinite(loss).all()
        opt.zero_grad()
        loss.mean().backward()
        opt.step()
        losses.append(loss.mean().item())
    assert losses[0] == pytest.approx(math.log(128), rel=0.1)   # padded vocabulary, near-uniform start
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    # Every parameter takes part: the Engram blocks, the router (through the aux loss too), the experts.
    assert all(p.grad is not None for p in model.parameters())


def test_engram_layers_are_zero_based_and_add_before_attention():
    from megatron.core.transformer.transformer_layer import TransformerLayer

    from engram_train.model.layer import BackboneLayer

    model = _build()
    layers = model.gpt.decoder.layers
    # Engram layers are BackboneLayers; the others stay megatron's own layer (hc_mult=1, no recompute)
    assert [type(l) is BackboneLayer for l in layers] == [True, False, True]
    assert type(layers[1]) is TransformerLayer
    assert sorted(model.engram_blocks()) == [0, 2] and layers[2].layer_number == 3

    seen = {}
    layer = layers[2]
    h1 = layer.register_forward_pre_hook(lambda m, a, kw: seen.__setitem__("layer_in", kw["hidden_states"]),
                                         with_kwargs=True)
    h2 = layer.input_layernorm.register_forward_pre_hook(lambda m, a: seen.__setitem__("norm_in", a[0]))
    tokens, pos, labels, hash_ids = _batch()
    with torch.no_grad():
        model(tokens, pos, labels, hash_ids)
        x = seen["layer_in"]                                                 # [S, B, H]
        engram = layer.engram(x.transpose(0, 1).unsqueeze(2), hash_ids[2]).squeeze(2).transpose(0, 1)
    h1.remove(), h2.remove()
    torch.testing.assert_close(seen["norm_in"], x + engram)
    assert engram.abs().max() > 0


def test_engram_output_reaches_the_loss():
    model = _build()
    tokens, pos, labels, hash_ids = _batch()
    with torch.no_grad():
        base = model(tokens, pos, labels, hash_ids)
        for blk in model.engram_blocks().values():
            blk.conv.weight.normal_(0.0, 0.5)            # the conv starts at zero (paper's policy)
        with_conv = model(tokens, pos, labels, hash_ids)
        other_ids = {l: (h + 1) % min(TABLE_SIZES[l]) for l, h in hash_ids.items()}
        with_other_ids = model(tokens, pos, labels, other_ids)
    assert (with_conv - base).abs().max() > 1e-4
    assert (with_other_ids - with_conv).abs().max() > 1e-4
    gates = model.engram_gate_means()
    assert sorted(gates) == [0, 2] and all(0.0 < g.item() < 1.0 for g in gates.values())


def test_metrics_helpers():
    model = _build()
    model(*_batch()).mean().backward()
    counts = model.num_parameters()
    assert counts["total"] == sum(p.numel() for p in model.parameters())
    assert counts["engram_tables"] == sum(sum(s) for s in TABLE_SIZES.values()) * 8
    assert counts["experts"] == 2 * 4 * (64 * 2 * 32 + 32 * 64)          # 2 MoE layers x 4 SwiGLU experts
    assert counts["dense"] == counts["total"] - counts["engram_tables"] - counts["experts"]
    tokens = model.moe_tokens_per_expert()
    assert sorted(tokens) == [0, 2]                                        # moe_layer_freq=2
    assert all(t.sum().item() == B * T * 2 for t in tokens.values())       # top-2
    balance = model.moe_load_balance()
    for l, t in tokens.items():
        assert balance[f"moe_load/layer{l}/max_over_mean"] == pytest.approx((t.max() / t.mean()).item())
        assert balance[f"moe_load/layer{l}/cv"] == pytest.approx((t.std(unbiased=False) / t.mean()).item())
    assert set(balance) == {f"moe_load/layer{l}/{k}" for l in (0, 2) for k in ("max_over_mean", "cv")} | {
        "moe_load/max_over_mean", "moe_load/cv"}


def test_engram_disabled_builds_a_plain_moe_model():
    model = _build(enabled=False)
    tokens, pos, labels, _ = _batch()
    assert model.engram_blocks() == {}
    assert torch.isfinite(model(tokens, pos, labels)).all()


def test_config_errors():
    from engram_train.model.gpt import build_model

    m, e, p = _cfgs(layer_ids=[1, 3])
    with pytest.raises(ConfigError, match=r"engram.layer_ids=\[1, 3\].*0-based.*num_layers=3"):
        build_model(m, e, p, VOCAB, {1: TABLE_SIZES[0], 3: TABLE_SIZES[2]})
    m, e, p = _cfgs()
    with pytest.raises(ConfigError, match="no entry for Engram layer 2"):
        build_model(m, e, p, VOCAB, {0: TABLE_SIZES[0]})
    from engram_train.model.gpt import padded_vocab_size

    assert padded_vocab_size(100, 64, 2) == 128
    with pytest.raises(ConfigError, match="parallel.tensor_parallel=2"):
        padded_vocab_size(101, 5, 2)


def test_missing_hash_ids_fail_clearly():
    model = _build()
    tokens, pos, labels, hash_ids = _batch()
    with pytest.raises(RuntimeError, match="without hash ids"):
        model(tokens, pos, labels)
    with pytest.raises(KeyError, match="no entry for Engram layer 2"):
        model(tokens, pos, labels, {0: hash_ids[0]})


# --- CPU backend pieces against independent references ----------------------------------------


def test_sdp_attention_matches_naive_causal_gqa():
    from megatron.core.transformer.enums import AttnMaskType

    from engram_train.platform.cpu_backend import SDPAttention
    from engram_train.model.gpt import transformer_config

    m, _, p = _cfgs()
    attn = SDPAttention(transformer_config(m, p), 1, AttnMaskType.causal, "self")
    s, b, heads, groups, d = 5, 2, 4, 2, 16
    q, k, v = torch.randn(s, b, heads, d), torch.randn(s, b, groups, d), torch.randn(s, b, groups, d)
    out = attn(q, k, v, None)
    ref = torch.empty(s, b, heads, d)
    for h in range(heads):
        g = h // (heads // groups)
        scores = torch.einsum("sbd,tbd->bst", q[:, :, h], k[:, :, g]) / math.sqrt(d)
        scores = scores.masked_fill(torch.triu(torch.ones(s, s, dtype=torch.bool), 1), float("-inf"))
        ref[:, :, h] = torch.einsum("bst,tbd->sbd", scores.softmax(-1), v[:, :, g])
    torch.testing.assert_close(out, ref.reshape(s, b, heads * d), rtol=1e-5, atol=1e-5)


def test_rmsnorm_matches_torch_and_is_marked_for_sp():
    from engram_train.platform.cpu_backend import RMSNorm
    from engram_train.model.gpt import transformer_config

    m, _, p = _cfgs()
    norm = RMSNorm(transformer_config(m, p), 64, eps=1e-6)
    with torch.no_grad():
        norm.weight.normal_()
    x = torch.randn(3, 2, 64)
    torch.testing.assert_close(norm(x), F.rms_norm(x, (64,), norm.weight, eps=1e-6))
    assert norm.weight.sequence_parallel is False                           # TP=1: no SP


def test_cpu_rng_tracker_streams():
    from megatron.core import tensor_parallel

    from engram_train.platform import cpu_backend

    cpu_backend.activate_cpu_backend()                                      # idempotent
    assert cpu_backend.is_active() and torch.cuda.current_device() == torch.device("cpu")
    tracker = tensor_parallel.get_cuda_rng_tracker()
    assert isinstance(tracker, cpu_backend.CpuRNGStatesTracker)
    outer = torch.get_rng_state()
    with tracker.fork():
        a = torch.rand(3)
    assert torch.equal(torch.get_rng_state(), outer)                        # default stream untouched
    with tracker.fork():
        b = torch.rand(3)
    assert not torch.equal(a, b)                                            # the named stream advanced
    gen = torch.Generator().manual_seed(1234 + 2718)                        # megatron's TP-rank-0 seed
    cpu_backend.cpu_model_parallel_manual_seed(1234)
    with tracker.fork():
        torch.testing.assert_close(torch.rand(3), torch.rand(3, generator=gen))


def test_shard_unshard_swiglu_halves():
    from engram_train.parallel.sharding import shard, unshard

    gate, up = torch.arange(8.0).view(4, 2), 100 + torch.arange(8.0).view(4, 2)
    full = torch.cat([gate, up])                                            # megatron's fc1: [gate; up]
    parts = [shard(full, r, 2, 0, stride=2) for r in range(2)]
    torch.testing.assert_close(parts[0], torch.cat([gate[:2], up[:2]]))
    torch.testing.assert_close(parts[1], torch.cat([gate[2:], up[2:]]))
    torch.testing.assert_close(unshard(parts, 0, stride=2), full)


def test_sp_grad_hooks_are_a_noop_without_tp():
    from engram_train.parallel.sp_grads import install_sequence_parallel_grad_hooks

    model = _build()
    assert not getattr(model, "sequence_parallel_grad_hooks", False)
    assert install_sequence_parallel_grad_hooks(model) == 0


def test_parallelize_draws_experts_by_global_index_only():
    """Experts depend on parallelize's seed, not on the global RNG state build_model ran under."""
    from engram_train.model.gpt import build_model
    from engram_train.parallel.parallelize import parallelize

    m, e, p = _cfgs()
    experts = []
    for build_seed, seed in [(0, 7), (1, 7), (0, 8)]:
        torch.manual_seed(build_seed)
        model = parallelize(build_model(m, e, p, VOCAB, TABLE_SIZES), seed, sequence_parallel_grad_hooks=False)
        experts.append({n: q.detach().clone() for n, q in model.named_parameters() if ".mlp.experts." in n})
    assert len(experts[0]) == 2 * 4 * 2                                      # 2 MoE layers x 4 experts x fc1, fc2
    for n in experts[0]:
        torch.testing.assert_close(experts[0][n], experts[1][n], rtol=0, atol=0)
        assert not torch.equal(experts[0][n], experts[2][n])


def test_zero_table_init_std_validates_and_builds_zero_tables():
    """engram.table_init_std=0 passes the config, so the model builds too: its tables start at zero."""
    model = _build(table_init_std=0.0)
    tables = [b.table.weight for b in model.engram_blocks().values()]
    assert len(tables) == 2 and all(t.numel() > 0 and not t.any() for t in tables)
    assert torch.isfinite(model(*_batch())).all()
