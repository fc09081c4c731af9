"""The MoE expert bias is training state: a run stopped at EP=2 resumes at EP=1 with the bias restored
bit for bit and the uninterrupted run's losses (issue 15).

The bias (one fp32 value per expert and MoE layer, replicated) moves once per optimizer step by
``rate x sign(mean load - load)``; a resumed run that lost it would route steps 3-4 differently.
"""

from __future__ import annotations

import os

import pytest
import torch

from tests.distributed.test_train import TINY, _assert_close, data_overrides, launch, logged_steps, losses  # noqa: F401

pytestmark = [pytest.mark.distributed, pytest.mark.slow]

DEEPSEEK_MOE = [
    "model.attention=mla", "model.q_lora_rank=32", "model.kv_lora_rank=24", "model.qk_head_dim=16",
    "model.qk_pos_emb_head_dim=8", "model.v_head_dim=16", "model.moe_shared_expert_ffn_hidden_size=64",
    "model.moe_router_score_function=sigmoid", "model.moe_router_enable_expert_bias=true",
    "model.moe_router_load_balancing_type=none", "model.moe_router_bias_update_rate=0.01",
    "model.moe_router_topk_scaling_factor=2.0",
]
RATE = 0.01


def expert_bias(run_dir, step: int) -> dict:
    """``{name: bias}`` as the step's dense checkpoint holds it (read without a process group)."""
    import torch.distributed.checkpoint as dcp

    path = os.path.join(run_dir, "checkpoints", f"step_{step:08d}", "dense")
    meta = dcp.FileSystemReader(path).read_metadata().state_dict_metadata
    sd = {k: torch.empty(tuple(m.size), dtype=torch.float32) for k, m in meta.items() if k.startswith("buffer.")}
    dcp.load(sd, checkpoint_id=path, no_dist=True)
    return sd


def test_expert_bias_resumes_exactly_at_another_expert_parallel_size(tmp_path, data_overrides):  # noqa: F811
    common = TINY + DEEPSEEK_MOE + data_overrides + ["trainer.max_steps=4", "trainer.save_interval=2"]
    oracle = tmp_path / "uninterrupted_ep1"
    launch(1, common + [f"run.dir={oracle}"])
    run_dir = tmp_path / "ep2_to_ep1"
    launch(2, common + [f"run.dir={run_dir}", "parallel.expert_parallel=2", "trainer.stop_at_step=2"])
    assert logged_steps(run_dir) == [0, 1, 2]
    out = launch(1, common + [f"run.dir={run_dir}"])
    assert f"resumed from {run_dir / 'checkpoints' / 'step_00000002'} (step 2)" in out
    assert logged_steps(run_dir) == [0, 1, 2, 3, 4]     # continued, not started over
    _assert_close(losses(run_dir), losses(oracle), rtol=1e-4)

    want2, want4 = expert_bias(oracle, 2), expert_bias(oracle, 4)
    assert sorted(want2) == [f"buffer.gpt.decoder.layers.{i}.mlp.router.expert_bias" for i in (0, 1)]
    for name in want2:
        # two updates of +-RATE (or 0) from zero, then two more: the bias moved, in steps of the rate
        assert want2[name].abs().max() > 0 and not torch.equal(want4[name], want2[name])
        steps = (want4[name] / RATE).round()
        assert torch.allclose(want4[name], steps * RATE) and steps.abs().max() <= 4
    got2, got4 = expert_bias(run_dir, 2), expert_bias(run_dir, 4)
    for name in want2:
        assert torch.equal(got2[name], want2[name]), (name, got2[name], want2[name])   # EP=2 saved it as EP=1
        assert torch.equal(got4[name], want4[name]), (name, got4[name], want4[name])   # restored, then moved
