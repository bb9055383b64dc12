"""Saved adapters: every method's reloaded adapter gives the trained model's logits; another base is refused;
SHiRA export matches."""
from __future__ import annotations

import pytest
import torch

from rigsa.adapters import AdapterMismatch
from rigsa.adapters.write import export_shira
from rigsa.apply import apply_adapter, main as apply_main
from rigsa.config import compose
from rigsa.methods import PruneStep
from rigsa.models import load_model
from rigsa.run import run

from conftest import TINY, attach_method, method_cfg, train_steps, trained_methods

IDS = torch.tensor([[5, 17, 300, 42, 7, 9, 11, 2]])


def logits(model):
    with torch.no_grad():
        return model(IDS).logits


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A tiny run per adapter kind; returns {method: run dir}."""
    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for method, extra in (("sparta", ["method.budget.density=0.05"]), ("rigsa", ["pruning=imp", "pruning.iterations=2",
                          "pruning.steps_per_iteration=2", "pruning.final_retrain_steps=2"]),
                          ("snip", ["method.budget.density=null", "method.budget.match=lora", "method.budget.r=2"]),
                          ("lora", [])):
        cfg = compose(TINY + [f"method={method}", "eval=none", "train.lr=1e-2", f"run.root={root}", *extra])
        run(cfg, root / method)
        out[method] = root / method
    return out


def reference_logits(run_dir):
    """Logits of the adapted model as the run left it, rebuilt independently: base + merged adapter."""
    model, _ = load_model(compose(["model=tiny"]).model, 0)
    return logits(apply_adapter(model, run_dir / "adapter", merge=True))


ROUND_TRIPS = [(option, [], None) for option in trained_methods()] + [
    ("sparta", ["method.train_head=true"], None),  # the sparse delta and a trained head
    ("rigsa", [], "zero"),  # pruned: a sparse adapter with gates
    ("rigsa", [], "init"),  # pruned entries reset to their initial value: a dense delta
]


def trained_and_saved(option: str, overrides: list[str], pruned_value: str | None, data, folder):
    """(cfg, model, its logits) after a few steps of `option` (and a prune), its adapter saved in folder/adapter."""
    cfg = method_cfg(option, ["pruning=none", *overrides])
    model, method = attach_method(cfg, data)
    train_steps(model, method, cfg, data, folder / "phase1.pt", steps=3, lr=1e-2)
    if pruned_value:
        method.prune(PruneStep(1, 0.5, pruned_value=pruned_value))
        train_steps(model, method, cfg, data, folder / "phase2.pt", steps=2, lr=1e-2)
    model.eval()
    trained = logits(model)
    method.save(folder / "adapter")
    return cfg, model, trained


@pytest.mark.parametrize("option,overrides,pruned_value", ROUND_TRIPS,
                         ids=[f"{o}{''.join(x)}{'-pruned_' + p if p else ''}" for o, x, p in ROUND_TRIPS])
def test_a_saved_adapter_reloads_to_the_trained_models_logits(option, overrides, pruned_value, tiny_data, tmp_path):
    cfg, model, trained = trained_and_saved(option, overrides, pruned_value, tiny_data, tmp_path)

    base, _ = load_model(cfg.model, 0)
    assert (trained - logits(base)).abs().max() > 1e-3  # the adapter changes the model
    for merge in (False,) if option == "qlora" else (False, True):  # merging into nf4 re-quantizes: not exact
        fresh, _ = load_model(cfg.model, 0)
        reloaded = apply_adapter(fresh, tmp_path / "adapter", merge=merge)
        torch.testing.assert_close(logits(reloaded), trained, rtol=1e-5, atol=1e-5, msg=lambda m: f"merge={merge}: {m}")
    if "method.train_head=true" in overrides:
        head = model.get_output_embeddings().weight
        assert not torch.equal(head, model.get_input_embeddings().weight)  # the head was trained apart
        torch.testing.assert_close(reloaded.get_output_embeddings().weight, head.detach())


def test_unmerging_a_reloaded_sparse_adapter_gives_the_base_weights_exactly(trained):
    from rigsa.sparse.engine import sparse_layers

    base, _ = load_model(compose(["model=tiny"]).model, 0)
    for method in ("sparta", "rigsa", "snip"):
        model, _ = load_model(compose(["model=tiny"]).model, 0)
        layers = sparse_layers(apply_adapter(model, trained[method] / "adapter", merge=False))
        assert layers
        for name, layer in layers.items():
            layer.unmerge()
            assert torch.equal(layer.weight, base.get_submodule(name).weight)


def test_a_different_base_model_is_refused(trained):
    other, _ = load_model(compose(["model=tiny"]).model, seed=1)  # same shapes, other weights
    with pytest.raises(AdapterMismatch, match="trained on a different base model"):
        apply_adapter(other, trained["sparta"] / "adapter")
    wider, _ = load_model(compose(["model=tiny", "model.num_layers=1"]).model, 0)
    with pytest.raises(AdapterMismatch, match="does not exist in this model"):
        apply_adapter(wider, trained["sparta"] / "adapter")


def test_rigsa_adapter_is_sparse_after_pruning(trained):
    import json

    meta = json.loads((trained["rigsa"] / "adapter" / "adapter.json").read_text())
    results = json.loads((trained["rigsa"] / "results.json").read_text())
    assert meta["format"] == "rigsa-sparse-v1" and meta["density"] == pytest.approx(0.25)
    assert results["sparse"]["values"] == meta["values"]
    assert [row["phase"] for row in results["iterations"]] == ["iteration1", "iteration2", "final_retrain"]
    assert [round(row["density"], 4) for row in results["iterations"]] == [1.0, 0.5, 0.25]


def test_shira_export_gives_the_same_logits_through_peft(trained, tmp_path):
    from peft import PeftModel

    expected = reference_logits(trained["snip"])
    model, _ = load_model(compose(["model=tiny"]).model, 0)
    export_shira(model, trained["snip"] / "adapter", tmp_path / "shira")
    fresh, _ = load_model(compose(["model=tiny"]).model, 0)
    peft_model = PeftModel.from_pretrained(fresh, str(tmp_path / "shira"))
    assert torch.allclose(logits(peft_model), expected, atol=1e-5, rtol=1e-5)
    model, _ = load_model(compose(["model=tiny"]).model, 0)
    with pytest.raises(ValueError, match="train with method.budget.match=lora"):
        export_shira(model, trained["sparta"] / "adapter", tmp_path / "no")


def test_rigsa_apply_command_writes_a_merged_model(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM

    assert apply_main([str(trained["sparta"] / "adapter"), "--model", "tiny", "--out", str(tmp_path / "merged")]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    assert torch.allclose(logits(merged), reference_logits(trained["sparta"]), atol=1e-6)
    assert apply_main([str(trained["sparta"] / "adapter"), "--model", "tiny", "--seed", "3", "--out",
                       str(tmp_path / "x")]) == 2
    assert "rigsa-apply: error: this adapter was trained on a different base model" in capsys.readouterr().err


@pytest.mark.parametrize("damage", ["adapter.json", "adapter.safetensors", "adapter_config.json"])
def test_rigsa_apply_names_a_damaged_adapter_file_and_the_fix(damage, trained, tmp_path, capsys):
    import shutil

    method = "lora" if damage == "adapter_config.json" else "sparta"
    shutil.copytree(trained[method] / "adapter", tmp_path / "adapter")
    path = tmp_path / "adapter" / damage
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])
    assert apply_main([str(tmp_path / "adapter"), "--model", "tiny", "--out", str(tmp_path / "merged")]) == 2
    error = capsys.readouterr().err.strip()
    assert error.startswith(f"rigsa-apply: error: {path}: not a readable") and "\n" not in error
    assert error.endswith("rerun the run's command: the final checkpoint rebuilds the adapter without training")
    assert not (tmp_path / "merged").exists()


AS_DATA = [("sparta", [], None), ("lora", [], None), ("dora", [], None), ("full", [], None), ("head", [], None),
           ("rigsa", [], None), ("rigsa", [], "zero"), ("sparta", ["method.train_head=true"], None)]


@pytest.mark.parametrize("option,overrides,pruned_value", AS_DATA,
                         ids=[f"{o}{''.join(x)}{'-pruned_' + p if p else ''}" for o, x, p in AS_DATA])
def test_an_adapter_read_as_data_rebuilds_the_trained_model(option, overrides, pruned_value, tiny_data, tmp_path):
    """read_adapter's deltas, added to the base weights by hand (no loader), give the trained model's logits: a
    sparse delta scattered at its positions, LoRA's B A scale, DoRA's merged weight minus the base, a dense delta."""
    from rigsa.adapters import LowRankDelta
    from rigsa.adapters.read import read_adapter
    from rigsa.model_edits import load_head

    cfg, _, trained = trained_and_saved(option, overrides, pruned_value, tiny_data, tmp_path)
    adapter = read_adapter(tmp_path / "adapter")
    assert adapter.method == option and (adapter.layers or adapter.replaced)
    base, _ = load_model(cfg.model, 0)
    with torch.no_grad():
        for name, delta in adapter.layers.items():
            weight = base.get_submodule(name).weight
            if isinstance(delta, LowRankDelta):
                weight += delta.dense(tuple(weight.shape), base_weight=weight.detach().clone())
            else:
                weight += delta.dense(tuple(weight.shape))
        for name, tensor in adapter.replaced.items():
            if name == "lm_head.weight":
                load_head(base, tensor)
            else:
                base.get_parameter(name).copy_(tensor)
    torch.testing.assert_close(logits(base), trained, rtol=1e-5, atol=1e-5)


def tamper(source, target, file: str, change) -> None:
    """Copy the adapter folder `source` to `target` and rewrite one tensor file (or its JSON) with `change`."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    shutil.copytree(source, target)
    if file.endswith(".json"):
        path = target / file
        path.write_text(json.dumps(change(json.loads(path.read_text()))))
    else:
        tensors = load_file(str(target / file))
        change(tensors)
        save_file(tensors, str(target / file))


