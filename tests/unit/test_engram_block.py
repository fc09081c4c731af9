"""EngramBlock against an independent torch implementation of docs/engram.md §1.5-1.7.

``RefEngram`` below is written from the rules with the reference module's
parameter names and structure (per-branch ``nn.Linear``/``nn.RMSNorm``
modules, a symmetric-padded Conv1d cropped to T), so that its ``state_dict``
is what ``EngramBlock.load_reference_state_dict`` must accept.  Outputs and
gradients with respect to the hidden state and every parameter must agree.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from engram_train.config.schema import ConfigError
from engram_train.engram.block import EngramBlock
from engram_train.engram.port import demo_state_dict, load_demo_state_dict
from engram_train.engram.table import HashIdOutOfRangeError, MultiHeadEmbeddingTable


class RefEngram(nn.Module):
    def __init__(self, hidden, hc_mult, table_sizes, n_embed, heads, max_ngram, kernel=4):
        super().__init__()
        self.hidden, self.hc_mult = hidden, hc_mult
        self.table_sizes = list(table_sizes)
        self.multi_head_embedding = nn.Module()
        self.multi_head_embedding.embedding = nn.Embedding(sum(table_sizes), n_embed // heads)
        starts = [sum(table_sizes[:i]) for i in range(len(table_sizes))]
        self.multi_head_embedding.register_buffer("offsets", torch.tensor(starts))
        d_e = (max_ngram - 1) * n_embed
        self.short_conv = nn.Module()
        channels = hidden * hc_mult
        self.short_conv.conv = nn.Conv1d(channels, channels, kernel, groups=channels, bias=False,
                                         padding=(kernel - 1) * max_ngram, dilation=max_ngram)
        self.short_conv.norms = nn.ModuleList([nn.RMSNorm(hidden, eps=1e-5) for _ in range(hc_mult)])
        self.value_proj = nn.Linear(d_e, hidden)
        self.key_projs = nn.ModuleList([nn.Linear(d_e, hidden) for _ in range(hc_mult)])
        self.norm1 = nn.ModuleList([nn.RMSNorm(hidden) for _ in range(hc_mult)])
        self.norm2 = nn.ModuleList([nn.RMSNorm(hidden) for _ in range(hc_mult)])

    def forward(self, hidden_states, hash_ids):
        B, T, G, H = hidden_states.shape
        rows = self.multi_head_embedding.embedding(hash_ids + self.multi_head_embedding.offsets)
        e = rows.reshape(B, T, -1)
        alphas = []
        for b in range(G):
            k = self.norm1[b](self.key_projs[b](e))
            q = self.norm2[b](hidden_states[:, :, b, :])
            g = (k * q).sum(-1) / math.sqrt(H)
            g = torch.sign(g) * torch.sqrt(torch.clamp(g.abs(), min=1e-6))
            alphas.append(torch.sigmoid(g))
        alpha = torch.stack(alphas, dim=2).unsqueeze(-1)             # [B, T, G, 1]
        v = alpha * self.value_proj(e)[:, :, None, :]                # [B, T, G, H]
        normed = torch.cat([self.short_conv.norms[b](v[:, :, b]) for b in range(G)], dim=-1)
        y = self.short_conv.conv(normed.transpose(1, 2))[..., :T]
        y = torch.nn.functional.silu(y).transpose(1, 2).reshape(B, T, G, H)
        self.alpha_mean = alpha.mean()
        return v + y


SIZES_K2_N3 = [37, 41, 43, 47]       # (N-1)*K = 4 heads


def make_pair(G, H=16, n_embed=8, heads=2, max_ngram=3, sizes=SIZES_K2_N3, seed=0):
    torch.manual_seed(seed)
    ref = RefEngram(H, G, sizes, n_embed, heads, max_ngram)
    with torch.no_grad():       # every parameter away from its init value, conv included
        for p in ref.parameters():
            p.copy_(torch.randn_like(p) * (0.5 if p.ndim > 1 else 0.3) + (1.0 if p.ndim == 1 else 0.0))
    blk = EngramBlock(hidden_size=H, hc_mult=G, table_sizes=sizes, n_embed_per_ngram=n_embed,
                      heads_per_ngram=heads, max_ngram=max_ngram, kernel_size=4)
    blk.load_reference_state_dict(ref.state_dict())
    return ref, blk


def inputs(G, H=16, B=3, T=11, sizes=SIZES_K2_N3, seed=1):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(B, T, G, H, generator=g)
    hash_ids = torch.stack([torch.randint(0, s, (B, T), generator=g) for s in sizes], dim=-1)
    return hidden, hash_ids


def our_grads(blk, G, H):
    """Our gradients under the reference's names (branch slices of the stacked parameters)."""
    out = {
        "multi_head_embedding.embedding.weight": blk.table.weight.grad,
        "short_conv.conv.weight": blk.conv.weight.grad,
        "value_proj.weight": blk.value_proj.weight.grad,
        "value_proj.bias": blk.value_proj.bias.grad,
    }
    for i in range(G):
        out[f"key_projs.{i}.weight"] = blk.key_proj.weight.grad[i * H:(i + 1) * H]
        out[f"key_projs.{i}.bias"] = blk.key_proj.bias.grad[i * H:(i + 1) * H]
        out[f"norm1.{i}.weight"] = blk.key_norm.weight.grad[i * H:(i + 1) * H]
        out[f"norm2.{i}.weight"] = blk.query_norm.weight.grad[i * H:(i + 1) * H]
        out[f"short_conv.norms.{i}.weight"] = blk.conv_norm.weight.grad[i * H:(i + 1) * H]
    return out


