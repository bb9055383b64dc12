"""Selection rules: they turn scores into flat indices, one tensor per target layer. Nothing else.

| rule      | score of weight w with (calibration) gradient g       | source              |
|-----------|-------------------------------------------------------|---------------------|
| random    | none: Bernoulli(p) per weight, p = budget / total      | SpaRTA (seed 001 §4) |
| magnitude | |w| (largest kept)                                     |                     |
| gallop    | |g| / (|w| + eps), g averaged over calibration batches | GaLLoP (seed 002)    |
| snip      | |g * w| (connection sensitivity)                      | SNIP, as in seed 003 |

`block_size > 0` ranks block_size x block_size tiles by their summed score and keeps whole tiles
(the budget is rounded down to whole tiles). Budgets are per tensor (the same density in each
target, remainders assigned so the total is exact) or global (one top-k over all targets).
"""
from __future__ import annotations

import math

import torch

SCORED_RULES = ("magnitude", "gallop", "snip")
RULES = ("random",) + SCORED_RULES
NEEDS_GRADIENT = ("gallop", "snip")


def score(rule: str, weight: torch.Tensor, grad: torch.Tensor | None = None, eps: float = 1e-8) -> torch.Tensor:
    weight = weight.detach().float()
    if rule == "magnitude":
        return weight.abs()
    if grad is None:
        raise ValueError(f"selection rule {rule!r} needs a gradient: pass calibration batches")
    if rule == "gallop":
        return grad.float().abs() / (weight.abs() + eps)
    if rule == "snip":
        return (grad.float() * weight).abs()
    raise ValueError(f"unknown selection rule {rule!r}: expected one of {list(RULES)}")


def split_budget(total: int, sizes: dict[str, int]) -> dict[str, int]:
    """Per-tensor counts proportional to size that add up to `total` exactly (largest remainder)."""
    grand = sum(sizes.values())
    if not 0 <= total <= grand:
        raise ValueError(f"budget of {total} values does not fit in {grand} target weights")
    exact = {name: total * size / grand for name, size in sizes.items()}
    counts = {name: math.floor(value) for name, value in exact.items()}
    left = total - sum(counts.values())
    for name in sorted(exact, key=lambda n: (counts[n] - exact[n], n))[:left]:
        counts[name] += 1
    return counts


def top_k(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Flat indices of the k largest scores, sorted ascending."""
    flat = scores.reshape(-1)
    if k >= flat.numel():
        return torch.arange(flat.numel(), device=flat.device)
    return torch.sort(torch.topk(flat, k, sorted=False).indices).values


def block_top_k(scores: torch.Tensor, k: int, block_size: int) -> torch.Tensor:
    """Flat indices of the k // block_size**2 tiles with the largest summed score."""
    rows, cols = scores.shape
    if rows % block_size or cols % block_size:
        raise ValueError(f"a {rows}x{cols} weight does not tile into {block_size}x{block_size} blocks: "
                         f"pick a block_size that divides both (e.g. 16 or 8)")
    tiles = scores.reshape(rows // block_size, block_size, cols // block_size, block_size).sum((1, 3))
    chosen = top_k(tiles, k // (block_size * block_size))
    tile_row, tile_col = chosen // tiles.shape[1], chosen % tiles.shape[1]
    offsets = torch.arange(block_size, device=scores.device)  # on the scores' device (CUDA), not the CPU
    r = (tile_row[:, None, None] * block_size + offsets[None, :, None]).expand(-1, block_size, block_size)
    c = (tile_col[:, None, None] * block_size + offsets[None, None, :]).expand(-1, block_size, block_size)
    return torch.sort((r * cols + c).reshape(-1)).values


def random_indices(numel: int, keep_probability: float, generator: torch.Generator) -> torch.Tensor:
    """SpaRTA: each weight kept independently with `keep_probability` (expected count = p * numel)."""
    return torch.nonzero(torch.rand(numel, generator=generator) < keep_probability).reshape(-1)


def select(rule: str, weights: dict[str, torch.Tensor], total: int, *, grads: dict[str, torch.Tensor] | None = None,
           scope: str = "per_tensor", block_size: int = 0, eps: float = 1e-8, seed: int = 0,
           counts: dict[str, int] | None = None) -> dict[str, torch.Tensor]:
    """Flat indices per target for a budget of `total` values (random: `total` in expectation).

    `counts` fixes the per-tensor split (a budget matched to LoRA gives each layer r * (in + out));
    otherwise per-tensor budgets are proportional to size."""
    sizes = {name: weight.numel() for name, weight in weights.items()}
    if counts is not None and sum(counts.values()) != total:
        raise ValueError(f"per-tensor counts add up to {sum(counts.values())}, not the budget {total}")
    if rule == "random":
        generator = torch.Generator().manual_seed(seed)
        probability = {name: (counts[name] if counts else total * size / sum(sizes.values())) / size
                       for name, size in sizes.items()}
        return {name: random_indices(size, probability[name], generator) for name, size in sizes.items()}
    scores = {name: score(rule, weights[name], (grads or {}).get(name), eps) for name in weights}
    if scope == "global":
        if block_size:
            raise ValueError("block selection ranks tiles within each tensor: use scope=per_tensor with block_size")
        names = list(scores)
        flat = torch.cat([scores[name].reshape(-1) for name in names])
        chosen = top_k(flat, total)
        bounds = torch.tensor([0] + [sizes[name] for name in names], device=flat.device).cumsum(0)
        return {name: chosen[(chosen >= bounds[i]) & (chosen < bounds[i + 1])] - bounds[i]
                for i, name in enumerate(names)}
    if scope != "per_tensor":
        raise ValueError(f"selection scope {scope!r}: expected per_tensor or global")
    if block_size:
        area = block_size * block_size
        tiles = split_budget(total // area, {name: size // area for name, size in sizes.items()})
        return {name: block_top_k(scores[name], tiles[name] * area, block_size) for name in scores}
    counts = counts or split_budget(total, sizes)
    return {name: top_k(scores[name], counts[name]) for name in scores}
