"""Engram table rows train at ``lr * engram.table_lr_mult`` with ``engram.table_weight_decay``, in the
table store's optimizer, never in DeepSpeed's.

One process, the trainer's own builders (``build_parallel_model``, ``build_optimizers``), non-default
values for the multiplier and a dense weight decay, so that a table row trained at the dense
learning rate or decay, or left in a DeepSpeed group, shows.  The expected rows come from a
hand-written AdamW step on the store's reduced gradient rows.
"""

from __future__ import annotations

import pytest
import torch

from tests.unit.test_grad_norm import SIZES, VOCAB, _cfg as _grad_norm_cfg, backward_one_batch, record_table_grads


def _cfg(*overrides):
    return _grad_norm_cfg("trainer.grad_clip=0.0", "trainer.weight_decay=0.1", *overrides)


def _adamw_first_step(w, g, lr, wd, b1, b2, eps):
    """torch.optim.AdamW's first step, written out: decoupled decay, then the bias-corrected update."""
    m, v = (1 - b1) * g, (1 - b2) * g * g
    return w * (1 - lr * wd) - lr * (m / (1 - b1)) / ((v / (1 - b2)).sqrt() + eps)


@pytest.mark.parametrize("optimizer, lr_mult, table_wd", [
    ("adam", 3.0, 0.0), ("sparse_adam", 3.0, 0.0), ("adam", 7.0, 0.05)])
def test_table_rows_keep_their_lr_multiplier_and_weight_decay(optimizer, lr_mult, table_wd):
    from engram_train.parallel.parallelize import build_parallel_model
    from engram_train.parallel.state import destroy_parallel, init_parallel
    from engram_train.train.optimizers import build_optimizers

    cfg = _cfg(f"engram.optimizer={optimizer}", f"engram.table_lr_mult={lr_mult}",
               f"engram.table_weight_decay={table_wd}")
    init_parallel(cfg.parallel, cfg.trainer.seed)
    try:
        model, store = build_parallel_model(cfg, VOCAB, SIZES, torch.float32)
        optimizers = build_optimizers(model, cfg, 1, False, store)
        engine, ds_optimizer = optimizers.engine, optimizers.dense.zero

        # DeepSpeed trains the model's parameters and nothing of the tables.
        table_ptrs = {s.weight.untyped_storage().data_ptr() for s in store.shards.values()}
        ds_params = [p for group in ds_optimizer.bit16_groups for p in group]
        assert ds_params and not any(p.untyped_storage().data_ptr() in table_ptrs for p in ds_params)
        for group in ds_optimizer.optimizer.param_groups:
            assert not any(p.untyped_storage().data_ptr() in table_ptrs for p in group["params"])
        assert {id(p) for p in ds_params} == {id(p) for p in model.parameters() if p.requires_grad}
        assert not any(s.weight.requires_grad for s in store.shards.values())

        lr = 2e-3
        loss = backward_one_batch(optimizers)
        before = {l: s.weight.clone() for l, s in store.shards.items()}
        grads = record_table_grads(store)
        optimizers.step(lr, loss)
        # The dense groups ran at the schedule's lr with the dense decay: the tables' values are their own.
        assert all(group["lr"] == lr for group in ds_optimizer.optimizer.param_groups)

        b1, b2, eps = cfg.trainer.adam_beta1, cfg.trainer.adam_beta2, cfg.trainer.adam_eps
        for l, shard in store.shards.items():
            ids, rows = grads[l]
            assert ids.numel() > 0
            want = _adamw_first_step(before[l][ids], rows, lr * lr_mult, table_wd, b1, b2, eps)
            torch.testing.assert_close(shard.weight[ids], want, rtol=1e-5, atol=1e-7)
            # The effective learning rate, read back from one coordinate: |dw| = lr_eff (sign step) + decay.
            dw = (shard.weight[ids] - before[l][ids] * (1 - lr * lr_mult * table_wd)).abs()
            big = rows.abs() > 1e3 * eps
            torch.testing.assert_close(dw[big], torch.full_like(dw[big], lr * lr_mult), rtol=1e-3, atol=0)
            untouched = torch.ones(shard.num_rows, dtype=torch.bool)
            untouched[ids] = False
            if optimizer == "adam":   # dense Adam decays every row; no moment, so only the decay moves them
                want_untouched = before[l][untouched] * (1 - lr * lr_mult * table_wd)
            else:                     # lazy: rows the step did not touch do not change at all
                want_untouched = before[l][untouched]
            torch.testing.assert_close(shard.weight[untouched], want_untouched, rtol=0, atol=0)
    finally:
        destroy_parallel()