@pytest.mark.parametrize("G", [1, 4])
def test_forward_and_gradients_equal_reference(G):
    H = 16
    ref, blk = make_pair(G, H)
    hidden, hash_ids = inputs(G, H)
    h_ref = hidden.clone().requires_grad_(True)
    h_our = hidden.clone().requires_grad_(True)
    y_ref = ref(h_ref, hash_ids)
    y_our = blk(h_our, hash_ids)
    torch.testing.assert_close(y_our, y_ref, rtol=1e-5, atol=1e-5)
    assert float(y_ref.detach().abs().mean()) > 0.1         # a non-trivial output, conv path included
    torch.testing.assert_close(blk.last_gate_mean, ref.alpha_mean.detach(), rtol=1e-6, atol=1e-6)
    assert blk.last_gate_mean.ndim == 0 and not blk.last_gate_mean.requires_grad

    cot = torch.randn_like(y_ref)
    (y_ref * cot).sum().backward()
    (y_our * cot).sum().backward()
    torch.testing.assert_close(h_our.grad, h_ref.grad, rtol=1e-5, atol=1e-5)
    ref_named = dict(ref.named_parameters())
    ours = our_grads(blk, G, H)
    assert set(ours) == set(ref_named)
    for name, g in ours.items():
        torch.testing.assert_close(g, ref_named[name].grad, rtol=1e-5, atol=1e-5, msg=name)
    # every parameter of the block received a gradient
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in blk.parameters())


def test_conv_is_causal_with_dilation_max_ngram():
    ref, blk = make_pair(G=2, max_ngram=3)
    hidden, hash_ids = inputs(2, T=20)
    y = blk(hidden, hash_ids)
    # Changing the last token changes nothing before it; changing token t changes t, t+3, t+6, t+9 through the conv.
    hid2, ids2 = hidden.clone(), hash_ids.clone()
    hid2[:, 5] += 1.0
    ids2[:, 5] = (ids2[:, 5] + 1) % torch.tensor(SIZES_K2_N3)
    y2 = blk(hid2, ids2)
    changed = (y2 - y).abs().amax(dim=(0, 2, 3)) > 0
    assert changed.nonzero().flatten().tolist() == [5, 8, 11, 14]


