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

from engram_train.config.schema import Config, ConfigError

SCHEMA_NAME = "engram_train_schema"
CONF_DIR = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "conf"))


def register() -> None:
    ConfigStore.instance().store(name=SCHEMA_NAME, node=Config)


def to_config(cfg: DictConfig) -> Config:
    """Instantiate the dataclasses (running their validation) from a composed Hydra config."""
    cfg = OmegaConf.masked_copy(cfg, [k for k in cfg.keys() if k != "hydra"]) if "hydra" in cfg else cfg
    _reject_unknown_keys(cfg, Config, "")
    return OmegaConf.to_object(cfg)


def _reject_unknown_keys(node, schema, prefix: str) -> None:
    # Hydra's struct mode refuses `model.foo=1`, but `+foo=1` / `+model.foo=1` append a key the
    # dataclasses do not have, which OmegaConf.to_object then drops or sets as a stray attribute.
    import dataclasses
    import typing

    names = typing.get_type_hints(schema)   # the schema's annotations are strings (postponed evaluation)
    for key in node.keys():
        if key not in names:
            full = f"{prefix}{key}"
            raise ConfigError(f"{full}: not a configuration key (no field {key!r} in {schema.__name__}, "
                              "engram_train/config/schema.py); check the spelling, and drop a leading '+'")
        sub = node[key]
        ftype = names[key]
        if isinstance(sub, DictConfig) and dataclasses.is_dataclass(ftype):
            _reject_unknown_keys(sub, ftype, f"{prefix}{key}.")


def compose(overrides=(), config_name: str = "config") -> Config:
    """Compose ``conf/`` with overrides outside a Hydra app (tests, notebooks, tools)."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    register()
    with initialize_config_dir(config_dir=CONF_DIR, version_base=None):
        return to_config(hydra_compose(config_name=config_name, overrides=list(overrides)))
