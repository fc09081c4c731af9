"""Host-resident tables (``engram.residency=host``): the prefetch pipeline is exact.

One process, the table store alone (no backbone): micro-batches of hash ids go through the
``PrefetchingIterator`` exactly as in the trainer (the next batch's rows gathered on the worker
thread before the current batch's backward and table step run), with gradient accumulation,
and are compared with a device-resident store fed the same batches synchronously.  Batches
reuse rows on purpose, so a step's updated rows are read by the very next micro-batch: without
the read-after-write refresh the results differ (``staleness=1`` shows it).
"""

from __future__ import annotations

import pytest
import torch

from engram_train.config.schema import ConfigError, EngramConfig
from engram_train.data.batch import ENGRAM_ROWS
from engram_train.memory.host import PrefetchingIterator
from engram_train.memory.layout import placement_for, table_specs
from engram_train.memory.store import StoreOptions, TableStore

SIZES = {0: [31, 37, 41, 43], 3: [47, 53, 59, 61]}
B, T, HEADS, DIM = 2, 12, 4, 8
GAS, STEPS = 2, 5


def _store(residency: str, staleness: int = 0, device: str = "cpu", host_dir=None,
           optimizer: str = "sparse_adam") -> TableStore:
    specs = table_specs(SIZES, n_embed_per_ngram=DIM * 2, heads_per_ngram=2)
    return TableStore(specs, placement_for("replicated", 1, 0, 1, 0),
                      StoreOptions(optimizer=optimizer, seed=7, residency=residency, staleness=staleness,
                                   host_dir=host_dir), device=device)


def _batches(n: int):
    g = torch.Generator().manual_seed(0)
    for i in range(n):
        # Small id ranges: consecutive micro-batches share many rows (read after write matters).
        yield {"engram_hash_ids": {l: torch.randint(0, 9, (B, T, HEADS), generator=g) for l in SIZES},
               "grad_seed": i}


def _train(store: TableStore, prefetch: bool):
    it = _batches(GAS * STEPS)
    if prefetch:
        assert store.prefetcher is not None
        it = PrefetchingIterator(it, store.prefetcher, depth=2)
    for _ in range(STEPS):
        for _ in range(GAS):
            batch = next(it)
            # The loader's ids are CPU tensors (the prefetcher reads those); the model gets device copies.
            # The rows gathered ahead travel with the batch; each table takes its layer's block.
            ahead = batch.get(ENGRAM_ROWS, {})
            outs = [store.tables[l](h.to(store.device), ahead.get(l))
                    for l, h in sorted(batch["engram_hash_ids"].items())]
            g = torch.Generator().manual_seed(1000 + batch["grad_seed"])
            # A loss whose gradient depends on the rows read, so a stale row changes the update.
            loss = sum((o * torch.randn(o.shape, generator=g).to(o.device)).square().sum() for o in outs)
            loss.backward()
        store.reduce_gradients()
        if prefetch:
            # The worst case, made certain: the blocks gathered ahead were read before this update.
            for job in store.prefetcher.pending:
                job.gather.result()
        store.step(1e-2)
    store.wait_updates()   # host tables step on a worker thread: wait before reading the rows
    return {l: (s.weight.cpu().clone(), s.optimizer.exp_avg.cpu().clone(), s.optimizer.row_steps.cpu().clone())
            for l, s in store.shards.items()}


@pytest.mark.parametrize("optimizer", ["sparse_adam", "sparse_adam_rowwise"])
def test_host_resident_training_equals_device_resident_exactly(optimizer):
    device = _train(_store("device", optimizer=optimizer), prefetch=False)
    host_store = _store("host", optimizer=optimizer)
    host = _train(host_store, prefetch=True)
    stats = host_store.prefetcher.stats.pop()
    assert stats["engram_prefetch/rows"] > 0 and 0 < stats["engram_prefetch/unique_ratio"] < 1
    assert stats["engram_prefetch/refreshed_rows"] > 0          # the refresh had work to do
    for l in SIZES:
        for got, want in zip(host[l], device[l]):
            assert torch.equal(got, want), l


def test_training_lookups_read_the_rows_their_batch_carries(monkeypatch):
    # The rows gathered ahead reach the tables with the batch; none is looked up on the spot.
    store = _store("host")
    now = []
    monkeypatch.setattr(store.prefetcher, "lookup_now", lambda *a: now.append(a))
    _train(store, prefetch=True)
    assert now == []


def test_staleness_one_reads_rows_gathered_before_the_update():
    device = _train(_store("device"), prefetch=False)
    stale = _train(_store("host", staleness=1), prefetch=True)
    assert any(not torch.equal(stale[l][0], device[l][0]) for l in SIZES)