def first(tensors: dict, suffix: str) -> str:
    return sorted(name for name in tensors if name.endswith(suffix))[0]


def nan_values(tensors):
    tensors[first(tensors, ".values")][0] = float("nan")


def index_outside(tensors):
    tensors[first(tensors, ".indices")][-1] = 10**8


def repeated_index(tensors):
    name = first(tensors, ".indices")
    tensors[name][1] = tensors[name][0]


def one_value_for_many(tensors):  # a one-element tensor that would broadcast over every position
    tensors[first(tensors, ".values")] = torch.tensor([5.0])


def two_gates(tensors):
    tensors[first(tensors, ".gate")] = torch.ones(2)


def wide_lora_b(tensors):
    name = first(tensors, "lora_B.weight")
    tensors[name] = torch.zeros(tensors[name].shape[0] + 1, tensors[name].shape[1])


def infinite_lora_a(tensors):
    tensors[first(tensors, "lora_A.weight")][0, 0] = float("inf")


def absurd_alpha(config):
    return {**config, "lora_alpha": 1e9}


TAMPERED = {  # case: (run, file, change, what the one line says)
    "nan value": ("sparta", "adapter.safetensors", nan_values, r"\.values holds NaN or infinite values"),
    "index outside the weight": ("sparta", "adapter.safetensors", index_outside, r"are not unique positions inside"),
    "repeated index": ("rigsa", "adapter.safetensors", repeated_index, r"are not unique positions inside"),
    "one value broadcast": ("sparta", "adapter.safetensors", one_value_for_many, r"positions, 1 values and 1 gate"),
    "two gates": ("rigsa", "adapter.safetensors", two_gates, r"values and 2 gate values"),
    "lora B of the wrong shape": ("lora", "adapter_model.safetensors", wide_lora_b, r"LoRA factors are .* which do not"),
    "infinite lora A": ("lora", "adapter_model.safetensors", infinite_lora_a, r"lora_A holds NaN or infinite"),
    "absurd lora_alpha": ("lora", "adapter_config.json", absurd_alpha,
                          r"adapter_config.json: .*LoRA scale \(lora_alpha / r\) is 1\.25e\+08, above 1000"),
}


