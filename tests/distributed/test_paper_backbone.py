"""The paper's backbone end to end (``experiment=paper_cpu``, shrunk): layouts, recompute, resharding.

paper_cpu has every model feature of Engram-27B: mHC (4 streams), shared + routed experts with sigmoid
scores and expert-bias balancing, MLA, full recompute.

Every run goes through the real entry point under torchrun (gloo).  The single
process with the same seed and global batch is the oracle of the parallel layouts
(1e-4 relative over 5 steps); ``model.recompute=full|selective`` must give the
``none`` run's losses at the same layout bit for bit (fp32 on CPU), with device-
and with host-resident tables; a checkpoint written at one layout continues at
another with the uninterrupted losses and the MoE expert bias (routing state)
restored bit for bit.

Each launch costs ~15 s of CI, so the combinations are chosen to cover each
mechanism once: recompute over the TP exchange (device tables) and over the
``all`` exchange (host tables, full and selective); resharding from EP=2 to one
process and from ``all`` on DP=2 to TP=2 under full recompute.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.test_train import _assert_close, data_overrides, launch, logged_steps, losses  # noqa: F401

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

# paper_cpu's features at the size of test_train's TINY model.
PAPER = [
    "experiment=paper_cpu",
    "model.num_layers=2", "model.hidden_size=64", "model.num_attention_heads=4",
    "model.ffn_hidden_size=128", "model.max_seq_length=64",
    "model.moe_ffn_hidden_size=32", "model.moe_shared_expert_ffn_hidden_size=64",
    "model.q_lora_rank=32", "model.kv_lora_rank=32", "model.qk_head_dim=16", "model.qk_pos_emb_head_dim=8",
    "model.v_head_dim=16",
    "engram.layer_ids=[0,1]", "engram.n_embed_per_ngram=32", "engram.heads_per_ngram=4",
    "engram.table_size_multiplier=2.0",
    "data.seq_length=64", "data.micro_batch_size=4", "data.global_batch_size=8", "data.vocab_size=512",
    "data.valid_fraction=0.05",
    "trainer.warmup_steps=1", "trainer.log_interval=1", "trainer.eval_interval=1000",
    "trainer.eval_iters=2", "trainer.save_interval=1000", "trainer.progress=false",
    "run.wandb_mode=disabled", "trainer.max_steps=5",
]
NONE = ["model.recompute=none"]
HOST = ["engram.optimizer=sparse_adam", "engram.residency=host"]
RATE = 1.0e-3   # paper_cpu's model.moe_router_bias_update_rate
LAYOUTS = {
    "single": (1, []),
    "tp2": (2, ["parallel.tensor_parallel=2"]),
    "ep2": (2, ["parallel.expert_parallel=2"]),
    "all_dp2": (2, ["engram.partition=all"]),
}


@pytest.fixture(scope="module")
def paper_runs(tmp_path_factory, data_overrides):
    """Each layout once, without recompute: the single process is the oracle of the others."""
    runs = {}
    for name, (nproc, extra) in LAYOUTS.items():
        run_dir = tmp_path_factory.mktemp(f"paper_{name}")
        launch(nproc, PAPER + data_overrides + NONE + extra + [f"run.dir={run_dir}"])
        runs[name] = run_dir
    return runs


def test_paper_backbone_trains_and_the_layouts_match_one_process(paper_runs):
    single = losses(paper_runs["single"])
    assert sorted(single) == [1, 2, 3, 4, 5] and single[5] < single[1]
    for name in ("tp2", "ep2", "all_dp2"):
        _assert_close(losses(paper_runs[name]), single, rtol=1e-4)


@pytest.fixture(scope="module")
def host_runs(tmp_path_factory, data_overrides):
    """Host-resident tables without recompute, at the layouts the recompute tests use."""
    runs = {}
    for name in ("all_dp2",):
        nproc, extra = LAYOUTS[name]
        run_dir = tmp_path_factory.mktemp(f"paper_host_{name}")
        launch(nproc, PAPER + data_overrides + NONE + HOST + extra + [f"run.dir={run_dir}"])
        runs[name] = run_dir
    return runs


def expert_bias(run_dir, step: int) -> dict:
    """``{name: bias}`` as the step's checkpoint holds it in its dense part (read without a process group)."""
    import torch.distributed.checkpoint as dcp

    path = os.path.join(run_dir, "checkpoints", f"step_{step:08d}")
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    sd = {k: torch.empty(tuple(m.size), dtype=torch.float32) for k, m in meta.items() if k.startswith("dense.buffer.")}
    dcp.load(sd, checkpoint_id=path, no_dist=True)
    return {k[len("dense."):]: v for k, v in sd.items()}


