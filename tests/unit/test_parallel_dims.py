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


def test_a_sweep_job_leaves_only_the_default_group_and_the_end_destroys_it():
    """Between jobs of a torchrun sweep the default group stays and every other group is destroyed (gloo
    groups left to the interpreter's exit can abort the process); the last teardown destroys all."""
    import torch.distributed as dist
    from megatron.core import parallel_state as ps

    from engram_train.config.schema import ParallelConfig
    from engram_train.parallel.dims import parallel_dims
    from engram_train.parallel.state import destroy_parallel, init_parallel

    try:
        init_parallel(ParallelConfig(), seed=1)
        parallel_dims().mesh("cpu")   # a mesh's group too
        extra = dist.new_group([0])
        groups = dict(dist.distributed_c10d._world.pg_map)
        assert extra in groups and len(groups) > 2 and ps.get_tensor_model_parallel_group() in groups
        destroy_parallel(keep_process_group=True)
        assert dist.is_initialized() and list(dist.distributed_c10d._world.pg_map) == [dist.group.WORLD]
        init_parallel(ParallelConfig(), seed=1)   # the next job: the kept group, new subgroups
        assert ps.model_parallel_is_initialized() and len(dist.distributed_c10d._world.pg_map) > 1
    finally:
        destroy_parallel()
    assert not dist.is_initialized()