def test_memory_mapped_host_tables_train_the_same_and_live_in_their_files(tmp_path):
    plain = _train(_store("host"), prefetch=True)
    store = _store("host", host_dir=str(tmp_path))
    mapped = _train(store, prefetch=True)
    for l in SIZES:
        for got, want in zip(mapped[l], plain[l]):
            assert torch.equal(got, want), l
    for l, shard in store.shards.items():
        tensors = {"weight": shard.weight, **shard.optimizer.state_tensors()}
        for name, t in tensors.items():
            path = tmp_path / f"rank00000_layer{l}_rows{shard.lo}-{shard.hi}_{name}.bin"
            assert path.stat().st_size == t.numel() * t.element_size()
            # What the file holds, read through a separate private mapping, is the live tensor.
            on_disk = torch.from_file(str(path), shared=False, size=t.numel(), dtype=t.dtype).view(t.shape)
            assert torch.equal(on_disk, t), (l, name)


def test_lookups_outside_the_pipeline_read_the_host_rows_synchronously():
    # Evaluation takes batches without the iterator: nothing is prefetched and nothing stale is used.
    store = _store("host")
    ids = torch.randint(0, 9, (B, T, HEADS))
    with torch.no_grad():
        out = store.tables[0](ids)
    w = store.shards[0].weight
    offsets = torch.tensor(store.shards[0].spec.offsets)
    torch.testing.assert_close(out, w[ids + offsets].flatten(-2), rtol=0, atol=0)


def test_host_residency_needs_sparse_adam():
    with pytest.raises(ConfigError, match=r"engram.optimizer='adam': host-resident tables train with "
                                          r"engram.optimizer=sparse_adam"):
        EngramConfig(residency="host")
    with pytest.raises(ConfigError, match=r"engram.staleness=2"):
        EngramConfig(residency="host", optimizer="sparse_adam", staleness=2)
    with pytest.raises(ConfigError, match=r"engram.host_dir='/x': memory-mapped table files need engram.residency=host"):
        EngramConfig(host_dir="/x")


def test_prefetch_stats_count_the_worker_threads_cpu_seconds():
    """``engram_prefetch/gather_cpu_s`` and ``/update_cpu_s`` (tools/plan_offload.py compares its predictions
    with them): CPU time of the worker in gathers and in table steps, reset by each pop."""
    store = _store("host")
    _train(store, prefetch=True)
    store.wait_updates()
    stats = store.prefetcher.stats.pop()
    assert stats["engram_prefetch/gather_cpu_s"] > 0 and stats["engram_prefetch/update_cpu_s"] > 0
    assert stats["engram_prefetch/table_steps"] == STEPS   # every table step counted once
    # Bounded by the wall time of the whole run on one thread: CPU seconds, not a sum of timestamps.
    assert stats["engram_prefetch/gather_cpu_s"] + stats["engram_prefetch/update_cpu_s"] < 60
    again = store.prefetcher.stats.pop()
    assert again["engram_prefetch/gather_cpu_s"] == 0 and again["engram_prefetch/update_cpu_s"] == 0
    assert again["engram_prefetch/table_steps"] == 0
    store.prefetcher.close()


def test_public_timing_runs_the_workers_gather_and_table_step():
    """``HostPrefetcher.gather_timed`` / ``table_step_timed`` (what ``plan_offload --calibrate`` times): the
    worker's own gather and table step with its refresh, on the calling thread, and their CPU seconds."""
    from tests.unit.test_table_store import _lazy_adam_as_before

    store = _store("host")
    p = store.prefetcher
    ids = {l: torch.randint(0, 9, (B, T, HEADS), generator=torch.Generator().manual_seed(l)) for l in SIZES}
    blocks, gather_s = p.gather_timed(ids)
    assert gather_s > 0
    for l, h in ids.items():
        shard = store.shards[l]
        want = torch.unique(h + torch.tensor(shard.spec.offsets))   # the block: sorted unique global ids
        assert torch.equal(blocks[l].uniq, want)
        assert torch.equal(blocks[l].rows, shard.weight[want - shard.lo])
    # Step half of the rows read ahead: the step is the optimizer's, and the block re-reads those rows.
    shard, opt = store.shards[0], store.shards[0].optimizer
    local = blocks[0].uniq[::2] - shard.lo
    grads = torch.randn(local.numel(), DIM, generator=torch.Generator().manual_seed(9))
    want = [shard.weight.clone(), opt.exp_avg.clone(), opt.exp_avg_sq.clone(), opt.row_steps.clone()]
    _lazy_adam_as_before(*want, local, grads.clone(), 1e-2)
    before = blocks[0].rows.clone()
    step_s = p.table_step_timed(lambda: opt.step(local, grads, 1e-2), {0: local}, [blocks])
    assert step_s > 0
    for name, got, w in zip(("weight", "exp_avg", "exp_avg_sq", "row_steps"),
                            (shard.weight, opt.exp_avg, opt.exp_avg_sq, opt.row_steps), want):
        assert torch.equal(got, w), name
    assert torch.equal(blocks[0].rows, shard.weight[blocks[0].uniq - shard.lo])   # read after write
    assert not torch.equal(blocks[0].rows[::2], before[::2]) and torch.equal(blocks[0].rows[1::2], before[1::2])
    p.close()
