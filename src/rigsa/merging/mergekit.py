"""A mergekit-style merge YAML, read as `rigsa-merge` overrides (`mergekit=<file>`): what users of mergekit know.

    models:                       # one entry per adapter: its rigsa-run folder, its weight and density
      - model: runs/sst2
        parameters: {weight: 1.0, density: 0.5}
    merge_method: ties            # linear (= mean) | task_arithmetic | ties | dare_linear | dare_ties, or a rigsa name
    base_model: smollm2_135m      # informational: the base comes from the adapters' runs, checked on load
    parameters: {lambda: 1.0}     # lambda scales the merged delta; a model's parameters override the top ones

Semantics are rigsa's (docs/merging.md), not mergekit's where they differ: TIES divides the agreeing deltas by
their count (PEFT, mttl), not by the sum of their weights.
"""
from __future__ import annotations

from pathlib import Path

import yaml

from rigsa.merging.combine import MERGE_METHODS
from rigsa.vocabulary import ConfigError

MERGEKIT_METHODS = {"linear": "mean", **{name: name for name in MERGE_METHODS}}


def overrides_from(path: str) -> list[str]:
    """The Hydra overrides a mergekit-style YAML stands for (adapters, weights, merge_method, density, scale)."""
    def refuse(fault: str) -> ConfigError:
        return ConfigError(f"mergekit={path}: {fault}. Fix: write models: [{{model: <run dir>, parameters: "
                           "{weight, density}}], merge_method and parameters, as docs/merging.md shows")

    try:
        spec = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as error:
        raise refuse(f"not a readable YAML file ({type(error).__name__})") from None
    if not isinstance(spec, dict) or not isinstance(spec.get("models"), list) or not spec["models"]:
        raise refuse("it has no list of models")
    method = MERGEKIT_METHODS.get(str(spec.get("merge_method")))
    if method is None:
        raise refuse(f"merge_method {spec.get('merge_method')!r} is not one of {', '.join(MERGEKIT_METHODS)}")
    top = spec.get("parameters") or {}
    folders, weights, densities = [], [], []
    for entry in spec["models"]:
        if not isinstance(entry, dict) or "model" not in entry:
            raise refuse(f"the models entry {entry!r} names no model (its run folder)")
        parameters = {**top, **(entry.get("parameters") or {})}
        folders.append(str(entry["model"]))
        weights.append(float(parameters.get("weight", 1.0)))
        densities.append(float(parameters.get("density", 1.0)))
    quoted = ",".join(f"'{folder}'" for folder in folders)
    return [f"adapters=[{quoted}]", f"weights=[{','.join(map(str, weights))}]", f"merge_method={method}",
            f"density=[{','.join(map(str, densities))}]", f"scale={float(top.get('lambda', 1.0))}"]
