"""Configuration: Hydra composition against the typed schemas, and validation messages."""

import pytest
from hydra.errors import ConfigCompositionException

from engram_train.config.schema import Config, ConfigError, EngramConfig, ModelConfig, ParallelConfig
from engram_train.config.store import compose


def test_debug_cpu_experiment_composes():
    cfg = compose(["experiment=debug_cpu"])
    assert isinstance(cfg, Config)
    assert cfg.run.dir == "runs/quickstart"
    assert cfg.model.num_experts >= 4 and cfg.model.is_moe
    assert cfg.engram.enabled and len(cfg.engram.layer_ids) == 2
    assert cfg.engram.table_lr_mult == 5.0 and cfg.engram.table_weight_decay == 0.0


def test_overrides_reach_the_dataclasses():
    cfg = compose(["experiment=debug_cpu", "trainer.max_steps=7", "parallel.tensor_parallel=2",
                   "run.dir=/tmp/x", "trainer.seed=5", "parallel.expert_parallel=2"])
    assert (cfg.trainer.max_steps, cfg.parallel.tensor_parallel, cfg.run.dir, cfg.trainer.seed,
            cfg.parallel.expert_parallel) == (7, 2, "/tmp/x", 5, 2)
    assert cfg.parallel.use_sequence_parallel  # on by default under TP


def test_baseline_has_no_engram_and_more_experts():
    base = compose(["experiment=moe_baseline_cpu"])
    eng = compose(["experiment=debug_cpu"])
    assert not base.engram.enabled
    assert base.model.num_experts > eng.model.num_experts
    assert base.model.moe_router_topk == eng.model.moe_router_topk


def test_gpu_recipe_validates_for_8_ranks():
    cfg = compose(["experiment=gpu_1b_8gpu"])
    cfg.validate(world_size=8)
    with pytest.raises(ConfigError, match=r"parallel.expert_parallel=4: must divide the data-parallel size 2"):
        cfg.validate(world_size=4)


def test_unknown_key_fails_with_its_name():
    with pytest.raises(ConfigCompositionException, match=r"trainer.no_such_key"):
        compose(["trainer.no_such_key=1"])


def test_wrong_type_fails_with_its_name():
    with pytest.raises(ConfigCompositionException, match=r"trainer.max_steps"):
        compose(["trainer.max_steps=many"])


@pytest.mark.parametrize("override, pattern", [
    ("parallel.tensor_parallel=3", r"parallel.tensor_parallel=3: must divide model.num_attention_heads=4"),
    ("engram.layer_ids=[1,9]", r"engram.layer_ids=\[1, 9\]: layer ids are 0-based and must be < model.num_layers=4"),
    ("engram.layer_ids=[1,1]", r"engram.layer_ids=\[1, 1\]: layer ids must be distinct"),
    ("engram.max_ngram=1", r"engram.max_ngram=1: must be >= 2"),
    ("engram.n_embed_per_ngram=30", r"engram.n_embed_per_ngram=30: must be divisible by engram.heads_per_ngram=4"),
    ("engram.table_size_per_ngram=[1,100]", r"every table size must be >= 2"),
    ("data.seq_length=512", r"data.seq_length=512: is longer than the model's model.max_seq_length=256"),
    ("parallel.expert_parallel=3", r"parallel.expert_parallel=3: must divide model.num_experts=4"),
    ("parallel.offload_optimizer=nvme", r"parallel.offload_optimizer='nvme': choose 'none' or 'cpu'"),
    ("data.global_batch_size=12", r"data.global_batch_size=12: must be a multiple of data.micro_batch_size=8"),
    ("trainer.min_lr=1.0", r"trainer.min_lr=1.0: must be in \[0, trainer.lr="),
])
def test_validation_messages_name_key_value_and_fix(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        compose(["experiment=debug_cpu", override])


def test_world_size_checks():
    cfg = compose(["experiment=debug_cpu", "parallel.tensor_parallel=2"])
    cfg.validate(world_size=2)
    with pytest.raises(ConfigError, match=r"parallel.tensor_parallel=2: must divide the world size 3"):
        cfg.validate(world_size=3)
    cfg = compose(["experiment=debug_cpu", "data.micro_batch_size=4", "data.global_batch_size=4"])
    with pytest.raises(ConfigError, match=r"data.global_batch_size=4: must be a multiple of micro_batch_size x "
                                          r"data-parallel size = 8"):
        cfg.validate(world_size=2)


def test_component_schemas_validate_on_their_own():
    with pytest.raises(ConfigError, match="model.hidden_size=130"):
        ModelConfig(hidden_size=130, num_attention_heads=4)
    with pytest.raises(ConfigError, match="parallel.offload_optimizer='cpu'"):
        ParallelConfig(zero_stage=0, offload_optimizer="cpu")
    assert not EngramConfig(enabled=False, layer_ids=[]).enabled  # disabled Engram needs no layers
