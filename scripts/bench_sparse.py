"""Benchmark: step time and peak memory of the sparse engine against the frozen floor, LoRA, full
fine-tuning and a SpaRTA-style dense-gradient anchor, measured side by side in one run.

Model: a random-init Llama, 8 layers x 512 hidden (intermediate 1408, 8 heads, 4 kv heads, vocab
8192), every linear layer adapted; batch 8 x 256 tokens; AdamW; next-token loss on all tokens.
Memory: each configuration alone in a fresh subprocess (`--memory-steps` steps), its peak RSS over
the process's RSS once the model is built. Time: every configuration on its own model in one
process, one step of each in turn per round (the order rotating), `--warmup` untimed rounds then
`--steps` timed ones, so a slow spell of this shared machine hits all of them alike; a ratio is
the median over rounds of the two configurations' same-round step times. Printed: a table of step
time, ratios to the frozen floor and to LoRA, peak-RSS increase, and the engine's bytes per trained
value (indices + values + gradient + AdamW state + stored base values), counted from the tensors.
A configuration ending in `@bf16` runs on base weights stored in bfloat16 (always under bf16 autocast):
there the engine keeps its delta unmerged (y = base(x) + gate * S x); `floor@bf16` is its floor.

`--model smollm2_135m` runs the embedded model's real weights instead, on Textual MNIST 7x7 batches of 8
(the answer-token loss) under bf16 autocast, every linear layer targeted, with REAL_CONFIGS: QLoRA r=8,
the engine at LoRA r=8's count over a float32 (merged), bf16 (`@bf16`) and nf4 (`@nf4`) base, each
base's own floor, the engine at RIGSA's final density (3.125%) and RIGSA's dense phase. It also prints
the base weights' bytes (rigsa.memory.model_bytes).

    OMP_WAIT_POLICY=PASSIVE python scripts/bench_sparse.py            # ~8 min on 2 cores
    OMP_WAIT_POLICY=PASSIVE python scripts/bench_sparse.py --model smollm2_135m
    python scripts/bench_sparse.py --steps 2 --warmup 1 --memory-steps 1 --layers 2   # a quick smoke run
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

CONFIGS = ["floor", "lora_r8", "full", "anchor_0.5%", "engine_0.05%", "engine_0.5%", "engine_5%", "engine_lora_count",
           "floor@bf16", "engine_0.5%@bf16", "engine_lora_count@bf16"]
DEFAULT_CONFIGS = CONFIGS[:8]
REAL_CONFIGS = ["floor", "lora_r8", "qlora_r8", "full", "engine_lora_count", "floor@bf16", "engine_lora_count@bf16",
                "floor@nf4", "engine_lora_count@nf4", "engine_3.125%", "rigsa_dense"]


def real_model_and_batch(stored_bf16: bool, batch_size: int):
    """The embedded SmolLM2-135M (frozen) and (input_ids, attention_mask, label logit ids, classes) of the first
    `batch_size` Textual MNIST 7x7 training prompts."""
    import torch

    from rigsa.config import compose
    from rigsa.models import load_model
    from rigsa.tasks import build_task

    cfg = compose(["model=smollm2_135m", "task.image_size=7", "task.train_size=64", "task.val_size=0",
                   "task.test_size=10", f"model.base_dtype={'bfloat16' if stored_bf16 else 'float32'}"])
    model, tokenizer = load_model(cfg.model, 0)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    data = build_task(cfg.task, tokenizer, 1024)
    batch = data.train.batch(torch.arange(batch_size))
    return model, (batch["input_ids"], batch["attention_mask"], data.label_token_ids, batch["classes"])


def build_model(layers: int, stored_bf16: bool = False):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=8192, hidden_size=512, intermediate_size=1408, num_hidden_layers=layers,
                         num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=512)
    model = LlamaForCausalLM(config)
    for parameter in model.parameters():
        parameter.requires_grad_(False)
    return model.to(torch.bfloat16) if stored_bf16 else model


def lora_count(model) -> int:
    from rigsa.sparse.targets import lora_count as count

    return count(model, 8, ["all-linear"])


def prepare(name: str, model):
    """Set up one configuration (`<name>@<base>` for an nf4 base); return (parameters to optimize, a
    post-backward hook or None, stats)."""
    import torch

    from rigsa.quantize import quantize_linear_layers

    base = name.partition("@")[2]
    params, hooks, stats = prepare_on_base(name.partition("@")[0], model)
    if base == "nf4":  # after the adapter is attached, as rigsa-run does (the engine keeps its base apart)
        quantize_linear_layers(model, "nf4", torch.bfloat16)
    return params, hooks, stats


def prepare_on_base(name: str, model):
    """`prepare` on the model's stored weights, before any quantization of an `@nf4` configuration."""
    import torch

    from rigsa.model_edits import replace_module
    from rigsa.sparse.engine import SparseDeltaLinear
    from rigsa.sparse.targets import find_targets

    targets = find_targets(model, ["all-linear"])
    total = sum(layer.weight.numel() for layer in targets.values())
    if name == "floor":
        return [], None, {}
    if name == "qlora_r8":
        from rigsa.quantize import quantize_linear_layers

        quantize_linear_layers(model, "nf4", torch.bfloat16)
        name = "lora_r8"
    if name == "rigsa_dense":  # RIGSA's dense phase: a gated full-size random delta on every target
        from rigsa.methods.rigsa import DenseGatedLinear, initial_delta

        gate = torch.nn.Parameter(torch.tensor(1e-6))
        for number, (layer_name, layer) in enumerate(targets.items()):
            replace_module(model, layer_name, DenseGatedLinear(layer, initial_delta(layer.weight.shape, "normal", 0.1,
                                                                                    number), gate))
        return [p for p in model.parameters() if p.requires_grad], None, {}
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


