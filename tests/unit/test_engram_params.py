"""Optimizer groups: tables at table_lr_mult x lr without weight decay, everything else by the base policy."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

from engram_train.engram.block import EngramBlock
from engram_train.engram.params import engram_param_groups


class TinyGPT(nn.Module):
    """Two Engram blocks inside a model that also has its own matrices, norms, biases and a frozen tensor."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(50, 16)
        self.engram = nn.ModuleList([EngramBlock(16, 2, [37, 41, 43, 47], 8, 2, 3),
                                     EngramBlock(16, 2, [53, 59, 61, 67], 8, 2, 3)])
        self.norm = nn.RMSNorm(16)
        self.head = nn.Linear(16, 50)
        self.head_alias = self.head            # a shared module must not duplicate its parameters
        self.frozen = nn.Parameter(torch.ones(4, 4), requires_grad=False)


def by_name(groups):
    return {g["name"]: g for g in groups}


def test_groups_follow_the_paper_policy():
    model = TinyGPT()
    groups = engram_param_groups(model, lr=1e-3, weight_decay=0.1)
    named = {id(p): n for n, p in model.named_parameters()}
    g = by_name(groups)
    assert set(g) == {"decay", "no_decay", "engram_table"}
    names = {k: sorted(named[id(p)] for p in v["params"]) for k, v in g.items()}
    assert names["engram_table"] == ["engram.0.table.weight", "engram.1.table.weight"]
    assert names["decay"] == sorted(["embed.weight", "head.weight"] + [
        f"engram.{i}.{n}" for i in (0, 1) for n in ("key_proj.weight", "value_proj.weight", "conv.weight")])
    assert names["no_decay"] == sorted(["norm.weight", "head.bias"] + [
        f"engram.{i}.{n}" for i in (0, 1) for n in ("key_proj.bias", "value_proj.bias", "key_norm.weight",
                                                   "query_norm.weight", "conv_norm.weight")])
    assert (g["decay"]["lr"], g["decay"]["weight_decay"], g["decay"]["lr_mult"]) == (1e-3, 0.1, 1.0)
    assert (g["no_decay"]["lr"], g["no_decay"]["weight_decay"], g["no_decay"]["lr_mult"]) == (1e-3, 0.0, 1.0)
    assert g["engram_table"]["lr"] == pytest.approx(5e-3)
    assert (g["engram_table"]["weight_decay"], g["engram_table"]["lr_mult"]) == (0.0, 5.0)
    # every trainable parameter exactly once, the frozen one nowhere
    listed = [id(p) for grp in groups for p in grp["params"]]
    assert len(listed) == len(set(listed))
    assert set(listed) == {id(p) for p in model.parameters() if p.requires_grad}
    assert id(model.frozen) not in listed


def test_custom_multipliers_and_an_optimizer_step():
    model = TinyGPT()
    groups = engram_param_groups(model, lr=0.01, weight_decay=0.05, table_lr_mult=2.0, table_weight_decay=0.01)
    table = by_name(groups)["engram_table"]
    assert (table["lr"], table["weight_decay"], table["lr_mult"]) == (pytest.approx(0.02), 0.01, 2.0)
    opt = torch.optim.AdamW(groups)          # extra keys ("name", "lr_mult") are kept by torch
    hidden = torch.randn(2, 5, 2, 16)
    ids = torch.randint(0, 37, (2, 5, 4))
    before = model.engram[0].table.weight.detach().clone()
    model.engram[0](hidden, ids).sum().backward()
    opt.step()
    assert not torch.equal(before, model.engram[0].table.weight)
    assert [g["name"] for g in opt.param_groups] == ["decay", "no_decay", "engram_table"]


def test_empty_groups_are_omitted():
    groups = engram_param_groups(nn.Linear(4, 4, bias=False), lr=1.0, weight_decay=0.1)
    assert [g["name"] for g in groups] == ["decay"]
    table_only = EngramBlock(8, 1, [11, 13], 4, 2, 2)
    for n, p in table_only.named_parameters():
        p.requires_grad_(n == "table.weight")
    assert [g["name"] for g in engram_param_groups(table_only, 1.0, 0.1)] == ["engram_table"]


def test_rejects_non_positive_table_multiplier():
    with pytest.raises(ValueError, match=r"table_lr_mult=0: must be > 0"):
        engram_param_groups(nn.Linear(2, 2), 1.0, 0.0, table_lr_mult=0)
