"""Optimizer parameter groups with the paper's Engram table policy (docs/engram.md §1.8).

Three groups, for any model (a bare ``EngramBlock`` or a whole GPT holding several):

- ``decay``: matrices and other tensors with ``ndim >= 2`` (projections, the 3-D
  conv weight): base learning rate and weight decay.
- ``no_decay``: ``ndim < 2`` (norm weights, biases): base learning rate, no decay.
- ``engram_table``: parameters marked ``engram_table = True`` (Engram table
  weights): ``lr * table_lr_mult`` (paper: 5x) and ``table_weight_decay`` (paper: 0).

Each group also records ``lr_mult`` so that a schedule can rescale ``lr`` as
``base_lr * group["lr_mult"]``.  Frozen parameters are left out and a parameter
shared by several modules appears once.
"""

from __future__ import annotations

from typing import Dict, List

import torch.nn as nn


def is_engram_table(param) -> bool:
    return bool(getattr(param, "engram_table", False))


def engram_param_groups(model: nn.Module, lr: float, weight_decay: float, table_lr_mult: float = 5.0,
                        table_weight_decay: float = 0.0) -> List[Dict]:
    if not table_lr_mult > 0:
        raise ValueError(f"table_lr_mult={table_lr_mult!r}: must be > 0 (the paper uses 5.0)")
    groups = {
        "decay": {"params": [], "lr": lr, "weight_decay": weight_decay, "lr_mult": 1.0, "name": "decay"},
        "no_decay": {"params": [], "lr": lr, "weight_decay": 0.0, "lr_mult": 1.0, "name": "no_decay"},
        "engram_table": {"params": [], "lr": lr * table_lr_mult, "weight_decay": table_weight_decay,
                         "lr_mult": float(table_lr_mult), "name": "engram_table"},
    }
    for param in model.parameters():   # deduplicates shared parameters
        if not param.requires_grad:
            continue
        if is_engram_table(param):
            key = "engram_table"
        elif param.ndim >= 2:
            key = "decay"
        else:
            key = "no_decay"
        groups[key]["params"].append(param)
    return [g for g in groups.values() if g["params"]]
