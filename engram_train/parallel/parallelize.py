"""Parallel plans, applied from outside the model in one place and in this order.

1. **Engram table placement** (:mod:`engram_train.memory`): the table store
   is built first, on megatron's process groups, and hands each Engram block
   its table through the layer spec (``build_model(table_provider=...)``), so
   no rank allocates a whole table when tables are partitioned.
2. **Expert placement**: expert weights are re-drawn by global expert index
   (:func:`engram_train.parallel.sharding.init_experts_by_global_index`), so
   an expert starts from the same values at every EP size.
3. **Sequence-parallel gradient hooks** (:mod:`engram_train.parallel.sp_grads`).

Owners: the table store owns the table rows and their optimizer; DeepSpeed
owns every parameter of the model (:func:`owner`), which holds no table rows.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from engram_train.config.schema import Config
from engram_train.engram.params import is_engram_table

TABLE_STORE = "table_store"
DEEPSPEED = "deepspeed"


def owner(param: torch.Tensor) -> str:
    """Who trains ``param``: ``"table_store"`` for Engram table weights, ``"deepspeed"`` for the rest."""
    return TABLE_STORE if is_engram_table(param) else DEEPSPEED


def deepspeed_parameters(model: nn.Module) -> List[nn.Parameter]:
    """The parameters DeepSpeed trains; raises if an Engram table weight is among the model's parameters."""
    tables = [n for n, p in model.named_parameters() if owner(p) == TABLE_STORE]
    if tables:
        raise RuntimeError(f"Engram table weights are model parameters ({tables[:2]}...): the table store "
                           "must own them; build the model with build_parallel_model (or "
                           "build_model(table_provider=store.table))")
    return [p for p in model.parameters() if p.requires_grad]


def parallelize(model: nn.Module, seed: int, sequence_parallel_grad_hooks: bool = True) -> nn.Module:
    """Steps 2 and 3 on a built model (idempotent for the hooks); returns the model."""
    from engram_train.parallel.sharding import init_experts_by_global_index
    from engram_train.parallel.sp_grads import install_sequence_parallel_grad_hooks

    init_experts_by_global_index(model.gpt, seed)
    if sequence_parallel_grad_hooks:
        install_sequence_parallel_grad_hooks(model)
    return model


def build_parallel_model(cfg: Config, vocab_size: int, table_sizes: Optional[Dict[int, Sequence[int]]],
                         params_dtype: torch.dtype = torch.float32) -> Tuple[nn.Module, Optional[object]]:
    """This rank's model and table store (None without Engram), placed in the order above.

    Needs ``init_parallel`` first.
    """
    from engram_train.memory.store import build_table_store
    from engram_train.model.gpt import build_model

    store = None
    if cfg.engram.enabled and table_sizes:
        store = build_table_store(cfg.engram, cfg.trainer, table_sizes, cfg.engram.partition, seed=cfg.trainer.seed)
    model = build_model(cfg.model, cfg.engram, cfg.parallel, vocab_size, table_sizes, params_dtype=params_dtype,
                        table_provider=store.table if store is not None else None)
    return parallelize(model, cfg.trainer.seed), store