def test_reference_state_dict_roundtrip_and_fresh_init():
    ref, blk = make_pair(G=4)
    sd = blk.reference_state_dict()
    for name, value in ref.state_dict().items():
        if name != "multi_head_embedding.offsets":
            assert torch.equal(sd[name], value), name
    fresh = EngramBlock(16, 4, SIZES_K2_N3, 8, 2, 3, table_init_std=0.02)
    # paper policy: the conv starts at zero, so a fresh block's conv branch is silent and it outputs v
    assert torch.count_nonzero(fresh.conv.weight) == 0
    assert torch.count_nonzero(fresh.short_conv(torch.randn(3, 11, 4, 16))) == 0
    assert 0.015 < float(fresh.table.weight.detach().std()) < 0.025
    # our weights exported under reference names load into the reference and give the same output
    ref2 = RefEngram(16, 4, SIZES_K2_N3, 8, 2, 3)
    ref2.load_state_dict(fresh.reference_state_dict(), strict=True)     # offsets buffer included
    hidden, hash_ids = inputs(4)
    torch.testing.assert_close(fresh(hidden, hash_ids), ref2(hidden, hash_ids), rtol=1e-5, atol=1e-5)


def test_load_reference_state_dict_errors():
    ref, blk = make_pair(G=2)
    sd = ref.state_dict()
    bad = dict(sd)
    del bad["norm2.1.weight"]
    with pytest.raises(KeyError, match=r"missing keys \['norm2.1.weight'\]"):
        blk.load_reference_state_dict(bad)
    bad = dict(sd, **{"norm2.7.weight": torch.ones(16)})
    with pytest.raises(KeyError, match=r"unexpected keys \['norm2.7.weight'\]"):
        blk.load_reference_state_dict(bad)
    bad = dict(sd, **{"value_proj.weight": torch.ones(16, 5)})
    with pytest.raises(ValueError, match=r"state_dict\['value_proj.weight'\]: shape \(16, 5\)"):
        blk.load_reference_state_dict(bad)
    bad = dict(sd, **{"multi_head_embedding.offsets": torch.tensor([0, 1, 2, 3])})
    with pytest.raises(ConfigError, match=r"engram.table_size_per_ngram: the weights' tables have 4 heads of sizes "
                                          r"\[1, 1, 1, 165\], this block's \[37, 41, 43, 47\]"):
        blk.load_reference_state_dict(bad)
    ref4, _ = make_pair(G=4)
    with pytest.raises(ConfigError, match=r"^model.hc_mult=2: the weights have 4 residual branches .* set "
                                          r"model.hc_mult=4 \(the residual streams; engram.hc_mult follows it\)"):
        blk.load_reference_state_dict(ref4.state_dict())


@pytest.mark.parametrize("B, T, G", [(1, 1, 1), (2, 7, 3), (5, 2, 2)])
def test_shapes_and_bf16(B, T, G):
    ref, blk = make_pair(G)
    hidden, hash_ids = inputs(G, B=B, T=T)
    y32 = ref(hidden, hash_ids)
    blk_bf16 = blk.to(torch.bfloat16)
    ref_bf16 = ref.to(torch.bfloat16)
    y = blk_bf16(hidden.bfloat16(), hash_ids)
    y_ref = ref_bf16(hidden.bfloat16(), hash_ids)
    assert y.dtype == torch.bfloat16 and y.shape == (B, T, G, 16)
    torch.testing.assert_close(y.float(), y_ref.float(), rtol=3e-2, atol=3e-2)
    torch.testing.assert_close(y.float(), y32, rtol=0.1, atol=0.1)
    y.float().sum().backward()
    assert all(torch.isfinite(p.grad.float()).all() for p in blk_bf16.parameters())


def test_external_table_and_fuse():
    ref, blk = make_pair(G=2)
    hidden, hash_ids = inputs(2)
    shared = MultiHeadEmbeddingTable(SIZES_K2_N3, 4)
    with torch.no_grad():
        shared.weight.copy_(blk.table.weight)
    other = EngramBlock(16, 2, SIZES_K2_N3, 8, 2, 3, table=shared)
    other.load_state_dict(blk.state_dict())
    assert other.table is shared
    torch.testing.assert_close(other(hidden, hash_ids), ref(hidden, hash_ids), rtol=1e-5, atol=1e-5)
    # host-resident tables hand rows to fuse directly
    rows = shared(hash_ids)
    torch.testing.assert_close(blk.fuse(hidden, rows), ref(hidden, hash_ids), rtol=1e-5, atol=1e-5)