@pytest.mark.parametrize("case", sorted(TAMPERED))
def test_a_tampered_adapter_is_refused_before_it_touches_a_weight(case, trained, tmp_path, capsys):
    from rigsa.cache import UnreadableFile

    run_name, file, change, said = TAMPERED[case]
    tamper(trained[run_name] / "adapter", tmp_path / "adapter", file, change)
    model, _ = load_model(compose(["model=tiny"]).model, 0)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    with pytest.raises(UnreadableFile, match=said) as refused:
        apply_adapter(model, tmp_path / "adapter")
    assert "Fix: delete the adapter folder" in str(refused.value)
    assert all(torch.equal(tensor, before[name]) for name, tensor in model.state_dict().items())
    assert apply_main([str(tmp_path / "adapter"), "--model", "tiny", "--out", str(tmp_path / "out")]) == 2
    error = capsys.readouterr().err
    assert error.startswith("rigsa-apply: error: ") and error.count("\n") == 1 and not (tmp_path / "out").exists()


def test_a_dense_delta_of_the_wrong_shape_is_refused(tmp_path):
    from rigsa.adapters.write import write_dense
    from rigsa.cache import UnreadableFile

    model, _ = load_model(compose(["model=tiny"]).model, 0)
    write_dense({"model.layers.0.mlp.up_proj.dense_delta": torch.ones(1)}, tmp_path / "adapter", {"method": "rigsa"},
                model)
    with pytest.raises(UnreadableFile, match=r"up_proj's delta is \(1,\), not its weight's"):
        apply_adapter(model, tmp_path / "adapter")