class Trainer:
    """One configuration on its own model: `step()` runs one optimizer step and returns its seconds."""

    def __init__(self, name: str, args):
        import torch

        self.name, self.args = name, args
        self.stored_bf16 = name.endswith("@bf16")
        self.real = args.model == "smollm2_135m"
        if self.real:
            self.model, self.batch = real_model_and_batch(self.stored_bf16, args.batch)
        else:
            self.model = build_model(args.layers, self.stored_bf16)
        self.baseline_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # model built, not yet adapted
        self.params, self.hooks, self.stats = prepare(name, self.model)
        self.model.train()
        self.optimizer = torch.optim.AdamW(self.params, lr=1e-4) if self.params else None
        generator = torch.Generator().manual_seed(1)
        self.input_ids = torch.randint(0, 8192, (args.batch, args.seq), generator=generator)
        self.embed = self.model.get_input_embeddings()
        from rigsa.memory import model_bytes

        self.stats["base_weight_bytes"] = model_bytes(self.model, [])["base_weight_bytes"]

    def step(self, keep_grad: bool = False) -> float:
        import torch

        start = time.perf_counter()
        input_ids = self.batch[0] if self.real else self.input_ids
        inputs = self.embed(input_ids).detach().requires_grad_(True)  # the floor's backward reaches the inputs
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.args.bf16 or self.stored_bf16 or self.real):
            if self.real:  # the answer-token loss: the ten digits' logits at the last position
                _, attention_mask, label_ids, classes = self.batch
                logits = self.model(inputs_embeds=inputs, attention_mask=attention_mask).logits[:, -1, label_ids]
                loss = torch.nn.functional.cross_entropy(logits.float(), classes)
            else:
                logits = self.model(inputs_embeds=inputs).logits
                loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                                                         self.input_ids[:, 1:].reshape(-1))
        loss.backward()
        if self.hooks:
            self.hooks[0]()
        if self.optimizer:
            self.optimizer.step()
            if not keep_grad:
                self.optimizer.zero_grad(set_to_none=True)
        if self.hooks:
            self.hooks[1]()
        return time.perf_counter() - start


def child(name: str, args) -> dict:
    """Memory of one configuration, alone in this process: peak RSS over the model's own baseline."""
    trainer = Trainer(name, args)
    for step in range(args.memory_steps):
        trainer.step(keep_grad=step == args.memory_steps - 1)  # the last step's gradients are counted
    result = {"name": name, "trainable": sum(p.numel() for p in trainer.params),
              "peak_rss_increase": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - trainer.baseline_rss,
              **trainer.stats}
    if name.startswith("engine"):
        result["bytes_per_value"] = bytes_per_value(trainer.model, trainer.optimizer)
    return result


