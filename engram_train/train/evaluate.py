"""Validation loss and perplexity over a fixed set of held-out batches."""

from __future__ import annotations

import math
from typing import Dict, Iterable

import torch
import torch.distributed as dist

from engram_train.data.batch import ENGRAM_ROWS, HASH_IDS


def masked_mean(per_token_loss: torch.Tensor, loss_mask: torch.Tensor) -> torch.Tensor:
    mask = loss_mask.to(per_token_loss.dtype)
    return (per_token_loss * mask).sum() / mask.sum().clamp(min=1)


def to_device(batch: Dict, device) -> Dict:
    out = {}
    for k, v in batch.items():
        if torch.is_tensor(v):
            out[k] = v.to(device, non_blocking=True)
        elif isinstance(v, dict):
            out[k] = {kk: vv.to(device, non_blocking=True) for kk, vv in v.items()}
        else:
            out[k] = v
    return out


def forward_per_token(model, batch: Dict) -> torch.Tensor:
    """The model's per-token loss of ``batch``, with the Engram rows a pipeline stage gathered ahead, if any."""
    return model(batch["tokens"], batch["position_ids"], batch["labels"],
                 engram_hash_ids=batch.get(HASH_IDS) or None, engram_rows=batch.get(ENGRAM_ROWS))


def forward_loss(model, batch: Dict) -> torch.Tensor:
    return masked_mean(forward_per_token(model, batch).float(), batch["loss_mask"])


@torch.no_grad()
def evaluate(model, batches: Iterable[Dict], device, dp_group=None) -> Dict[str, float]:
    """Token-weighted mean loss over every DP rank's share of the validation batches."""
    was_training = model.training
    model.eval()
    # On the model's device: NCCL reduces only device tensors, and summing there avoids a sync per batch.
    total = torch.zeros(2, dtype=torch.float64, device=device)
    for batch in batches:
        batch = to_device(batch, device)
        per_token = forward_per_token(model, batch).float()
        mask = batch["loss_mask"].to(per_token.dtype)
        total[0] += (per_token * mask).sum().double()
        total[1] += mask.sum().double()
    if dist.is_initialized() and dp_group is not None and dist.get_world_size(dp_group) > 1:
        dist.all_reduce(total, group=dp_group)
    model.train(was_training)
    loss = (total[0] / total[1].clamp(min=1)).item()
    return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}
