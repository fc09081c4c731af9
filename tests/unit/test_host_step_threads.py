"""The host table step on ``engram.host_threads`` threads: bit for bit the one-thread result.

A host-resident store steps twice on gradient rows of ~4,500 unique rows (three row blocks) with 1, 2 and 4 threads; each result is compared bit for bit with an oracle written in the tests (test_table_store's
copy of the rule): the lazy Adam rule applied once to all the step's rows on the calling thread (no blocks, no pool).
"""

from __future__ import annotations

import threading

import pytest
import torch

from engram_train.memory import store as store_module
from engram_train.memory.layout import placement_for, table_specs
from engram_train.memory.optim import host_row_blocks
from engram_train.memory.store import StoreGroups, StoreOptions, TableStore
from tests.unit.test_table_store import BETAS, EPS, _lazy_adam_as_before

LR_MULT = 5.0
SIZES = {2: [2003, 2011, 2017, 2027]}   # one layer, 8,058 rows of width 16
DIM, STEPS = 16, 2


def _grads(step: int, rows: int):
    g = torch.Generator().manual_seed(100 + step)
    ids = torch.randint(0, rows, (7000,), generator=g)
    return ids, torch.randn(ids.numel(), DIM, generator=g)


@pytest.mark.parametrize("optimizer", ["sparse_adam", "sparse_adam_rowwise"])
def test_host_step_is_bit_identical_for_1_2_and_4_threads(optimizer):
    rowwise = optimizer == "sparse_adam_rowwise"
    specs = table_specs(SIZES, n_embed_per_ngram=DIM * 2, heads_per_ngram=2)
    rows = specs[2].rows
    results = {}
    for threads in (1, 2, 4):
        store = TableStore(specs, placement_for("replicated", 1, 0, 1, 0),
                           StoreOptions(optimizer=optimizer, seed=5, betas=BETAS, eps=EPS, lr_mult=LR_MULT,
                                        residency="host", host_threads=threads))
        shard = store.shards[2]
        opt = shard.optimizer
        if threads == 1:
            init = shard.weight.clone()
            want = [init.clone(), torch.zeros_like(opt.exp_avg), torch.zeros_like(opt.exp_avg_sq),
                    torch.zeros(rows, dtype=torch.int32)]
        ran_on, real = set(), opt._step_rows
        opt._step_rows = lambda *a: ran_on.add(threading.current_thread().name) or real(*a)
        pool_s, timed = [], opt._timed_rows
        opt._timed_rows = lambda *a: pool_s.append(timed(*a)) or pool_s[-1]
        for step in range(STEPS):
            ids, g = _grads(step, rows)
            shard.accumulate(ids, g)
            store.reduce_gradients()
            uniq, summed = shard.grad
            if threads == 1:
                assert len(host_row_blocks(uniq.numel(), DIM)) >= 3   # several blocks, shared out
                _lazy_adam_as_before(*want, uniq, summed.clone(), 1e-2 * (step + 1) * LR_MULT, rowwise)
            store.step(1e-2 * (step + 1))
        store.wait_updates()
        # engram_prefetch/update_cpu_s counts the step's CPU seconds on the pool's threads too
        assert store.prefetcher.stats.pop()["engram_prefetch/update_cpu_s"] >= sum(pool_s)
        assert bool(pool_s) == (threads > 1)
        store.prefetcher.close()
        results[threads] = (shard.weight.clone(), opt.exp_avg.clone(), opt.exp_avg_sq.clone(), opt.row_steps.clone())
        if threads == 1:   # no pool: the blocks one after another on the prefetch worker, no hand-off
            assert store.prefetcher.step_pool is None and opt.pool is None
            assert all(n.startswith("engram-host-tables") for n in ran_on), ran_on
        else:              # shared out over the step pool
            assert len({n for n in ran_on if n.startswith("engram-host-step")}) >= 2, ran_on
    assert not torch.equal(results[1][0], init)
    for threads, got in results.items():
        for name, a, b in zip(("weight", "exp_avg", "exp_avg_sq", "row_steps"), got, want):
            assert torch.equal(a, b), f"{optimizer}, {threads} threads: {name} differs from the oracle"


def test_host_threads_default_is_the_cores_left_to_the_rank(monkeypatch):
    monkeypatch.setattr(store_module.os, "sched_getaffinity", lambda pid: set(range(16)), raising=False)
    assert store_module.cores_left_to_rank(8) == 2
    assert store_module.cores_left_to_rank(1) == 16
    assert store_module.cores_left_to_rank(32) == 1
    specs = table_specs(SIZES, n_embed_per_ngram=DIM * 2, heads_per_ngram=2)
    store = TableStore(specs, placement_for("replicated", 1, 0, 1, 0),
                       StoreOptions(optimizer="sparse_adam", residency="host"), StoreGroups(local_world_size=4))
    assert store.prefetcher.step_pool._max_workers == 4
    assert store.shards[2].optimizer.pool is store.prefetcher.step_pool
    store.prefetcher.close()