def paired_times(names: list[str], args) -> dict[str, list[float]]:
    """Every configuration on its own model in this one process, one step each in turn (the order
    rotating each round), so a slow spell of the machine hits all of them alike."""
    trainers = [Trainer(name, args) for name in names]
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_number in range(args.warmup + args.steps):
        shift = round_number % len(trainers)
        this_round = {trainer.name: trainer.step() for trainer in trainers[shift:] + trainers[:shift]}
        if round_number >= args.warmup:
            for name, seconds in this_round.items():
                times[name].append(seconds)
        print(f"round {round_number + 1}/{args.warmup + args.steps}"
              f"{' (warmup)' if round_number < args.warmup else ''}: "
              + ", ".join(f"{name} {this_round[name]:.2f}" for name in names), file=sys.stderr)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=8, help="timed rounds (one step of every configuration)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed rounds first")
    parser.add_argument("--memory-steps", type=int, default=3, help="steps of each memory subprocess")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (the default run's precision)")
    parser.add_argument("--model", default="synthetic", choices=["synthetic", "smollm2_135m"])
    # argparse formats help strings with %: the configurations' names hold % signs (engine_0.5%), so they are doubled
    listed = {model: ",".join(names).replace("%", "%%") for model, names in (("synthetic", CONFIGS),
                                                                              ("smollm2_135m", REAL_CONFIGS))}
    parser.add_argument("--configs", help=f"default: all of the model's; synthetic: any of {listed['synthetic']}; "
                                          f"smollm2_135m: any of {listed['smollm2_135m']}")
    parser.add_argument("--child", help=argparse.SUPPRESS)  # internal: one configuration's memory subprocess
    args = parser.parse_args()
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch starts its threads
    known = REAL_CONFIGS if args.model == "smollm2_135m" else CONFIGS
    args.configs = args.configs or ",".join(REAL_CONFIGS if args.model == "smollm2_135m" else DEFAULT_CONFIGS)
    names = args.configs.split(",")
    unknown = [name for name in names if name not in known]
    if unknown:
        parser.error(f"--configs: unknown {unknown} for --model {args.model}; choose from {','.join(known)}")
    if len(set(names)) < len(names):
        parser.error(f"--configs {args.configs!r} lists a configuration twice; list each once")
    if "floor" not in names:
        parser.error(f"--configs {args.configs!r} has no 'floor': every ratio is taken against it; add floor")
    for option in ("steps", "memory_steps", "layers", "batch", "seq", "threads"):
        if getattr(args, option) < 1:
            parser.error(f"--{option.replace('_', '-')} {getattr(args, option)}: must be at least 1")
    import torch

    torch.set_num_threads(args.threads)
    if args.child:
        print(json.dumps(child(args.child, args)))
        return
    rows = []
    for name in names:  # memory: each configuration alone in a fresh process
        command = [sys.executable, __file__, "--child", name] + [f"--{k}={v}" for k, v in
                   (("memory-steps", args.memory_steps), ("layers", args.layers), ("batch", args.batch),
                    ("seq", args.seq), ("threads", args.threads), ("model", args.model))] + (["--bf16"] if args.bf16 else [])
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(output.strip().splitlines()[-1]))
        print(f"memory, {name}: +{rows[-1]['peak_rss_increase'] / 2**20:.0f} MB", file=sys.stderr)
    times = paired_times(names, args)

    def ratio(name: str, reference: str) -> float:  # the median of same-round ratios
        return statistics.median(a / b for a, b in zip(times[name], times[reference]))

    setting = ("SmolLM2-135M (embedded), Textual MNIST 7x7, answer-token loss, batch " + str(args.batch)
               if args.model == "smollm2_135m" else f"random Llama {args.layers} x 512, batch {args.batch} x {args.seq}")
    autocast = args.bf16 or args.model == "smollm2_135m"
    print(f"{setting}, {args.threads} threads, "
          f"{'bf16 autocast' if autocast else 'float32'}, {args.steps} rounds of one step per configuration "
          f"(median step time; ratios: median of same-round ratios; an @<base> row's floor is floor@<base> when run, "
          f"and an @nf4 row's LoRA is qlora_r8)")
    print(f"{'config':<24}{'trainable':>12}{'s/step':>9}{'x floor':>9}{'x LoRA':>8}{'peak RSS +MB':>14}{'base MB':>9}"
          f"{'B/value':>9}")
    for row in rows:
        name = row["name"]
        own_floor = "floor@" + name.partition("@")[2]
        floor = own_floor if "@" in name and own_floor in times else "floor"
        lora = "qlora_r8" if name.endswith("@nf4") and "qlora_r8" in times else "lora_r8"  # like for like
        vs_lora = f"{ratio(name, lora):.2f}" if lora in times else "-"
        per_value = f"{row['bytes_per_value']:.1f}" if "bytes_per_value" in row else ""
        print(f"{name:<24}{row['trainable']:>12,}{statistics.median(times[name]):>9.3f}"
              f"{ratio(name, floor):>9.2f}{vs_lora:>8}{row['peak_rss_increase'] / 2**20:>14.0f}"
              f"{row['base_weight_bytes'] / 2**20:>9.1f}{per_value:>9}")


if __name__ == "__main__":
    main()
