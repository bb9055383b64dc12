"""The merge methods over one parameter's task deltas: `combine(stacked, own, settings, name)`.

`stacked` is [tasks, positions]: each task adapter's delta at the positions the merge covers (a sparse layer: the
union of the adapters' positions; any other: the whole weight, flattened); `own` marks the positions each adapter
holds (its trained values; every position of a dense or low-rank delta). Every method ends scaled by `lambda`.

- `sum` (SpaRTA §8): sum_i w_i d_i (weights default 1).
- `mean`: sum_i w_i d_i / sum_i w_i.
- `overlap_mean` (Arnob et al., microsoft/mttl's uniform sparse merge): at each position sum_i w_i d_i divided by
  the number of adapters whose delta is non-zero there, so a position only one adapter trained keeps its value.
- `task_arithmetic` (Ilharco et al.): lambda * sum_i w_i d_i.
- `magnitude_prune`: each adapter keeps the `density` fraction of its own values with the largest magnitude, then
  the weighted sum.
- `ties` (Yadav et al.): magnitude pruning as above, a sign elected per position (`majority_sign`: `total` = the sign
  of the sum of the pruned deltas, `frequency` = the more frequent sign), then the weighted deltas that agree with
  it, divided by how many agree. That divisor is PEFT's and mttl's choice; mergekit divides by the agreeing
  weights' sum instead, which differs whenever weights are not 1.
- `dare_linear` / `dare_ties` (Yu et al.): each own value kept with probability `density` and the kept ones divided
  by it (the expected delta unchanged), then the weighted sum / the TIES sign election and disjoint mean.

`density` is the fraction of *each adapter's own values* in each parameter (mttl prunes an expert's trained values,
not the positions other experts trained): a sparse adapter with 1,000 values in a layer keeps 200 at density 0.2,
whatever the union's size. PEFT prunes a whole tensor, which is the same for dense deltas. The threshold is per
parameter, as PEFT's: mttl's TIES takes one magnitude threshold per expert over the whole model, not offered here.
DARE's draws are seeded by (seed, parameter name, adapter index): a merge is reproducible and independent of the
parameters' order.
"""
from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch
from peft.utils.merge_utils import calculate_majority_sign_mask, disjoint_merge, prune, task_arithmetic

MERGE_METHODS = ("sum", "mean", "overlap_mean", "task_arithmetic", "magnitude_prune", "ties", "dare_linear",
                 "dare_ties")
PRUNING = {"magnitude_prune": "magnitude", "ties": "magnitude", "dare_linear": "random", "dare_ties": "random"}
SIGN_ELECTION = ("ties", "dare_ties")
MAJORITY_SIGN = ("total", "frequency")


@dataclass(frozen=True)
class MergeSettings:
    """How adapters are merged: the method and its parameters, one weight and one density per adapter."""
    method: str
    weights: tuple[float, ...]
    densities: tuple[float, ...]
    scale: float = 1.0  # lambda
    majority_sign: str = "total"
    seed: int = 0


def pruned(stacked: torch.Tensor, own: torch.Tensor, settings: MergeSettings, name: str) -> torch.Tensor:
    """Each adapter's deltas with its own values pruned to its density (magnitude or DARE's random drop)."""
    kind = PRUNING.get(settings.method)
    if kind is None:
        return stacked
    rows = []
    for index, (row, mask, density) in enumerate(zip(stacked, own, settings.densities)):
        row = row.clone()
        if density < 1:
            with torch.random.fork_rng(devices=[]):
                # CPU generators seed from 32 bits: the seed, the name and the index hashed together
                torch.manual_seed(zlib.crc32(f"{settings.seed}:{name}:{index}".encode()))
                row[mask] = prune(row[mask], density, kind, rescale=kind == "random")
        rows.append(row)
    return torch.stack(rows)


def combine(stacked: torch.Tensor, own: torch.Tensor, settings: MergeSettings, name: str) -> torch.Tensor:
    """The merged delta [positions] of the task deltas `stacked` [tasks, positions] (float32)."""
    if settings.method not in MERGE_METHODS:
        raise ValueError(f"merge method {settings.method!r} is not one of {', '.join(MERGE_METHODS)}")
    deltas = pruned(stacked.float(), own, settings, name)
    weights = torch.tensor(settings.weights, dtype=torch.float32)
    if settings.method in SIGN_ELECTION:
        signs = calculate_majority_sign_mask(deltas, method=settings.majority_sign)
        merged = disjoint_merge(deltas * weights.reshape(-1, 1), signs)
    elif settings.method == "mean":
        merged = task_arithmetic(list(deltas), weights / weights.sum())
    elif settings.method == "overlap_mean":
        merged = task_arithmetic(list(deltas), weights) / (deltas != 0).sum(dim=0).clamp(min=1)
    else:  # sum, task_arithmetic, magnitude_prune, dare_linear: the weighted sum of the (pruned) deltas
        merged = task_arithmetic(list(deltas), weights)
    return merged * settings.scale
