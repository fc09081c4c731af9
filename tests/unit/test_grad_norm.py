"""The global gradient norm DeepSpeed clips with includes the table store's gradients.

One process, a small Engram-MoE with its tables in the store, one training step through the
real DeepSpeed engine.  The expected norm is computed independently: the dense part from
DeepSpeed's per-parameter gradients (``safe_get_full_grad``, read before the step), the table
part from the store's sparse rows, and the clipped table update is checked against a
hand-written AdamW step on the clipped rows.
"""

from __future__ import annotations

import math

import pytest
import torch

from engram_train.config.schema import ConfigError

SIZES = {0: [31, 37, 41, 43], 1: [47, 53, 59, 61]}
B, T, VOCAB = 2, 16, 128


def backward_one_batch(engine) -> None:
    """One micro-batch of random tokens and hash ids (seed 0) through ``engine``, and its backward."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, VOCAB, (B, T), generator=g)
    labels = torch.randint(0, VOCAB, (B, T), generator=g)
    hash_ids = {l: torch.randint(0, min(s), (B, T, 4), generator=g) for l, s in SIZES.items()}
    loss = engine(tokens, torch.arange(T).expand(B, T), labels, engram_hash_ids=hash_ids).float().mean()
    engine.backward(loss)


def _cfg(*overrides):
    from engram_train.config.store import compose

    return compose(["experiment=debug_cpu", "model.num_layers=2", "model.hidden_size=64",
                    "model.num_attention_heads=4", "model.ffn_hidden_size=96", "model.moe_ffn_hidden_size=32",
                    f"model.max_seq_length={T}", "engram.layer_ids=[0,1]", "engram.max_ngram=3",
                    "engram.heads_per_ngram=2", "engram.n_embed_per_ngram=16", f"data.seq_length={T}",
                    f"data.micro_batch_size={B}", f"data.global_batch_size={B}", *overrides])


@pytest.mark.parametrize("overrides, precision, optimizer_class", [
    (["parallel.zero_stage=2", "trainer.grad_clip=0.05"], "fp32", "DeepSpeedZeroOptimizer"),   # clipping active
    (["parallel.zero_stage=1", "trainer.grad_clip=1000.0"], "fp32", "DeepSpeedZeroOptimizer"),
    (["parallel.zero_stage=1", "trainer.grad_clip=0.05", "trainer.precision=bf16"], "bf16", "DeepSpeedZeroOptimizer"),
], ids=["zero2_clipped", "zero1_unclipped", "bf16_zero1_clipped"])
def test_deepspeed_norm_includes_tables_and_tables_are_clipped_alike(overrides, precision, optimizer_class):
    from deepspeed.utils import safe_get_full_grad

    from engram_train.parallel.deepspeed_engine import build_engine
    from engram_train.parallel.parallelize import build_parallel_model
    from engram_train.parallel.state import destroy_parallel, init_parallel

    cfg = _cfg(*overrides)
    init_parallel(cfg.parallel, cfg.trainer.seed)
    try:
        bf16 = precision == "bf16"
        model, store = build_parallel_model(cfg, VOCAB, SIZES, torch.bfloat16 if bf16 else torch.float32)
        engine, optimizer = build_engine(model, cfg, 1, bf16, store)
        assert type(optimizer).__name__ == optimizer_class
        backward_one_batch(engine)
        table_sq = float(store.reduce_gradients())
        dense_sq = sum(float(safe_get_full_grad(p).double().square().sum()) for p in model.parameters())
        assert table_sq > 0 and dense_sq > 0
        before = {l: s.weight.clone() for l, s in store.shards.items()}
        grads = {l: (s.grad[0].clone(), s.grad[1].clone()) for l, s in store.shards.items()}
        engine.step()
        norm = float(engine.get_global_grad_norm())
        want = math.sqrt(dense_sq + table_sq)
        assert norm == pytest.approx(want, rel=1e-3 if bf16 else 1e-5)
        assert norm > math.sqrt(dense_sq) * (1 + 1e-4)      # the tables really count

        lr = 1e-2
        store.step(lr, grad_norm=norm, max_norm=cfg.trainer.grad_clip)
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
    from engram_train.parallel.deepspeed_engine import StepLoss, build_engine
    from engram_train.parallel.parallelize import build_parallel_model
    from engram_train.parallel.state import destroy_parallel, init_parallel

    cfg = _cfg("parallel.zero_stage=1", "trainer.grad_clip=1.0", f"trainer.precision={precision}")
    init_parallel(cfg.parallel, cfg.trainer.seed)
    try:
        bf16 = precision == "bf16"
        model, store = build_parallel_model(cfg, VOCAB, SIZES, torch.bfloat16 if bf16 else torch.float32)
        step_loss = StepLoss()
        engine, optimizer = build_engine(model, cfg, 1, bf16, store, step_loss=step_loss)

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
            loss = engine(tokens, torch.arange(T).expand(B, T), labels, engram_hash_ids=hash_ids).float().mean()
            if bad and fault == "dense_grad":
                loss = loss * float("inf")
            engine.backward(loss)
            store.reduce_gradients()
            if bad and fault == "table_grad":
                shard = next(iter(store.shards.values()))
                shard.grad[1][0, 0] = float("nan")
                store._grad_sq_norm = store._grad_sq_norm + shard.grad[1][0, 0].double() ** 2
            step_loss.value = torch.tensor(float("nan")) if bad and fault == "loss" else loss.detach()
            engine.step()
            step_loss.value = None
            norm = engine.get_global_grad_norm()
            store.step(1e-2, grad_norm=norm, max_norm=cfg.trainer.grad_clip)
            return float(norm)

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
