"""Registers the typed schemas in Hydra's ConfigStore and turns a composed config into ``Config``.

``conf/config.yaml`` starts its defaults list with ``engram_train_schema``, so every
YAML file and command-line override is checked against the dataclasses: an unknown
key or a value of the wrong type fails at start with the offending key, and
``to_config`` then runs the dataclasses' own validation (``ConfigError``).
"""

from __future__ import annotations

import os

from hydra.core.config_store import ConfigStore
from omegaconf import DictConfig, OmegaConf

from engram_train.config.schema import Config

SCHEMA_NAME = "engram_train_schema"
CONF_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "conf"))


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Instantiate the dataclasses (running their validation) from a composed Hydra config."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    return OmegaConf.to_object(cfg)


def compose(overrides=(), config_name: str = "config") -> Config:
    """Compose ``conf/`` with overrides outside a Hydra app (tests, notebooks, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return to_config(hydra_compose(config_name=config_name, overrides=list(overrides)))
