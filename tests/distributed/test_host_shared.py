"""Host tables shared by the ranks of one node (``engram.host_dir``): one copy, trained exactly.

Two gloo ranks on one node are data-parallel replicas of a replicated host table.  With a
``host_dir`` they map one set of files: the lower rank initializes and updates it, the other
only reads.  Each rank trains on its own batches through the prefetch iterator; the result must
equal two private copies trained the same way (each rank its own table), bit for bit.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.utils import run_distributed

pytestmark = pytest.mark.distributed

SIZES = {0: [31, 37, 41, 43], 2: [47, 53, 59, 61]}
B, T, HEADS, DIM, GAS, STEPS = 2, 12, 4, 8, 2, 4


def _train(host_dir):
    import torch.distributed as dist

    from engram_train.data.batch import ENGRAM_ROWS
    from engram_train.memory.host import PrefetchingIterator
    from engram_train.memory.layout import placement_for, table_specs
    from engram_train.memory.store import StoreGroups, StoreOptions, TableStore

    rank, world = dist.get_rank(), dist.get_world_size()
    store = TableStore(table_specs(SIZES, DIM * 2, 2), placement_for("replicated", world, rank, 1, 0),
                       StoreOptions(optimizer="sparse_adam", seed=3, residency="host", host_dir=host_dir),
                       StoreGroups(replica_group=dist.group.WORLD, world_group=dist.group.WORLD, dp_size=world,
                                   rank=rank, local_world_size=world))

    def batches():
        g = torch.Generator().manual_seed(100 + rank)   # each DP rank its own data
        for i in range(GAS * STEPS):
            yield {"engram_hash_ids": {l: torch.randint(0, 9, (B, T, HEADS), generator=g) for l in SIZES},
                   "seed": 1000 * rank + i}

    it = PrefetchingIterator(batches(), store.prefetcher, depth=1)
    for _ in range(STEPS):
        for _ in range(GAS):
            batch = next(it)
            ahead = batch[ENGRAM_ROWS]   # the rows gathered ahead travel with the batch
            outs = [store.tables[l](h, ahead.get(l)) for l, h in sorted(batch["engram_hash_ids"].items())]
            g = torch.Generator().manual_seed(batch["seed"])
            sum((o * torch.randn(o.shape, generator=g)).square().sum() for o in outs).backward()
        store.reduce_gradients()
        store.step(1e-2)
    store.wait_updates()   # host tables step on a worker thread: wait before reading the rows
    state = {l: (s.weight.clone(), s.optimizer.exp_avg.clone(), s.optimizer.row_steps.clone())
             for l, s in store.shards.items()}
    return state, store.shared, store.owner


def _rank(shared_dir):
    import torch.distributed as dist

    dist.init_process_group("gloo")
    private = _train(None)
    shared = _train(shared_dir)
    return private, shared, sorted(os.listdir(shared_dir))


def test_ranks_of_a_node_share_one_copy_and_train_like_private_copies(tmp_path):
    results = run_distributed(_rank, 2, str(tmp_path), timeout=120)
    (priv0, shared0, files), (priv1, shared1, _) = results
    assert shared0[1:] == (True, True) and shared1[1:] == (True, False)   # shared; rank 0 updates
    for l in SIZES:
        for a, b, c, d in zip(priv0[0][l], priv1[0][l], shared0[0][l], shared1[0][l]):
            assert torch.equal(a, b) and torch.equal(a, c) and torch.equal(a, d), l
    # One set of files for the node: 2 layers x (weight, 2 moments, row steps).
    assert len(files) == 8 and all(f.startswith("node00000_") for f in files)
