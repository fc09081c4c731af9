"""GPU tier: the CUDA paths against the CPU paths (which the CPU tiers pin to independent references).

Skipped on machines without CUDA.
"""

import numpy as np
import pytest
import torch

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def _hasher():
    from engram_train.engram.hashing import NgramHasher

    rng = np.random.default_rng(0)
    vocab = 5000
    lookup = rng.integers(0, 3000, size=vocab).astype(np.int64)
    return NgramHasher(lookup, layer_ids=[1, 5], max_ngram=3, heads_per_ngram=4,
                       table_size_per_ngram=[3000 * 5, 3000 * 5], pad_id=2, seed=0), vocab


def test_hashing_on_cuda_equals_cpu():
    h, vocab = _hasher()
    ids = torch.randint(0, vocab, (4, 512))
    cpu = h(ids)
    gpu = h(ids.cuda())
    for layer, want in cpu.items():
        assert gpu[layer].device.type == "cuda"
        assert torch.equal(gpu[layer].cpu(), want)


@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.bfloat16, 5e-2)])
def test_engram_block_on_cuda_matches_cpu(dtype, tol):
    from engram_train.engram.block import EngramBlock

    h, vocab = _hasher()
    torch.manual_seed(0)
    blk = EngramBlock(hidden_size=64, hc_mult=2, table_sizes=h.table_sizes[1], n_embed_per_ngram=32,
                      heads_per_ngram=4, max_ngram=3, kernel_size=4)
    with torch.no_grad():
        for p in blk.parameters():
            if p.dim() == 3:  # the zero-initialized conv: make it matter
                p.normal_(0, 0.1)
    ids = torch.randint(0, vocab, (2, 64))
    hidden = torch.randn(2, 64, 2, 64, requires_grad=True)
    cot = torch.randn(2, 64, 2, 64)
    want = blk(hidden, h(ids)[1])
    want_grads = torch.autograd.grad(want, [hidden, *blk.parameters()], cot)
    blk = blk.to("cuda", dtype)
    hidden_gpu = hidden.detach().to("cuda", dtype).requires_grad_(True)
    got = blk(hidden_gpu, h(ids.cuda())[1])
    # the backward of the fused functions (engram/fused.py) on CUDA, against the CPU's
    got_grads = torch.autograd.grad(got, [hidden_gpu, *blk.parameters()], cot.to("cuda", dtype))
    assert torch.allclose(got.float().cpu(), want, atol=tol, rtol=tol)
    if dtype == torch.float32:   # in bf16 the gate's d alpha/dg ~ 1/sqrt|g| amplifies rounding (~20% on CPU too)
        for (name, _), a, b in zip([("hidden", None), *blk.named_parameters()], got_grads, want_grads):
            err = float((a.cpu() - b).norm() / b.norm().clamp_min(1e-30))   # the table's: mostly zero rows
            assert err <= tol, (name, err)


def test_tiny_engram_moe_model_trains_on_cuda():
    from engram_train.config.schema import EngramConfig, ModelConfig, ParallelConfig
    from engram_train.model.gpt import build_model
    from engram_train.parallel.state import destroy_parallel, init_parallel

    init_parallel(ParallelConfig(), seed=0)
    try:
        h, vocab = _hasher()
        mcfg = ModelConfig(num_layers=6, hidden_size=64, num_attention_heads=4, ffn_hidden_size=128,
                           max_seq_length=64, num_experts=4, moe_ffn_hidden_size=64)
        ecfg = EngramConfig(layer_ids=[1, 5], max_ngram=3, heads_per_ngram=4, n_embed_per_ngram=32)
        model = build_model(mcfg, ecfg, ParallelConfig(), 5056, h.table_sizes).cuda()
        opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
        ids = torch.randint(0, vocab, (4, 65), device="cuda")
        tokens, labels = ids[:, :-1], ids[:, 1:]
        pos = torch.arange(64, device="cuda").expand(4, 64)
        losses = []
        for _ in range(8):
            loss = model(tokens, pos, labels, engram_hash_ids=h(tokens)).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert np.isfinite(losses).all() and losses[-1] < losses[0]
    finally:
        destroy_parallel()


def test_host_resident_tables_on_cuda_equal_device_resident():
    """The CUDA prefetch path: pinned staging, copies on a side stream ordered by events, and the
    read-after-write refresh, against device-resident tables fed synchronously."""
    from tests.unit.test_host_tables import SIZES, _store, _train

    device = _train(_store("device", device="cuda"), prefetch=False)
    host_store = _store("host", device="cuda")
    assert host_store.shards[0].weight.device.type == "cpu" and host_store.prefetcher.copy_stream is not None
    host = _train(host_store, prefetch=True)
    for l in SIZES:
        for got, want in zip(host[l], device[l]):
            # CUDA's index_add_ sums duplicates with atomics: equal up to float rounding.
            torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