def test_table_lookup_concatenates_heads_at_offsets():
    table = MultiHeadEmbeddingTable([5, 7, 3], 2, init_std=1.0)
    assert table.weight.engram_table is True and table.weight.shape == (15, 2)
    assert "offsets" not in table.state_dict()
    ids = torch.tensor([[[4, 0, 2], [1, 6, 0]]])
    out = table(ids)
    w = table.weight
    expected = torch.stack([torch.cat([w[4], w[5 + 0], w[12 + 2]]), torch.cat([w[1], w[5 + 6], w[12 + 0]])])[None]
    assert torch.equal(out, expected)


def test_table_rejects_ids_outside_a_table():
    table = MultiHeadEmbeddingTable([5, 7, 3], 2)
    with pytest.raises(HashIdOutOfRangeError, match=r"hash_ids: head 2 holds ids in \[3, 3\] but its table has 3 rows"):
        table(torch.tensor([[0, 0, 3]]))
    with pytest.raises(HashIdOutOfRangeError, match=r"head 0 holds ids in \[-1, -1\]"):
        table(torch.tensor([[-1, 0, 0]]))
    with pytest.raises(HashIdOutOfRangeError, match="last dimension is 2 but the table has 3 heads"):
        table(torch.tensor([[0, 0]]))
    assert issubclass(HashIdOutOfRangeError, ValueError)


@pytest.mark.parametrize("kwargs, match", [
    (dict(n_embed_per_ngram=10, heads_per_ngram=4, table_sizes=[37] * 8),
     r"n_embed_per_ngram=10: must be a positive multiple of heads_per_ngram=4"),
    (dict(max_ngram=1, table_sizes=[]), r"max_ngram=1: must be >= 2"),
    (dict(table_sizes=[37, 1, 43, 47]), r"table_sizes=\[37, 1, 43, 47\]: every table size must be >= 2"),
    (dict(table_sizes=[37, 41]), r"table_sizes=\[37, 41\]: needs \(max_ngram-1\)\*heads_per_ngram=4 sizes"),
    (dict(hc_mult=0), r"hc_mult=0: must be >= 1"),
])
def test_block_validation_messages(kwargs, match):
    args = dict(hidden_size=16, hc_mult=1, table_sizes=SIZES_K2_N3, n_embed_per_ngram=8, heads_per_ngram=2,
                max_ngram=3)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        EngramBlock(**args)


def test_hidden_shape_error():
    _, blk = make_pair(G=2)
    with pytest.raises(ValueError, match=r"hidden: expected shape \[B, T, hc_mult=2, hidden_size=16\]"):
        blk(torch.zeros(2, 3, 16), torch.zeros(2, 3, 4, dtype=torch.long))


# ---- the demo's TransformerBlock format: engram.-prefixed keys, offsets, table sizes from the raw vocabulary --------

class DemoTransformerBlock(nn.Module):
    """The demo's block: attention and MoE are stand-ins without weights; the Engram module sits at ``.engram``."""

    def __init__(self, engram):
        super().__init__()
        self.attn = lambda x: x
        self.engram = engram


def ref_is_prime(n):
    return n >= 2 and all(n % d for d in range(2, int(n ** 0.5) + 1))


def ref_primes(layer_ids, max_ngram, heads, start_sizes):
    """The reference's prime search: one global seen set, layer by layer, order by order, head by head."""
    seen, out = set(), {}
    for layer in layer_ids:
        sizes = []
        for n in range(2, max_ngram + 1):
            p = start_sizes[n - 2] - 1
            for _ in range(heads):
                p += 1
                while not (ref_is_prime(p) and p not in seen):
                    p += 1
                seen.add(p)
                sizes.append(p)
        out[layer] = sizes
    return out


RAW_VOCAB, COMPRESSED_VOCAB = 300, 240      # the demo sizes tables 5 x raw, our default 5 x compressed


