"""Host tables partitioned over ranks (``engram.partition=tp`` and ``all``): the prefetch is exact.

Each gloo rank trains the table store alone twice on the same micro-batches: device-resident,
looked up synchronously inside the forward (the oracle, itself checked against a one-process
model in ``test_table_store_parallel``), and host-resident through the ``PrefetchingIterator``,
whose worker thread plans each lookup a micro-batch ahead (under ``all`` the id requests travel
to their owners on the prefetcher's own gloo group) and reads the rows this rank serves.  Before
every table step the test waits for the gathers already submitted, so the next micro-batch's
rows are certainly read before the update that changes them: only the read-after-write refresh
(on the owner, for ``all``) makes the results equal, bit for bit; ``staleness=1`` must differ.
An evaluation lookup between steps takes the same path outside the pipeline.
"""

from __future__ import annotations

import pytest
import torch

from tests.distributed.utils import run_distributed

pytestmark = pytest.mark.distributed

SIZES = {0: [31, 37, 41, 43], 2: [47, 53, 59, 61]}
B, T, HEADS, DIM, GAS, STEPS = 2, 12, 4, 8, 2, 4


def _train(partition: str, tp: int, residency: str, staleness: int = 0):
    import torch.distributed as dist

    from engram_train.data.batch import ENGRAM_ROWS
    from engram_train.memory.host import PrefetchingIterator
    from engram_train.memory.layout import placement_for, table_specs
    from engram_train.memory.store import StoreGroups, StoreOptions, TableStore

    rank, world = dist.get_rank(), dist.get_world_size()
    tp_groups = [dist.new_group(list(range(s, s + tp))) for s in range(0, world, tp)]
    tp_group, dp_rank, dp = tp_groups[rank // tp], rank // tp, world // tp
    replica_group = None
    if partition == "tp" and dp > 1:
        raise NotImplementedError("this test runs tp with DP=1")
    store = TableStore(table_specs(SIZES, DIM * 2, 2), placement_for(partition, world, rank, tp, rank % tp),
                       StoreOptions(optimizer="sparse_adam", seed=5, residency=residency, staleness=staleness),
                       StoreGroups(tp_group=tp_group, replica_group=replica_group, world_group=dist.group.WORLD,
                                   dp_size=dp, rank=rank))

    def batches():
        g = torch.Generator().manual_seed(100 + dp_rank)   # each DP rank its own data, TP peers the same
        for i in range(GAS * STEPS):
            # Small id ranges: consecutive micro-batches share rows, across ranks too.
            yield {"engram_hash_ids": {l: torch.randint(0, 9, (B, T, HEADS), generator=g) for l in SIZES},
                   "seed": 1000 * dp_rank + i}

    it = batches()
    if residency == "host":
        it = PrefetchingIterator(it, store.prefetcher, depth=1)
    evaluated = []
    for step in range(STEPS):
        for _ in range(GAS):
            batch = next(it)
            ahead = batch.get(ENGRAM_ROWS, {})   # the rows gathered ahead travel with the batch
            outs = [store.tables[l](h, ahead.get(l)) for l, h in sorted(batch["engram_hash_ids"].items())]
            g = torch.Generator().manual_seed(batch["seed"])
            sum((o * torch.randn(o.shape, generator=g)).square().sum() for o in outs).backward()
        store.reduce_gradients()
        if residency == "host":
            for job in store.prefetcher.pending:   # the next micro-batch's rows are read before the update
                job.gather.result()
        store.step(1e-2)
        if step == 1:
            with torch.no_grad():
                ids = torch.arange(B * T * HEADS).reshape(B, T, HEADS) % 30
                evaluated = [store.tables[l](ids) for l in sorted(SIZES)]
    store.wait_updates()
    refreshed = store.prefetcher.stats.pop()["engram_prefetch/refreshed_rows"] if store.prefetcher else 0.0
    state = {l: (s.weight.clone(), s.optimizer.exp_avg.clone(), s.optimizer.row_steps.clone())
             for l, s in store.shards.items()}
    if store.prefetcher is not None:
        store.prefetcher.close()
    return state, evaluated, refreshed


def _rank(partition: str, tp: int):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    return {"device": _train(partition, tp, "device"), "host": _train(partition, tp, "host"),
            "stale": _train(partition, tp, "host", staleness=1)}


@pytest.mark.parametrize("partition, world, tp", [("tp", 2, 2), ("all", 2, 1), ("all", 4, 2)])
def test_host_tables_under_partitions_train_like_device_tables(partition, world, tp):
    results = run_distributed(_rank, world, partition, tp, timeout=180)
    stale_differs = False
    for rank, r in enumerate(results):
        device, host, stale = r["device"], r["host"], r["stale"]
        assert host[2] > 0, f"rank {rank}: no row was refreshed, the read-after-write path did not run"
        for l in SIZES:
            for what, a, b in zip(("weight", "exp_avg", "row_steps"), device[0][l], host[0][l]):
                assert torch.equal(a, b), f"rank {rank} layer {l} {what}"
            stale_differs |= not torch.equal(device[0][l][0], stale[0][l][0])
        for a, b in zip(device[1], host[1]):
            assert torch.equal(a, b), f"rank {rank}: evaluation lookup"
    assert stale_differs, "staleness=1 trained exactly like staleness=0: the test cannot tell them apart"
