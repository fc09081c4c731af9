"""Lngram from the configuration: the loader's per-layer inputs, block arguments, table specs, sizes.

``engram.keys=latent`` swaps Engram's hashing for these; everything downstream (the
layer's memory slot, the table store, its placements, optimizers and checkpoints) is
shared with Engram.  A layer's tables are one store table of ``sum_n R K^n`` rows of
``engram.latent.memory_dim`` (:mod:`engram_train.lngram.keys`).
"""

from __future__ import annotations

import os
from typing import Dict, List

from engram_train.config.schema import ConfigError

# torch is imported where it is used: the sizing tools and the config checks run without it.


class LatentKeyInputs:
    """What the loader adds to a batch for Lngram: each layer's document numbering ``[B, T, 1]``.

    Stands where Engram's hasher stands (``Collate``): ``inputs(tokens) -> {layer_id: ...}``, and
    ``table_sizes`` ``{layer_id: [rows]}`` for the table store.  The keys themselves are computed
    in the layer, from its hidden states.
    """

    def __init__(self, engram_cfg, eos_id: int):
        self.eos_id = int(eos_id)
        self.layer_ids = [int(i) for i in engram_cfg.layer_ids]
        rows = engram_cfg.latent.table_rows()
        self.table_sizes: Dict[int, List[int]] = {i: [rows] for i in self.layer_ids}

    def __call__(self, tokens):
        from engram_train.lngram.keys import document_segments

        segments = document_segments(tokens, self.eos_id).unsqueeze(-1)
        return {i: segments for i in self.layer_ids}


def block_kwargs(model_cfg, engram_cfg) -> Dict[int, dict]:
    """``LngramBlock`` arguments per 0-based layer id."""
    lt = engram_cfg.latent
    kw = dict(block_class="lngram", hidden_size=model_cfg.hidden_size, routes=lt.routes, bits=lt.bits,
              orders=list(lt.orders), memory_dim=lt.memory_dim, readout_heads=lt.readout_heads,
              readout_kv_heads=lt.readout_kv_heads, kernel_size=engram_cfg.kernel_size,
              route_mass_prior=lt.route_mass_prior, surrogate=lt.surrogate, temperature=lt.temperature,
              scale=lt.scale, init_std=model_cfg.init_method_std, table_init_std=engram_cfg.table_init_std)
    return {int(i): dict(kw) for i in engram_cfg.layer_ids}


def table_specs(engram_cfg):
    """The table store's ``{layer_id: TableSpec}``: one table of every order's rows per layer."""
    from engram_train.memory.layout import TableSpec

    rows = engram_cfg.latent.table_rows()
    return {int(i): TableSpec(int(i), (rows,), engram_cfg.latent.memory_dim) for i in engram_cfg.layer_ids}


def block_params(model_cfg, engram_cfg) -> int:
    """Dense parameters of one ``LngramBlock`` (router, norms, readout projections, conv)."""
    lt, H = engram_cfg.latent, model_cfg.hidden_size
    route_dim = len(lt.orders) * lt.memory_dim
    hd = H // lt.readout_heads
    return (H + H * lt.routes * lt.bits          # router norm + router
            + H + H * lt.readout_heads * hd      # query norm + query projection
            + route_dim + route_dim * 2 * lt.readout_kv_heads * hd
            + lt.readout_heads * hd * H          # output projection
            + H + H * engram_cfg.kernel_size)    # conv norm + conv


def memory_limit_bytes(device) -> int:
    """What one rank can hold at most: the accelerator's memory, or the host's RAM."""
    if str(device).startswith("cuda"):
        import torch

        return int(torch.cuda.get_device_properties(device).total_memory)
    return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"))


def check_shards_fit(specs, placement, engram_cfg, device) -> None:
    """Refuse, in one line with the bytes, tables whose shard (rows and optimizer state) cannot fit one rank."""
    from engram_train.memory.layout import shard_bytes

    need = sum(sum(shard_bytes(s, placement, engram_cfg.optimizer).values()) for s in specs.values())
    limit = memory_limit_bytes(device)
    if need > limit:
        lt = engram_cfg.latent
        raise ConfigError(
            f"engram.latent.orders={list(lt.orders)}: with engram.latent.bits={lt.bits}, routes={lt.routes} and "
            f"memory_dim={lt.memory_dim} each layer's tables hold {lt.table_rows():,} rows; this rank's shard "
            f"(engram.partition={placement.partition}, {placement.parts} part(s), engram.optimizer="
            f"{engram_cfg.optimizer}) needs {need / 2**30:.1f} GiB with optimizer state and gradients, more than "
            f"the {limit / 2**30:.1f} GiB this rank has; lower the bits, orders or routes, or spread the rows "
            "with engram.partition=all over more ranks")
