"""Which layers a sparse method adapts, and how many values its budget buys.

Budgets (exactly one of): `density` (fraction of the target weights), `params` (a count),
`match: lora` (the exact count LoRA with `r` on `target_modules` trains: r * (in + out) per
layer), or `from_run` (a run directory whose results.json gives `trainable_params`; the RIGSA
paper's random-mask baseline uses the final RIGSA budget this way).
"""
from __future__ import annotations

import json
import re
from pathlib import Path

from torch import nn

from rigsa.vocabulary import fail

# SpaRTA's default (seed 001): attention value and output projections.
PRESETS = {
    "sparta": ["v_proj", "o_proj"],
    "all-linear": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
}


def expand(target_modules) -> list[str]:
    names = []
    for entry in target_modules:
        names += PRESETS.get(entry, [entry])
    return names


def find_targets(model: nn.Module, target_modules) -> dict[str, nn.Linear]:
    """Linear layers (never the output head or embeddings) whose last name part equals a target,
    or whose full name matches a target used as a regex."""
    patterns = expand(target_modules)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    found = {}
    for name, module in model.named_modules():
        if type(module) is not nn.Linear or module is head:
            continue
        # a name's last parts (PEFT's rule: "q_proj", "self_attn.q_proj") or a regex over the full name
        if any(name == pattern or name.endswith("." + pattern) or re.fullmatch(pattern, name) for pattern in patterns):
            found[name] = module
    if not found:
        linear = sorted({name.rsplit(".", 1)[-1] for name, module in model.named_modules()
                         if type(module) is nn.Linear and module is not head})
        fail("method.target_modules", list(target_modules), f"names of this model's linear layers (it has {linear})",
             "pass e.g. method.target_modules=[all-linear]")
    return found


def lora_count(model: nn.Module, r: int, target_modules) -> int:
    """The number of values LoRA with rank r trains on these targets: r * (in + out) per layer."""
    return sum(r * (layer.in_features + layer.out_features) for layer in find_targets(model, target_modules).values())


def lora_layer_counts(model: nn.Module, budget, targets: dict[str, nn.Linear]) -> dict[str, int] | None:
    """With budget.match=lora on the same layers LoRA would adapt: each layer gets LoRA's own count,
    r * (in + out) (also what PEFT's SHiRA format requires). None otherwise (split by size)."""
    if budget.get("match") != "lora":
        return None
    lora_targets = find_targets(model, budget.target_modules or ["all-linear"])
    if set(lora_targets) != set(targets):
        return None
    return {name: budget.r * (layer.in_features + layer.out_features) for name, layer in targets.items()}


def check_budget(budget) -> str:
    """Exactly one budget, its value in range; return which one. (The count needs the model: resolve_budget.)"""
    chosen = [key for key in ("density", "params", "match", "from_run") if budget.get(key) not in (None, "", 0)]
    zeros = [key for key in ("density", "params") if budget.get(key) == 0]
    if not chosen and zeros:  # a zero budget is the value to name, not "none chosen"
        fail(f"method.budget.{zeros[0]}", 0, "> 0 (a budget that trains something)",
             f"pass e.g. method.budget.{zeros[0]}={'0.005' if zeros[0] == 'density' else '100000'}")
    if len(chosen) != 1:
        fail("method.budget", chosen, "exactly one of density, params, match, from_run",
             "set the others to null, e.g. method.budget.density=null method.budget.params=100000")
    key = chosen[0]
    if key == "density" and not 0 < budget["density"] <= 1:
        fail("method.budget.density", budget["density"], "0 < density <= 1", "pass method.budget.density=0.005")
    if key == "params" and budget["params"] < 1:
        fail("method.budget.params", budget["params"], "a count >= 1", "pass method.budget.params=100000")
    if key == "match" and budget["match"] != "lora":
        fail("method.budget.match", budget["match"], "lora", "pass method.budget.match=lora method.budget.r=8")
    if key == "from_run":
        from_run_values(budget["from_run"])
    return key


def from_run_values(run_dir: str) -> int:
    """The number of sparse values a finished sparse run trained (ConfigError when it is not one)."""
    path = Path(run_dir).expanduser() / "results.json"
    fix = "point method.budget.from_run at runs/<name> of a finished sparse run (rigsa, sparta, ...)"
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError):
        fail("method.budget.from_run", run_dir, "a finished run directory (with a readable results.json)", fix)
    values = (results.get("sparse") or {}).get("values") if isinstance(results, dict) else None
    if not isinstance(values, int) or values < 1:
        fail("method.budget.from_run", run_dir, f"a sparse run (that run's method {results.get('method')!r} trained "
             "no sparse values)" if isinstance(results, dict) else "a results.json object", fix)
    return values


def resolve_budget(budget, model: nn.Module, targets: dict[str, nn.Linear]) -> int:
    """The number of trainable values a budget config buys on `targets`."""
    key = check_budget(budget)  # exactly one budget, its value in range (ConfigError otherwise)
    total = sum(layer.weight.numel() for layer in targets.values())
    if key == "density":
        return round(budget.density * total)
    if key == "params":
        count = int(budget.params)
    elif key == "match":
        count = lora_count(model, budget.r, budget.target_modules or ["all-linear"])
    else:
        count = from_run_values(budget.from_run)
    if not 0 < count <= total:
        fail(f"method.budget.{key}", budget[key], f"a budget that fits the {total:,} target weights (it buys {count:,} "
             "values)", "pass a smaller budget, e.g. method.budget.density=0.005, or more method.target_modules")
    return count


def check_targets(method_cfg, model: nn.Module) -> None:
    """Right after the model loads: the method's target_modules match linear layers and its budget fits
    them (ConfigError otherwise), before any evaluation or training."""
    if "target_modules" in method_cfg:
        targets = find_targets(model, method_cfg.target_modules)
        if "budget" in method_cfg:
            resolve_budget(method_cfg.budget, model, targets)