def demo_pair(layer_id, G=1, layer_ids=(1, 15), H=16, n_embed=8, heads=2, max_ngram=3, seed=0):
    sizes = ref_primes(layer_ids, max_ngram, heads, [5 * RAW_VOCAB] * (max_ngram - 1))[layer_id]
    torch.manual_seed(seed)
    demo = DemoTransformerBlock(RefEngram(H, G, sizes, n_embed, heads, max_ngram))
    with torch.no_grad():
        for p in demo.parameters():
            p.copy_(torch.randn_like(p) * 0.5 + (1.0 if p.ndim == 1 else 0.0))
    return demo, sizes


@pytest.mark.parametrize("layer_id", [1, 15])
def test_demo_block_weights_load_and_export_back_equal(layer_id):
    demo, sizes = demo_pair(layer_id)
    sd = demo.state_dict()
    assert "engram.multi_head_embedding.offsets" in sd and all(k.startswith("engram.") for k in sd)
    blk = EngramBlock(16, 1, sizes, 8, 2, 3)
    load_demo_state_dict(blk, sd, layer_id=layer_id, layer_ids=[1, 15])
    hidden, hash_ids = inputs(1, sizes=sizes)
    torch.testing.assert_close(blk(hidden, hash_ids), demo.engram(hidden, hash_ids), rtol=1e-5, atol=1e-5)
    back = demo_state_dict(blk)
    assert sorted(back) == sorted(sd)
    for name, value in sd.items():
        assert back[name].dtype == value.dtype and torch.equal(back[name], value), name
    demo2, _ = demo_pair(layer_id, seed=1)
    demo2.load_state_dict(back, strict=True)
    # a whole demo model's state dict: the layer is picked by its id
    model_sd = {f"layers.{layer_id}.{k}": v for k, v in sd.items()}
    blk2 = EngramBlock(16, 1, sizes, 8, 2, 3)
    load_demo_state_dict(blk2, model_sd, layer_id=layer_id, layer_ids=[1, 15])
    assert all(torch.equal(a, b) for a, b in zip(blk2.state_dict().values(), blk.state_dict().values()))


@pytest.mark.parametrize("layer_id", [1, 15])
def test_demo_table_sizes_mismatch_names_the_value_to_set(layer_id):
    demo, sizes = demo_pair(layer_id)
    ours = ref_primes([1, 15], 3, 2, [5 * COMPRESSED_VOCAB] * 2)[layer_id]
    blk = EngramBlock(16, 1, ours, 8, 2, 3)
    first_prime = next(p for p in range(5 * RAW_VOCAB, 10 * RAW_VOCAB) if ref_is_prime(p))   # what 5 x raw searches to
    with pytest.raises(ConfigError) as e:
        load_demo_state_dict(blk, demo.state_dict(), layer_id=layer_id, layer_ids=[1, 15])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith("engram.table_size_per_ngram: ")
    assert f"set engram.table_size_per_ngram=[{first_prime}, {first_prime}]" in msg, msg
    # the value named reproduces the weights' tables
    fixed = EngramBlock(16, 1, ref_primes([1, 15], 3, 2, [first_prime] * 2)[layer_id], 8, 2, 3)
    load_demo_state_dict(fixed, demo.state_dict(), layer_id=layer_id, layer_ids=[1, 15])


def test_demo_hc_mult_mismatch_is_one_line():
    demo, sizes = demo_pair(1, G=4)
    blk = EngramBlock(16, 1, sizes, 8, 2, 3)
    with pytest.raises(ConfigError) as e:
        load_demo_state_dict(blk, demo.state_dict(), layer_id=1, layer_ids=[1, 15])
    msg = str(e.value)
    assert "\n" not in msg
    assert msg.startswith("model.hc_mult=1: the weights have 4 residual branches")
    assert "set model.hc_mult=4 (the residual streams; engram.hc_mult follows it)" in msg
    blk4 = EngramBlock(16, 4, sizes, 8, 2, 3)                    # the matching width loads
    load_demo_state_dict(blk4, demo.state_dict(), layer_id=1, layer_ids=[1, 15])
    hidden, hash_ids = inputs(4, sizes=sizes)
    torch.testing.assert_close(blk4(hidden, hash_ids), demo.engram(hidden, hash_ids), rtol=1e-5, atol=1e-5)
