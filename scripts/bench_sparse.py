"""Benchmark: step time and peak memory of the sparse engine against the frozen floor, LoRA, full
fine-tuning and a SpaRTA-style dense-gradient anchor, measured side by side in one run.

Model: a random-init Llama, 8 layers x 512 hidden (intermediate 1408, 8 heads, 4 kv heads, vocab
8192), every linear layer adapted; batch 8 x 256 tokens; AdamW; next-token loss on all tokens.
Each configuration runs in its own subprocess (so its peak RSS is its own), `--warmup` steps then
`--steps` timed steps. The configurations run in turn, `--rounds` times over (so a slow spell of the
machine hits all of them alike); a configuration's step time is the median over all its timed steps. Printed: a table of ratios to the frozen
floor (time and peak-RSS increase over the process baseline), and the engine's bytes per trained
value (indices + values + gradient + AdamW state + stored base values), counted from the tensors.

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_sparse.py            # ~10 min on 2 cores
    python scripts/bench_sparse.py --steps 3 --warmup 1 --layers 2 --rounds 1   # a quick smoke run
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time

CONFIGS = ["floor", "lora_r8", "full", "anchor_0.5%", "engine_0.05%", "engine_0.5%", "engine_5%", "engine_lora_count"]


def build_model(layers: int):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    model = LlamaForCausalLM(config)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model


def lora_count(model) -> int:
    from rigsa.sparse.targets import lora_count as count

    return count(model, 8, ["all-linear"])


def prepare(name: str, model):
    """Set up one configuration; return (parameters to optimize, a post-backward hook or None, stats)."""
    import torch

    from rigsa.methods import replace_module
    from rigsa.sparse.engine import SparseDeltaLinear
    from rigsa.sparse.targets import find_targets

    targets = find_targets(model, ["all-linear"])
    total = sum(layer.weight.numel() for layer in targets.values())
    if name == "floor":
        return [], None, {}
    if name == "full":
        for parameter in model.parameters():
            parameter.requires_grad_(True)
        return list(model.parameters()), None, {}
    if name == "lora_r8":
        from peft import LoraConfig, get_peft_model

        peft_model = get_peft_model(model, LoraConfig(r=8, target_modules="all-linear"))
        return [p for p in peft_model.parameters() if p.requires_grad], None, {}
    generator = torch.Generator().manual_seed(0)
    if name.startswith("anchor"):
        # SpaRTA-style: the weights take a dense gradient, which is then gathered at the indices.
        density = float(name.split("_")[1].rstrip("%")) / 100
        anchors = []
        for layer in targets.values():
            m = round(density * layer.weight.numel())
            indices = torch.randperm(layer.weight.numel(), generator=generator)[:m]
            values = torch.nn.Parameter(torch.zeros(m))
            anchors.append((layer, indices, layer.weight.detach()[...].reshape(-1)[indices].clone(), values))
            layer.weight.requires_grad_(True)

        def gather_then_merge():
            with torch.no_grad():
                for layer, indices, base, values in anchors:
                    values.grad = layer.weight.grad.reshape(-1)[indices].clone()
                    layer.weight.grad = None

        def merge():
            with torch.no_grad():
                for layer, indices, base, values in anchors:
                    layer.weight.view(-1)[indices] = base + values
        return [values for *_, values in anchors], (gather_then_merge, merge), {}
    matched = name == "engine_lora_count"  # LoRA r=8's own count in every layer: r * (in + out)
    density = lora_count(model) / total if matched else float(name.split("_")[1].rstrip("%")) / 100
    for layer_name, layer in targets.items():
        m = 8 * (layer.in_features + layer.out_features) if matched else round(density * layer.weight.numel())
        indices = torch.randperm(layer.weight.numel(), generator=generator)[:m]
        replace_module(model, layer_name, SparseDeltaLinear(layer, indices))
    return [p for p in model.parameters() if p.requires_grad], None, {"density": density}


def bytes_per_value(model, optimizer) -> float:
    from rigsa.sparse.engine import sparse_layers

    layers = list(sparse_layers(model).values())
    m = sum(layer.values.numel() for layer in layers)
    total = 0
    for layer in layers:
        total += layer.indices.nbytes + layer.values.nbytes + layer.base_values.nbytes
        total += layer.values.grad.nbytes if layer.values.grad is not None else layer.values.nbytes
        state = optimizer.state.get(layer.values, {})
        total += sum(t.nbytes for key, t in state.items() if key != "step" and hasattr(t, "nbytes"))
    return total / m


def child(name: str, args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    model = build_model(args.layers)
    baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    params, hooks, stats = prepare(name, model)
    model.train()
    optimizer = torch.optim.AdamW(params, lr=1e-4) if params else None
    generator = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 8192, (args.batch, args.seq), generator=generator)
    embed = model.get_input_embeddings()
    times = []
    for step in range(args.warmup + args.steps):
        start = time.perf_counter()
        inputs = embed(input_ids).detach().requires_grad_(True)  # the floor's backward reaches the inputs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
            logits = model(inputs_embeds=inputs).logits
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                 input_ids[:, 1:].reshape(-1))
        loss.backward()
        if hooks:
            hooks[0]()
        if optimizer:
            optimizer.step()
            if step < args.warmup + args.steps - 1 or not name.startswith("engine"):
                optimizer.zero_grad(set_to_none=True)
        if hooks:
            hooks[1]()
        if step >= args.warmup:
            times.append(time.perf_counter() - start)
    result = {"name": name, "times": times,
              "trainable": sum(p.numel() for p in params),
              "peak_rss_increase": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - baseline_rss, **stats}
    if name.startswith("engine"):
        result["bytes_per_value"] = bytes_per_value(model, optimizer)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=2, help="passes over all configurations")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the default run's precision)")
    parser.add_argument("--configs", default=",".join(CONFIGS))
    parser.add_argument("--child")
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    names = args.configs.split(",")
    measured: dict[str, list[dict]] = {name: [] for name in names}
    for round_number in range(args.rounds):
        for name in names:
            command = [sys.executable, __file__, "--child", name] + [f"--{k}={v}" for k, v in
                       (("steps", args.steps), ("warmup", args.warmup), ("layers", args.layers), ("batch", args.batch),
                        ("seq", args.seq), ("threads", args.threads))] + (["--bf16"] if args.bf16 else [])
            output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
            measured[name].append(json.loads(output.strip().splitlines()[-1]))
            print(f"round {round_number + 1}, {name}: {statistics.median(measured[name][-1]['times']):.3f} s/step",
                  file=sys.stderr)
    rows = []
    for name, runs in measured.items():
        rows.append({**runs[0], "step_seconds": statistics.median(t for run in runs for t in run["times"]),
                     "peak_rss_increase": max(run["peak_rss_increase"] for run in runs)})
    floor = next(row for row in rows if row["name"] == "floor")
    lora = next((row for row in rows if row["name"] == "lora_r8"), None)
    print(f"random Llama {args.layers} x 512, batch {args.batch} x {args.seq}, {args.threads} threads, "
          f"{'bf16 autocast' if args.bf16 else 'float32'}, median of {args.rounds} x {args.steps} steps")
    print(f"{'config':<20}{'trainable':>12}{'s/step':>9}{'x floor':>9}{'x LoRA':>8}{'peak RSS +MB':>14}{'B/value':>9}")
    for row in rows:
        vs_lora = f"{row['step_seconds'] / lora['step_seconds']:.2f}" if lora else "-"
        per_value = f"{row['bytes_per_value']:.1f}" if "bytes_per_value" in row else ""
        print(f"{row['name']:<20}{row['trainable']:>12,}{row['step_seconds']:>9.3f}"
              f"{row['step_seconds'] / floor['step_seconds']:>9.2f}{vs_lora:>8}"
              f"{row['peak_rss_increase'] / 2**20:>14.0f}{per_value:>9}")


if __name__ == "__main__":
    main()
