"""The default experiment's numbers, pinned: `rigsa-run` with no overrides but model=tiny and a short budget.

The default composes RIGSA + imp_cpu + bfloat16 autocast; only the model, the data sizes, the schedule's
lengths and the evaluation (target task only) are shrunk here. The expected numbers were recorded with
the code before the groundwork refactor (commit 7e2be0a): a change to initialisation, data order, the
schedule, the optimizer or the pruning moves them far beyond the tolerance.
"""
from __future__ import annotations

import json

import pytest
from safetensors.torch import load_file

from rigsa.config import compose
from rigsa.run import run

SHRINK = ["model=tiny", "logger=none", "eval=target", "task.train_size=64", "task.val_size=0", "task.test_size=40",
          "pruning.steps_per_iteration=2", "pruning.final_retrain_steps=3"]
GOLDEN = {
    "default": {  # lr 1e-3 and gate 1e-6, as the default: the losses mostly follow the data order
        "losses": [16.123920440673828, 18.1397705078125, 16.72132682800293, 16.15346336364746, 16.528949737548828,
                   17.425186157226562, 17.834373474121094, 17.145153045654297, 17.938369750976562, 16.62025260925293,
                   16.294326782226562, 17.8179931640625, 16.807518005371094],
        "value_abs_sum": 67.94701919518411, "gate_sum": -0.007085316465236247},
    "learning": {  # a larger lr and gate, so that the delta moves the loss
        "losses": [16.12587547302246, 18.142253875732422, 16.25977325439453, 15.681553840637207, 15.165932655334473,
                   16.449506759643555, 16.460220336914062, 15.796531677246094, 17.018402099609375, 15.528362274169922,
                   15.788627624511719, 17.202754974365234, 15.813698768615723],
        "value_abs_sum": 393.9650880843401, "gate_sum": 3.4498097896575928},
}
OVERRIDES = {"default": [], "learning": ["train.lr=0.05", "method.gate_init=0.1"]}


@pytest.mark.parametrize("case", sorted(GOLDEN))
def test_the_default_experiment_on_tiny_gives_the_pinned_numbers(case, tmp_path, private_cache):
    cfg = compose([*SHRINK, *OVERRIDES[case], f"run.root={tmp_path}"])
    assert (cfg.method.name, cfg.pruning.iterations, cfg.dtype, cfg.train.lr_schedule) == ("rigsa", 5, "bfloat16",
                                                                                          "constant")
    results = run(cfg, tmp_path / case)
    lines = [json.loads(line) for line in (tmp_path / case / "metrics.jsonl").read_text().splitlines()]
    losses = [line["train/loss"] for line in lines if "train/loss" in line]
    assert losses == pytest.approx(GOLDEN[case]["losses"], rel=1e-5)
    adapter = load_file(str(tmp_path / case / "adapter" / "adapter.safetensors"))
    value_abs_sum = sum(float(t.double().abs().sum()) for name, t in adapter.items() if name.endswith(".values"))
    gate_sum = sum(float(t.double().sum()) for name, t in adapter.items() if name.endswith(".gate"))
    assert value_abs_sum == pytest.approx(GOLDEN[case]["value_abs_sum"], rel=1e-5)
    assert gate_sum == pytest.approx(GOLDEN[case]["gate_sum"], rel=1e-4)
    assert results["sparse"]["values"] == 2304 and results["sparse"]["density"] == 0.03125
    assert [row["trainable_params"] for row in results["iterations"]] == [73742, 36878, 18446, 9230, 4622, 2318]
    assert results["train"]["steps"] == 13
