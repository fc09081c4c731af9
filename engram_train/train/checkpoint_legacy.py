"""Reading checkpoints of the earlier layout, for ``Checkpointer`` (``engram_train.train.checkpoint``).

Before one ``dcp.save`` held every component, a checkpoint was ``step_N/`` with ``meta.json`` beside
three directories: ``dense/`` and ``tables/`` (each its own DCP checkpoint, the same keys as today
without the ``dense.`` / ``tables.`` prefix; ``tables/manifest.json`` the tables' manifest) and
``rng/rank_<r>.pt`` (each rank's RNG states, ``torch.save``).  The position (step, consumed samples,
the non-finite guard's record) was in ``meta.json`` only.  Nothing writes this layout any more;
these two functions load it into today's components, in the same agreed phases as the current layout.
"""

from __future__ import annotations

import os
from typing import Any, Dict

import torch

from engram_train.train.checkpoint import Checkpointer, TrainState, _read_file, _read_json, _set_rng_state


def read(ckpt: Checkpointer, engine, path: str, meta: Dict[str, Any], table_store, same_world: bool) -> Dict[str, Any]:
    """``Checkpointer._read`` of a checkpoint of the earlier layout: its metadata checked against the run,
    and this rank's RNG file read."""
    import torch.distributed.checkpoint as dcp

    from engram_train.memory import checkpoint as table_checkpoint
    from engram_train.parallel import dense_checkpoint

    keys = _read_file(os.path.join(path, "dense"), os.path.join("dense", ".metadata"),
                      lambda p: dcp.FileSystemReader(p).read_metadata().state_dict_metadata)
    dense_keys = dense_checkpoint.check_compatible(engine, keys, path)
    rng = None
    if same_world:
        rng_name = os.path.join("rng", f"rank_{ckpt.rank:05d}.pt")
        rng = _read_file(os.path.join(path, rng_name), rng_name, lambda p: torch.load(p, weights_only=False))
    if table_store is not None:
        name = os.path.join("tables", table_checkpoint.MANIFEST)
        saved = _read_file(os.path.join(path, name), name, _read_json)
        table_checkpoint.check_compatible(table_store, saved, path)
    return {"meta": meta, "same_world": same_world, "legacy": {"rng": rng, "dense_keys": set(dense_keys)}}


def load(ckpt: Checkpointer, engine, path: str, meta: Dict[str, Any], found: Dict[str, Any], table_store) -> TrainState:
    """Load a checkpoint of the earlier layout: each component from its own directory, the RNG states
    ``read`` found, the position from ``meta.json``."""
    import torch.distributed.checkpoint as dcp

    from engram_train.parallel.dense_checkpoint import DenseState

    def load_dir(component, directory: str, keep=lambda key: True):
        sd = {k: v for k, v in component.state_dict().items() if keep(k)}
        dcp.load(sd, checkpoint_id=os.path.join(path, directory))
        component.load_state_dict(sd)

    # Written before the first step, the dense part has no Adam moments: load only the keys it has.
    dense = DenseState(engine)
    ckpt._on_every_rank(path, lambda: load_dir(dense, "dense", lambda k: k in found["dense_keys"]), "dense")
    if table_store is not None:
        ckpt._on_every_rank(path, lambda: load_dir(table_store, "tables"), "tables")
    if found["rng"] is not None:
        _set_rng_state(found["rng"])
    return TrainState(step=meta["step"], consumed_samples=meta["consumed_samples"],
                      skipped_steps=meta.get("skipped_steps", 0), nonfinite_streak=meta.get("nonfinite_streak", 0),
                      first_nonfinite_step=meta.get("first_nonfinite_step"))

