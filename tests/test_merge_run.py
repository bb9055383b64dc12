"""`rigsa-merge` end to end on the tiny model: two tasks (Textual MNIST by label words, SST-2 fixture by a
classification head), per-task scores, resume, a method sweep, refusals before any model load."""
from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import TINY

from rigsa.config import compose
from rigsa.merging.combine import MergeSettings
from rigsa.run import run

HUB = Path(__file__).parent / "fixtures" / "hub"
TEXT = [item for item in TINY if not item.startswith("task.")] + [
    "task=glue_sst2", f"task.hub_id={HUB / 'glue'}", "task.splits.dev_size=4", "task.readout=classifier_head"]


def rigsa_merge(*arguments: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", "from rigsa.cli import merge_main; merge_main()", *arguments],
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two finished tiny runs on two tasks: {"digits": sparta on Textual MNIST, "sst2": snip + head on SST-2}."""
    root = tmp_path_factory.mktemp("sources")
    digits = compose(TINY + ["method=sparta", "method.budget.density=0.1", "train.lr=1e-2", f"run.root={root}"])
    sst2 = compose(TEXT + ["method=snip", "method.budget.density=0.1", "train.lr=1e-2", f"run.root={root}"])
    run(digits, root / "digits")
    run(sst2, root / "sst2")
    return {"digits": root / "digits", "sst2": root / "sst2"}


def merge_cfg(sources, tmp_path, *extra):
    return compose([f"adapters=[{sources['digits']},{sources['sst2']}]", "eval=target", f"run.root={tmp_path}",
                    "device=cpu", *extra], config_name="merge")


def test_a_merge_scores_each_task_with_its_own_readout_and_resumes_without_rescoring(sources, tmp_path):
    from rigsa.adapters.load import apply_adapter
    from rigsa.adapters.read import read_adapter
    from rigsa.evaluate import target_accuracy
    from rigsa.merging.heads import read_heads, task_readout
    from rigsa.merging.run import merge_run
    from rigsa.models import load_model
    from rigsa.tasks import build_task

    cfg = merge_cfg(sources, tmp_path, "merge_method=ties", "density=0.5")
    results = merge_run(cfg, tmp_path / "m")
    assert list(results["tasks"]) == ["textual_mnist", "glue_sst2"]
    for task, folder in zip(results["tasks"], (sources["digits"], sources["sst2"])):
        source = json.loads((folder / "results.json").read_text())
        row = results["tasks"][task]
        assert row["individual"] == source["target"]["metrics"][row["metric"]]
        assert row["base"] == source["target"]["base_metrics"][row["metric"]]
    assert results["tasks"]["glue_sst2"]["readout"] == "classifier_head"
    assert results["target"]["accuracy"] == pytest.approx(sum(r["merged"] for r in results["tasks"].values()) / 2)

    # independently: the saved merged adapter on a fresh base, SST-2 scored with its saved head, gives the same
    model, tokenizer = load_model(compose(TINY).model, 0)
    model = apply_adapter(model, read_adapter(tmp_path / "m" / "adapter"))
    heads = read_heads(tmp_path / "m" / "adapter")
    data = build_task(compose(TEXT).task, tokenizer, 1024)
    again = target_accuracy(model, data.test, task_readout(heads["glue_sst2"], data.label_token_ids), 16,
                            torch.device("cpu"), "float32")
    assert again["metrics"] == results["tasks"]["glue_sst2"]["merged_metrics"]

    from rigsa.report import report  # rigsa-report reads the merge: each task's base, adapter and merged score
    text = report([tmp_path], tmp_path / "report", None, False)["markdown"]
    cells = [f"{100 * results['tasks'][task][key]:.1f}" for task in results["tasks"]
             for key in ("base", "individual", "merged")]
    assert f"| {cells[0]} | {cells[1]} | {cells[2]} | " in text and f"| {cells[3]} | {cells[4]} | {cells[5]} | " in text

    written = (tmp_path / "m" / "results.json").stat().st_mtime_ns
    (tmp_path / "m" / "results.json").unlink()  # interrupted after scoring: the rerun reads the kept scores
    score_files = {path.name: path.stat().st_mtime_ns for path in (tmp_path / "m" / "scores").iterdir()}
    assert merge_run(cfg, tmp_path / "m")["tasks"] == results["tasks"]
    assert {path.name: path.stat().st_mtime_ns for path in (tmp_path / "m" / "scores").iterdir()} == score_files
    assert (tmp_path / "m" / "results.json").stat().st_mtime_ns != written

    # another set of adapters over that folder (run.overwrite): no score of the old merge is read back
    alone = compose([f"adapters=[{sources['sst2']}]", "eval=target", f"run.root={tmp_path}", "device=cpu",
                     "merge_method=ties", "density=0.5", "run.overwrite=true"], config_name="merge")
    assert list(merge_run(alone, tmp_path / "m")["tasks"]) == ["glue_sst2"]
    assert [path.name for path in (tmp_path / "m" / "scores").iterdir()] == ["glue_sst2.json"]
    assert (tmp_path / "m" / "scores" / "glue_sst2.json").stat().st_mtime_ns != score_files["glue_sst2.json"]


@pytest.mark.slow  # two multi-process sweeps (30-60 s): make test-slow
def test_a_two_method_merge_sweep_finishes_and_a_resubmission_recomputes_nothing(sources, tmp_path):
    arguments = ["--multirun", f"adapters=[{sources['digits']},{sources['sst2']}]", "eval=target", "device=cpu",
                 f"run.root={tmp_path}", "merge_method=sum,dare_ties", "density=0.5"]
    first = rigsa_merge(*arguments)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "2 done" in first.stdout
    folders = sorted(p for p in tmp_path.iterdir() if p.is_dir() and not p.name.startswith("."))
    assert [p.name for p in folders] == ["merge-dare_ties-density0.5-scale1.0-seed0",
                                         "merge-sum-density0.5-scale1.0-seed0"]
    written = {p.name: (p / "results.json").stat().st_mtime_ns for p in folders}
    second = rigsa_merge(*arguments)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "0 done, 0 resumed, 2 finished before" in second.stdout
    assert {p.name: (p / "results.json").stat().st_mtime_ns for p in folders} == written


def test_a_mergekit_yaml_stands_for_the_same_overrides(tmp_path):
    from rigsa.merging.mergekit import overrides_from

    spec = tmp_path / "merge.yaml"
    spec.write_text("models:\n  - model: runs/a\n    parameters: {weight: 0.7, density: 0.3}\n"
                    "  - model: runs/b\n    parameters: {weight: 0.3}\nmerge_method: linear\n"
                    "parameters: {lambda: 0.5, density: 0.6}\n")
    assert overrides_from(str(spec)) == ["adapters=['runs/a','runs/b']", "weights=[0.7,0.3]", "merge_method=mean",
                                         "density=[0.3,0.6]", "scale=0.5"]
    cfg = compose(overrides_from(str(spec)), config_name="merge")
    assert list(cfg.adapters) == ["runs/a", "runs/b"] and list(cfg.density) == [0.3, 0.6]


def copied(folder: Path, target: Path, config=None, adapter_meta=None) -> Path:
    """A copy of a finished run folder with config.yaml and adapter.json values changed."""
    import shutil

    from omegaconf import OmegaConf

    shutil.copytree(folder, target)
    if config:
        cfg = OmegaConf.load(target / "config.yaml")
        for key, value in config.items():
            OmegaConf.update(cfg, key, value)
        OmegaConf.save(cfg, target / "config.yaml")
    if adapter_meta:
        meta = json.loads((target / "adapter" / "adapter.json").read_text())
        (target / "adapter" / "adapter.json").write_text(json.dumps({**meta, **adapter_meta}))
    return target


def copied_results(folder: Path, target: Path, **changes) -> Path:
    """A copy of a finished run folder with results.json values changed."""
    import shutil

    shutil.copytree(folder, target)
    results = json.loads((target / "results.json").read_text())
    (target / "results.json").write_text(json.dumps({**results, **changes}))
    return target


def without_adapter(folder: Path, target: Path) -> Path:
    import shutil

    shutil.copytree(folder, target)
    shutil.rmtree(target / "adapter")
    return target


# (the adapters, as a function of the sources fixture and tmp_path; extra overrides; the error line contains)
REFUSALS = [
    (lambda s, t: [s["digits"], s["digits"]], [], "are both adapters of task 'textual_mnist'"),
    (lambda s, t: [s["digits"], copied(s["sst2"], t / "x", {"model.name": "other", "model.hidden_size": 32})], [],
     "adapters of different base models (or tokenizers) cannot be merged"),
    (lambda s, t: [s["digits"], copied(s["sst2"], t / "x", {"dtype": "bfloat16"})], [],
     "computed in dtype=bfloat16"),
    (lambda s, t: [s["digits"], copied(s["sst2"], t / "x", adapter_meta={"quantize": {"quant_type": "nf4",
                                                                                      "compute_dtype": "float32"}})],
     [], "quantized as {'quant_type': 'nf4'"),
    (lambda s, t: [s["digits"], copied(s["digits"], t / "x", {"task.name": "other"},
                                       {"base_fingerprint": "0" * 64})], [],
     "was trained on a base whose weights differ from"),
    (lambda s, t: [s["digits"], copied_results(s["sst2"], t / "x", base_fingerprint="f" * 64)], [],
     "was trained from a base model whose weights differ from"),
    (lambda s, t: [s["digits"], without_adapter(s["sst2"], t / "x")], [], "holds no adapter (its adapter/ folder"),
    (lambda s, t: [s["digits"], t / "nothing"], [], "is not a finished run (no results.json or config.yaml there)"),
    (lambda s, t: [s["digits"], s["sst2"]], ["merge_method=soup"], "merge_method='soup' is invalid: expected one of"),
    (lambda s, t: [s["digits"], s["sst2"]], ["merge_method=ties", "density=0"],
     "density=0 is invalid: expected a fraction in (0, 1]"),
    (lambda s, t: [s["digits"], s["sst2"]], ["weights=[1.0]"], "weights=[1.0] is invalid: expected 2 finite numbers"),
    (lambda s, t: [s["digits"], s["sst2"]], ["majority_sign=vote"], "majority_sign='vote' is invalid"),
    (lambda s, t: [], [], "adapters='[]' is invalid"),
]


@pytest.mark.parametrize("adapters,extra,message", REFUSALS, ids=[r[2][:40] for r in REFUSALS])
def test_a_merge_that_cannot_be_made_is_refused_in_one_line_before_any_model_loads(adapters, extra, message, sources,
                                                                                  tmp_path, monkeypatch, capsys):
    from rigsa import cli, models

    def no_model(*args, **kwargs):
        raise AssertionError("a model was loaded before the refusal")

    monkeypatch.setattr(models, "load_model", no_model)
    folders = ",".join(str(folder) for folder in adapters(sources, tmp_path))
    monkeypatch.setattr(sys, "argv", ["rigsa-merge", f"adapters=[{folders}]", "eval=target",
                                      f"run.root={tmp_path / 'merges'}", *extra])
    with pytest.raises(SystemExit) as stopped:
        cli.merge_main()
    assert stopped.value.code == 2
    error = capsys.readouterr().err.strip()
    assert error.count("\n") == 0 and message in error, error
    assert not (tmp_path / "merges").exists()


def test_layers_whose_shapes_differ_are_refused_never_skipped():
    from omegaconf import OmegaConf

    from rigsa.adapters import DENSE_FORMAT, Adapter, DenseDelta
    from rigsa.merging.sources import Source, check_sources
    from rigsa.vocabulary import ConfigError

    def source(name: str, shape) -> Source:
        cfg = OmegaConf.create({"model": {"name": "tiny"}, "dtype": "float32", "task": {"name": name}})
        adapter = Adapter(Path(name), DENSE_FORMAT, "full", {"layers.0.q": DenseDelta(torch.zeros(shape))}, {}, None,
                          None, "tiny", None)
        return Source(Path(name), cfg, {}, adapter)

    check_sources([source("a", (4, 4)), source("b", (4, 4))])
    with pytest.raises(ConfigError, match=r"layer layers.0.q is \(4, 8\) in b but \(4, 4\) in a"):
        check_sources([source("a", (4, 4)), source("b", (4, 8))])


def test_one_adapter_merged_alone_scores_as_its_own_run(sources, tmp_path):
    """The SST-2 adapter merged with weight 1 and scored with its saved head gives its run's own test metrics."""
    from rigsa.merging.run import merge_run

    cfg = compose([f"adapters=[{sources['sst2']}]", "eval=target", f"run.root={tmp_path}", "device=cpu"],
                  config_name="merge")
    row = merge_run(cfg, tmp_path / "alone")["tasks"]["glue_sst2"]
    source = json.loads((sources["sst2"] / "results.json").read_text())["target"]
    assert row["merged_metrics"] == pytest.approx(source["metrics"], abs=1e-9)
    assert row["answer_counts"] == source["answer_counts"]


@pytest.mark.parametrize("option", [pytest.param("lora", marks=pytest.mark.slow),
                                    pytest.param("qlora", marks=pytest.mark.slow), "full"])
def test_each_adapter_is_checked_on_the_loaded_base_and_refused_on_another(option, tiny_data, tmp_path):
    from omegaconf import OmegaConf

    from rigsa.adapters import AdapterMismatch
    from rigsa.adapters.read import read_adapter
    from rigsa.merging.deltas import merge_adapters
    from rigsa.merging.sources import Source, check_on_base
    from rigsa.models import fingerprint, load_model

    from test_adapters import trained_and_saved

    cfg, _, _ = trained_and_saved(option, [], None, tiny_data, tmp_path)
    base, _ = load_model(cfg.model, 0)
    source = Source(tmp_path, OmegaConf.create({}), {"base_fingerprint": fingerprint(base)},
                    read_adapter(tmp_path / "adapter"))
    merge_adapters([source.adapter], MergeSettings("sum", (1.0,), (1.0,)), base)  # quantizes a 4-bit base
    check_on_base(base, source, source.results["base_fingerprint"])
    other, _ = load_model(cfg.model, 1)  # the tiny model of another seed: other weights, same shapes
    loaded = fingerprint(other)
    merge_adapters([source.adapter], MergeSettings("sum", (1.0,), (1.0,)), other)
    with pytest.raises(AdapterMismatch, match="was trained from a base model whose weights hash to"):
        check_on_base(other, source, loaded)
    if option != "full":  # its own record tells the base too: refused with the run's fingerprint unknown
        with pytest.raises(AdapterMismatch, match="was trained on a different base model"):
            check_on_base(other, dataclasses.replace(source, results={}), loaded)


@pytest.mark.slow  # lm-eval on the merged model (20-40 s): make test-slow
def test_a_merge_measures_forgetting_against_the_cached_base(sources, tmp_path, private_cache):
    from rigsa.merging.run import merge_run

    suite = ["eval=offline", "eval.forgetting=[{task: rigsa_prose_bpb, num_fewshot: 0, limit: 2}]"]
    cfg = compose([f"adapters=[{sources['digits']},{sources['sst2']}]", f"run.root={tmp_path}", "device=cpu",
                   *suite], config_name="merge")
    results = merge_run(cfg, tmp_path / "a")
    block = results["forgetting"]
    assert list(block["tasks"]) == ["rigsa_prose_bpb"] and block["mean_forgetting"] is not None
    cached = list((private_cache / "base_forgetting").glob("*.json"))
    assert len(cached) == 1  # the base's suite, measured once and kept
    again = merge_run(compose([f"adapters=[{sources['digits']},{sources['sst2']}]", f"run.root={tmp_path}",
                               "device=cpu", "merge_method=mean", *suite], config_name="merge"), tmp_path / "b")
    assert list((private_cache / "base_forgetting").glob("*.json")) == cached  # read back, not measured again
    bases = [{metric: row["base"] for metric, row in run["forgetting"]["tasks"]["rigsa_prose_bpb"].items()}
             for run in (results, again)]
    assert bases[0] == bases[1] and bases[0]


def test_a_mergekit_yaml_goes_through_the_command_and_a_bad_one_is_refused_in_one_line(sources, tmp_path,
                                                                                    monkeypatch, capsys):
    from rigsa import cli

    spec = tmp_path / "merge.yaml"
    spec.write_text(f"models:\n  - model: {sources['digits']}\n  - model: {sources['digits']}\nmerge_method: ties\n")
    monkeypatch.setattr(sys, "argv", ["rigsa-merge", f"mergekit={spec}", "eval=target", f"run.root={tmp_path}"])
    with pytest.raises(SystemExit) as stopped:  # its adapters reach the checks: two of one task
        cli.merge_main()
    assert stopped.value.code == 2 and "are both adapters of task 'textual_mnist'" in capsys.readouterr().err
    spec.write_text("models:\n  - model: runs/a\nmerge_method: slerp\n")
    monkeypatch.setattr(sys, "argv", ["rigsa-merge", f"mergekit={spec}"])
    with pytest.raises(SystemExit) as stopped:
        cli.merge_main()
    error = capsys.readouterr().err.strip()
    assert stopped.value.code == 2 and error.count("\n") == 0 and "merge_method 'slerp' is not one of linear" in error
