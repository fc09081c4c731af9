"""One step, one norm: the optimizers container's global gradient norm covers DeepSpeed's dense
gradients and the table store's, and one clip scales both.

One process, a small Engram-MoE with its tables in the store, one training step through the
real DeepSpeed engine.  The expected norm is computed independently: the dense part from
DeepSpeed's per-parameter gradients (``safe_get_full_grad``, read before the step), the table
part from the store's pending sparse rows summed with ``index_add_``.  The clipped table update
is checked against a hand-written AdamW step on the clipped rows, the clipped dense update
through the dense first moments (AdamW's first step keeps (1 - beta1) times the clipped gradient).
"""

from __future__ import annotations

import math

import pytest
import torch

from engram_train.config.schema import ConfigError

SIZES = {0: [31, 37, 41, 43], 1: [47, 53, 59, 61]}
B, T, VOCAB = 2, 16, 128


def backward_one_batch(optimizers, scale: float = 1.0) -> torch.Tensor:
    """One micro-batch of random tokens and hash ids (seed 0) through the engine, and its backward;
    returns the loss (times ``scale`` before the backward)."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    hash_ids = {l: torch.randint(0, min(s), (B, T, 4), generator=g) for l, s in SIZES.items()}
    loss = optimizers.engine(tokens, torch.arange(T).expand(B, T), labels,
                             engram_hash_ids=hash_ids).float().mean() * scale
    optimizers.backward(loss)
    return loss.detach()


def record_table_grads(store):
    """Each shard's gradient of this step, (sorted unique local ids, rows), summed from the pending
    micro-batch rows with ``index_add_`` (one process: no replicas to average over)."""
    out = {}
    for l, shard in store.shards.items():
        ids = torch.cat([p[0] for p in shard._pending])
        rows = torch.cat([p[1] for p in shard._pending])
        dense = torch.zeros(shard.num_rows, shard.embed_dim, dtype=torch.float64).index_add_(0, ids, rows.double())
        uniq = torch.unique(ids)
        out[l] = (uniq, dense[uniq].float())
    return out


def _cfg(*overrides):
    from engram_train.config.store import compose

    return compose(["experiment=debug_cpu", "model.num_layers=2", "model.hidden_size=64",
                    "model.num_attention_heads=4", "model.ffn_hidden_size=96", "model.moe_ffn_hidden_size=32",
                    f"model.max_seq_length={T}", "engram.layer_ids=[0,1]", "engram.max_ngram=3",
                    "engram.heads_per_ngram=2", "engram.n_embed_per_ngram=16", f"data.seq_length={T}",
                    f"data.micro_batch_size={B}", f"data.global_batch_size={B}", *overrides])


@pytest.mark.parametrize("overrides, precision", [
    (["parallel.zero_stage=2", "trainer.grad_clip=0.05"], "fp32"),   # clipping active
    (["parallel.zero_stage=1", "trainer.grad_clip=1000.0"], "fp32"),
    (["parallel.zero_stage=1", "trainer.grad_clip=0.05", "trainer.precision=bf16"], "bf16"),
], ids=["zero2_clipped", "zero1_unclipped", "bf16_zero1_clipped"])
def test_one_norm_covers_dense_and_tables_and_one_clip_scales_both(overrides, precision):
    from deepspeed.utils import safe_get_full_grad, safe_get_full_optimizer_state
    from deepspeed.utils.mixed_precision_linkage import lazy_init_hp_params_optimizer_state

    from engram_train.parallel.parallelize import build_parallel_model
    from engram_train.parallel.state import destroy_parallel, init_parallel
    from engram_train.train.optimizers import build_optimizers

    cfg = _cfg(*overrides)
    init_parallel(cfg.parallel, cfg.trainer.seed)
    try:
        bf16 = precision == "bf16"
        dtype = torch.bfloat16 if bf16 else torch.float32
        torch.manual_seed(1)
        model, store = build_parallel_model(cfg, VOCAB, SIZES, dtype)
        optimizers = build_optimizers(model, cfg, 1, bf16, store)
        assert type(optimizers.dense.zero).__name__ == "DeepSpeedZeroOptimizer"
        assert optimizers.engine.gradient_clipping() == 0.0     # DeepSpeed is told nothing: the container clips
        loss = backward_one_batch(optimizers)
        grads = record_table_grads(store)
        table_sq = sum(float(rows.double().square().sum()) for _, rows in grads.values())
        dense_grads = {n: safe_get_full_grad(p).float().clone() for n, p in model.named_parameters()}
        dense_sq = sum(float(g.double().square().sum()) for g in dense_grads.values())
        assert table_sq > 0 and dense_sq > 0
        before = {l: s.weight.clone() for l, s in store.shards.items()}

        lr = 1e-2
        norm = float(optimizers.step(lr, loss))
        want = math.sqrt(dense_sq + table_sq)
        assert norm == pytest.approx(want, rel=1e-3 if bf16 else 1e-5)
        assert norm > math.sqrt(dense_sq) * (1 + 1e-4)      # the tables really count

        scale = 1.0 / max(1.0, (norm + 1e-6) / cfg.trainer.grad_clip)
        b1, b2, eps = cfg.trainer.adam_beta1, cfg.trainer.adam_beta2, cfg.trainer.adam_eps
        for l, shard in store.shards.items():
            ids, rows = grads[l]
            gr = rows * scale                                  # first AdamW step: m = (1-b1) g, v = (1-b2) g^2
            m, v = (1 - b1) * gr, (1 - b2) * gr * gr
            step = (lr * cfg.engram.table_lr_mult) / (1 - b1) * m / ((v / (1 - b2)).sqrt() + eps)
            want_rows = before[l][ids] - step
            torch.testing.assert_close(shard.weight[ids], want_rows, rtol=1e-5, atol=1e-6)
            untouched = torch.ones(shard.num_rows, dtype=torch.bool)
            untouched[ids] = False
            assert torch.equal(shard.weight[untouched], before[l][untouched])
        # Dense: the first moment of AdamW's first step is (1 - beta1) times the clipped gradient.
        zero = optimizers.dense.zero
        for i, hp in enumerate(zero.single_partition_of_fp32_groups):   # link every group to its Adam state
            lazy_init_hp_params_optimizer_state(zero.bit16_groups[i], hp, zero.optimizer.state)
        for n, p in model.named_parameters():
            m = safe_get_full_optimizer_state(p, "exp_avg")
            torch.testing.assert_close(m, (1 - b1) * scale * dense_grads[n], rtol=1e-3 if bf16 else 1e-5,
                                       atol=1e-9, msg=n)
    finally:
        destroy_parallel()


def test_engram_needs_zero_1_or_2():
    with pytest.raises(ConfigError, match=r"parallel.zero_stage=0.*set parallel.zero_stage=1 or 2"):
        _cfg("parallel.zero_stage=0")
    with pytest.raises(ConfigError, match=r"parallel.zero_stage=3"):
        _cfg("parallel.zero_stage=3")
    with pytest.raises(ConfigError, match=r"parallel.zero_stage=0"):   # dense checkpoints need ZeRO-1/2 too
        _cfg("parallel.zero_stage=0", "engram.enabled=false")


@pytest.mark.parametrize("fault, precision", [
    ("loss", "fp32"),        # a non-finite loss whose gradients are finite: the flag rides in the norm
    ("table_grad", "fp32"),  # one table gradient row is NaN: the dense update is dropped too
    ("dense_grad", "bf16"),  # Inf in the dense gradients under bf16: the tables drop theirs too
])
def test_a_non_finite_step_drops_the_dense_and_the_table_update(fault, precision):
    """The one norm (dense + tables + the loss's flag) is Inf/NaN: DeepSpeed keeps its fp32 weights,
    Adam moments and step, and the store keeps its rows and optimizer state -- compared bit for bit."""
    from engram_train.parallel.parallelize import build_parallel_model
    from engram_train.parallel.state import destroy_parallel, init_parallel
    from engram_train.train.optimizers import build_optimizers

    cfg = _cfg("parallel.zero_stage=1", "trainer.grad_clip=1.0", f"trainer.precision={precision}")
    init_parallel(cfg.parallel, cfg.trainer.seed)
    try:
        bf16 = precision == "bf16"
        model, store = build_parallel_model(cfg, VOCAB, SIZES, torch.bfloat16 if bf16 else torch.float32)
        optimizers = build_optimizers(model, cfg, 1, bf16, store)
        optimizer = optimizers.dense.zero

        def state():
            dense = {f"w{i}": g.clone() for i, g in enumerate(optimizer.single_partition_of_fp32_groups)}
            for i, g in enumerate(optimizer.single_partition_of_fp32_groups):
                for k, v in optimizer.optimizer.state.get(g, {}).items():
                    dense[f"{k}{i}"] = v.clone() if torch.is_tensor(v) else torch.tensor(v)
            tables = {f"{l}.{k}": t.clone() for l, s in store.shards.items()
                      for k, t in [("weight", s.weight), *s.optimizer.state_tensors().items()]}
            return dense, tables

        def one_step(bad: bool):
            g = torch.Generator().manual_seed(0)
            tokens = torch.randint(0, VOCAB, (B, T), generator=g)
            labels = torch.randint(0, VOCAB, (B, T), generator=g)
            hash_ids = {l: torch.randint(0, min(s), (B, T, 4), generator=g) for l, s in SIZES.items()}
            loss = optimizers.engine(tokens, torch.arange(T).expand(B, T), labels,
                                     engram_hash_ids=hash_ids).float().mean()
            if bad and fault == "dense_grad":
                loss = loss * float("inf")
            optimizers.backward(loss)
            if bad and fault == "table_grad":   # one pending gradient row of one shard
                next(iter(store.shards.values()))._pending[0][1][0, 0] = float("nan")
            step_loss = torch.tensor(float("nan")) if bad and fault == "loss" else loss.detach()
            return float(optimizers.step(1e-2, step_loss))

        assert math.isfinite(one_step(bad=False))   # a good step first: Adam state exists and moves
        dense0, tables0 = state()
        assert not math.isfinite(one_step(bad=True))
        dense1, tables1 = state()
        assert dense0.keys() == dense1.keys() and tables0.keys() == tables1.keys()
        for k in dense0:
            assert torch.equal(dense0[k], dense1[k]), k
        for k in tables0:
            assert torch.equal(tables0[k], tables1[k]), k
        assert math.isfinite(one_step(bad=False))   # and the next good step trains again
        dense2, tables2 = state()
        assert not torch.equal(dense1["w0"], dense2["w0"])
        assert any(not torch.equal(tables1[k], tables2[k]) for k in tables1 if k.endswith("weight"))
    finally:
        destroy_parallel()
