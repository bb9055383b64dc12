"""Selection rules return the budgeted count and rank by their documented score; budgets match LoRA."""
from __future__ import annotations

import pytest
import torch
from omegaconf import OmegaConf

from rigsa.config import compose
from rigsa.models import load_model
from rigsa.sparse.selection import select, split_budget
from rigsa.sparse.targets import find_targets, resolve_budget
from rigsa.vocabulary import ConfigError

from conftest import TINY

W = torch.tensor([[0.1, -5.0, 0.2, 3.0],
                  [-0.01, 0.5, -2.0, 0.05]])
G = torch.tensor([[1.0, 1.0, -0.1, 0.2],
                  [0.5, -0.5, 4.0, 0.0]])


def flat(rule, k, **kwargs):
    return select(rule, {"w": W}, k, grads={"w": G}, **kwargs)["w"].tolist()


def test_each_rule_ranks_by_its_documented_score():
    assert flat("magnitude", 2) == [1, 3]  # |w|: 5.0, 3.0
    assert flat("gallop", 2) == [0, 4]  # |g|/(|w|+eps): 10, 50 (then 0.5/0.5 = 1)
    assert flat("snip", 2) == [1, 6]  # |g*w|: 5.0, 8.0


def test_block_rule_keeps_the_tile_with_the_largest_summed_score():
    scores = torch.zeros(4, 8)
    scores[2:4, 4:6] = 1.0  # the tile at block (1, 2) of 2x2 tiles
    chosen = select("magnitude", {"w": scores}, 4, block_size=2)["w"]
    assert chosen.tolist() == [2 * 8 + 4, 2 * 8 + 5, 3 * 8 + 4, 3 * 8 + 5]
    with pytest.raises(ValueError, match="does not tile into 3x3 blocks"):
        select("magnitude", {"w": scores}, 9, block_size=3)


def test_per_tensor_and_global_budgets_are_exact():
    weights = {"a": torch.randn(30, 20), "b": torch.randn(10, 7), "c": torch.randn(64, 64)}
    for scope in ("per_tensor", "global"):
        chosen = select("magnitude", weights, 1234, scope=scope)
        assert sum(v.numel() for v in chosen.values()) == 1234
        assert all(len(set(v.tolist())) == v.numel() for v in chosen.values())
    assert split_budget(10, {"a": 5, "b": 5, "c": 5}) == {"a": 4, "b": 3, "c": 3}
    assert split_budget(7, {"a": 10, "b": 4}) == {"a": 5, "b": 2}
    glob = select("magnitude", {"small": torch.full((4,), 0.1), "big": torch.full((4,), 9.0)}, 4, scope="global")
    assert glob["small"].numel() == 0 and glob["big"].tolist() == [0, 1, 2, 3]


def test_random_rule_hits_the_budget_in_expectation():
    weights = {"a": torch.zeros(1000, 500), "b": torch.zeros(500, 1000)}  # 1e6 weights, p = 1%
    counts = [sum(v.numel() for v in select("random", weights, 10_000, seed=s).values()) for s in range(3)]
    # Binomial(1e6, 0.01): std = 99.5; 5 std = 500
    assert all(abs(c - 10_000) < 500 for c in counts) and len(set(counts)) == 3
    again = select("random", weights, 10_000, seed=1)
    assert sum(v.numel() for v in again.values()) == counts[1]


def test_budget_match_equals_peft_loras_real_trainable_count():
    from peft import LoraConfig, get_peft_model

    cfg = compose(TINY)
    model, _ = load_model(cfg.model, 0)
    targets = find_targets(model, ["all-linear"])
    budget = OmegaConf.create({"density": None, "params": None, "match": "lora", "r": 4,
                               "target_modules": ["q_proj", "v_proj"], "from_run": None})
    expected = resolve_budget(budget, model, targets)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    # q_proj 64 -> 64 and v_proj 64 -> 32 (2 kv heads of 16) in each of 2 layers
    assert expected == trainable == 2 * (4 * (64 + 64) + 4 * (64 + 32))


def test_targets_presets_and_errors():
    model, _ = load_model(compose(TINY).model, 0)
    assert sorted({n.rsplit(".", 1)[-1] for n in find_targets(model, ["sparta"])}) == ["o_proj", "v_proj"]
    assert len(find_targets(model, ["all-linear"])) == 14 and "lm_head" not in find_targets(model, ["all-linear"])
    assert list(find_targets(model, [r"model\.layers\.1\.mlp\.up_proj"])) == ["model.layers.1.mlp.up_proj"]
    with pytest.raises(ConfigError, match=r"target_modules=\['nope'\] is invalid: expected names of this model's linear "
                                          r"layers \(it has \['down_proj', 'gate_proj', 'k_proj', 'o_proj', 'q_proj'"):
        find_targets(model, ["nope"])


def test_selected_indices_live_on_the_scores_device():
    """Built on the weights' device, never the CPU: `meta` stands in for CUDA here (mixing devices fails on both)."""
    from rigsa.sparse.selection import block_top_k, select, top_k  # scope=global masks by value: not on meta

    scores = torch.randn(32, 32, device="meta")
    assert block_top_k(scores, 64, 8).device.type == "meta"
    assert top_k(torch.randn(4, device="meta"), 10).device.type == "meta"  # k >= numel: every index
    weights = {"a": torch.randn(16, 16, device="meta"), "b": torch.randn(8, 16, device="meta")}
    chosen = select("magnitude", weights, 128, block_size=8)
    assert all(indices.device.type == "meta" for indices in chosen.values())