@pytest.mark.parametrize("name, layout, recompute, tables", [
    ("tp2_full_device", "tp2", "full", "device"),
    ("all_full_host", "all_dp2", "full", "host"),
    ("all_selective_host", "all_dp2", "selective", "host"),
])
def test_recompute_gives_the_losses_of_no_recompute(tmp_path, paper_runs, host_runs, data_overrides, name, layout,
                                                    recompute, tables):
    """Recomputed sublayers replay no table exchange and push no row gradient twice: bit for bit."""
    nproc, extra = LAYOUTS[layout]
    oracle_dir = (paper_runs if tables == "device" else host_runs)[layout]
    want = losses(oracle_dir)
    assert sorted(want) == [1, 2, 3, 4, 5]
    run_dir = tmp_path / name
    launch(nproc, PAPER + data_overrides + extra + (HOST if tables == "host" else [])
           + [f"model.recompute={recompute}", f"run.dir={run_dir}"])
    assert losses(run_dir) == want
    # the routers counted every token once (in the replay, not in the no-grad first pass): same bias
    got_bias, want_bias = expert_bias(run_dir, 5), expert_bias(oracle_dir, 5)
    assert sorted(got_bias) == sorted(want_bias) and want_bias
    assert all(torch.equal(got_bias[k], want_bias[k]) for k in want_bias)


@pytest.mark.parametrize("name, first, second, recompute", [
    ("ep2_to_single", "ep2", "single", NONE),
    ("all_dp2_to_tp2_recomputed", "all_dp2", "tp2", []),      # paper_cpu's own model.recompute=full
])
def test_paper_checkpoint_resumes_at_another_layout(tmp_path, paper_runs, data_overrides, name, first, second,
                                                    recompute):
    run_dir = tmp_path / name
    common = PAPER + data_overrides + recompute + [f"run.dir={run_dir}"]
    launch(LAYOUTS[first][0], common + LAYOUTS[first][1] + ["trainer.stop_at_step=2"])
    assert logged_steps(run_dir) == [0, 1, 2]
    out = launch(LAYOUTS[second][0], common + LAYOUTS[second][1])
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} (step 2)" in out
    assert logged_steps(run_dir) == [0, 1, 2, 3, 4, 5]     # continued, not started over
    # The expert bias (routing state, updated every step) travels with the checkpoint: resumed at
    # step 2 without it, routing from step 3 on would differ from the uninterrupted run's.
    _assert_close(losses(run_dir), losses(paper_runs["single"]), rtol=1e-4)
    got, want = expert_bias(run_dir, 5), expert_bias(paper_runs["single"], 5)
    assert sorted(got) == sorted(want) == [f"buffer.gpt.decoder.layers.{i}.mlp.router.expert_bias" for i in (0, 1)]
    at_stop = expert_bias(run_dir, 2)
    for name in want:
        # updates of +-rate (or 0) per step from zero: 5 steps move it by at most 5 rates
        steps = (want[name] / RATE).round()
        assert 0 < steps.abs().max() <= 5
        torch.testing.assert_close(want[name], steps * RATE, rtol=0, atol=1e-6)
        assert at_stop[name].abs().max() > 0 and not torch.equal(at_stop[name], got[name])   # moved on after resume
        torch.testing.assert_close(got[name], want[name], rtol=0, atol=0)   # restored at step 2, then moved alike
