"""ParallelDims, the one description of which ranks are adjacent, agrees with megatron's own rank
generator (the groups ``init_parallel`` builds), for TP and data-parallel groups at several sizes."""

from __future__ import annotations

import pytest


@pytest.mark.parametrize("world, tp", [(1, 1), (4, 2), (6, 2), (8, 4), (6, 3)])
def test_coords_are_megatrons_layout(world, tp):
    from megatron.core.parallel_state import RankGenerator

    from engram_train.parallel.dims import ParallelDims

    dims = ParallelDims(world, tp)
    gen = RankGenerator(tp=tp, ep=1, dp=world // tp, pp=1, cp=1, order="tp-cp-ep-dp-pp")
    for group in gen.get_ranks("tp"):        # one TP group: one dp coordinate, tp coordinates 0..tp-1
        assert [dims.coords(r) for r in group] == [(dims.coords(group[0])[0], i) for i in range(tp)]
    for group in gen.get_ranks("dp"):        # one DP group: one tp coordinate, dp coordinates 0..dp-1
        assert [dims.coords(r) for r in group] == [(i, dims.tp_rank_of(group[0])) for i in range(dims.dp)]
