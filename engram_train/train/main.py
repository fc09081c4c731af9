"""``engram-train``: the Hydra entry point.

    engram-train experiment=debug_cpu trainer.max_steps=50 run.dir=runs/try
    torchrun --nproc-per-node 2 -m engram_train.train.main experiment=debug_cpu parallel.tensor_parallel=2
"""

from __future__ import annotations

import os
import sys

import hydra
from omegaconf import DictConfig

from engram_train.config.schema import ConfigError
from engram_train.config.store import CONF_DIR, register, to_config

register()


@hydra.main(version_base=None, config_path=CONF_DIR, config_name="config")
def _main(cfg: DictConfig) -> None:
    try:
        config = to_config(cfg)
    except ConfigError as e:
        print(f"engram-train: invalid configuration: {e}", file=sys.stderr)
        sys.exit(2)
    from engram_train.train.trainer import run

    run(config)


def main() -> None:
    os.environ.setdefault("DS_ACCELERATOR", "cpu" if not _cuda() else "cuda")
    _main()


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    main()