@pytest.mark.parametrize("option,overrides", [("rigsa", []), ("head", [])])
def test_a_dense_adapter_is_refused_on_another_base_and_accepted_on_its_own(option, overrides, tiny_data, tmp_path):
    """RIGSA before its first prune (or with pruning=none) and the head alone save dense adapters; each records its
    base's fingerprint, so another base (here the tiny model of another seed) is refused. (Full fine-tuning of the
    tiny model replaces every parameter: its adapter is the whole model, whatever base it lands on.)"""
    from rigsa.adapters import AdapterMismatch
    from rigsa.adapters.read import read_adapter

    cfg, _, trained = trained_and_saved(option, overrides, None, tiny_data, tmp_path)
    assert read_adapter(tmp_path / "adapter").base_fingerprint
    other, _ = load_model(cfg.model, 1)  # the same shapes, other weights
    with pytest.raises(AdapterMismatch, match="trained on a different base model"):
        apply_adapter(other, tmp_path / "adapter")
    own, _ = load_model(cfg.model, 0)
    torch.testing.assert_close(logits(apply_adapter(own, tmp_path / "adapter")), trained, rtol=1e-5, atol=1e-5)


def test_rigsa_apply_refuses_an_output_that_exists_and_writes_nothing(trained, tmp_path, capsys):
    taken = tmp_path / "taken.txt"
    taken.write_text("mine")
    used = tmp_path / "used"
    used.mkdir()
    (used / "notes.md").write_text("mine")
    for out in (taken, used):
        assert apply_main([str(trained["sparta"] / "adapter"), "--model", "tiny", "--out", str(out)]) == 2
        assert f"rigsa-apply: error: --out {out} exists" in capsys.readouterr().err
    assert taken.read_text() == "mine" and sorted(p.name for p in used.iterdir()) == ["notes.md"]
