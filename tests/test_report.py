"""rigsa-report over hand-written run folders: exact means, stds and n; missing and failed seeds; the paper's
shape and numbers; figures that hold plots."""
from __future__ import annotations

import csv
import json
import statistics
from pathlib import Path

import pytest
import yaml

from rigsa.report import main, report

ACCURACY = {("lora", 0): 0.50, ("lora", 1): 0.60, ("lora", 2): 0.70, ("sparta", 0): 0.40, ("sparta", 1): 0.50}
FORGETTING = {("lora", 0): 0.02, ("lora", 1): 0.04, ("lora", 2): 0.06, ("sparta", 0): 0.01, ("sparta", 1): 0.01}


def write_run(root: Path, method: str, seed: int, accuracy: float | None, forgetting: float = 0.0,
              iterations: list | None = None) -> Path:
    folder = root / f"{method}-seed{seed}"
    folder.mkdir(parents=True)
    config = {"seed": seed, "model": {"name": "tiny"}, "task": {"name": "textual_mnist"},
              "method": {"name": method, "seed": seed}, "train": {"lr": 0.001, "threads": seed},
              "run": {"root": str(root), "name": folder.name}, "report": {"name": None}}
    if accuracy is None:  # a failed job: error.json with its config, no results
        (folder / "error.json").write_text(json.dumps({"error": "RuntimeError: out of memory", "config": config}))
        return folder
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    results = {"target": {"accuracy": accuracy, "base_accuracy": 0.1},
               "forgetting": {"mean_forgetting": forgetting, "mean_forget_ratio": forgetting / 2, "collapsed": 0},
               "trainable_params": 1000 if method == "lora" else 500, "peak_memory_bytes": 2**30,
               "memory": {"base_weight_bytes": 2**20, "adapter_bytes": 2**19, "gradient_bytes": 2**19,
                          "optimizer_state_bytes": 2**20}, "train": {"seconds": 120.0},
               "iterations": iterations or []}
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def runs(tmp_path):
    root = tmp_path / "runs"
    for (method, seed), accuracy in ACCURACY.items():
        iterations = [{"phase": f"iteration{i}", "accuracy": accuracy - 0.1 * (2 - i), "mean_forgetting": 0.01 * i,
                       "trainable_params": 1000 // (i + 1)} for i in range(3)] if method == "lora" else None
        write_run(root, method, seed, accuracy, FORGETTING[(method, seed)], iterations)
    write_run(root, "sparta", 2, None)
    (root / "fresh-seed0").mkdir()  # a config and nothing else: not started, not reported
    (root / "fresh-seed0" / "config.yaml").write_text("seed: 0\n")
    write_run(root, "lora", 3, 0.0)  # seed 3: started, no results yet (a checkpoint only)
    (root / "lora-seed3" / "results.json").unlink()
    (root / "lora-seed3" / "checkpoint").mkdir()
    (root / "lora-seed3" / "checkpoint" / "train.pt").write_bytes(b"")
    return root


def test_means_stds_and_n_are_exact_and_a_missing_seed_is_flagged(runs, tmp_path):
    made = report([runs], tmp_path / "out", log_to_wandb=False)
    records = {record["method"]: record for record in made["records"]}
    assert set(records) == {"lora", "sparta", "base model"}  # short labels: the method's name, what tells rows apart
    lora, sparta = records["lora"], records["sparta"]
    assert (lora["n"], lora["seeds"], lora["missing seeds"], lora["failed"]) == (3, "0 1 2", "3", "seed 3: unfinished")
    assert lora["accuracy (%) mean"] == pytest.approx(60.0)
    assert lora["accuracy (%) std"] == pytest.approx(statistics.stdev([50.0, 60.0, 70.0]))  # 10.0, n-1
    assert lora["mean forgetting mean"] == pytest.approx(0.04)
    assert (sparta["n"], sparta["missing seeds"]) == (2, "2 3")  # seed 3 exists in the report (lora's)
    assert sparta["accuracy (%) mean"] == pytest.approx(45.0)
    assert sparta["accuracy (%) std"] == pytest.approx(50 ** 0.5)
    assert "seed 2: RuntimeError: out of memory" in sparta["failed"]
    assert records["base model"]["accuracy (%) mean"] == pytest.approx(10.0)
    text = (tmp_path / "out" / "report.md").read_text()
    assert "| lora | 3 | 60.0 ± 10.0 | 0.0400 ± 0.0200 | 1,000 ± 0 | 3 (unfinished) |" in text
    assert "| sparta | 2 | 45.0 ± 7.1 | 0.0100 ± 0.0000 | 500 ± 0 | 2 (failed), 3 |" in text
    assert f"Failed: {runs / 'sparta-seed2'}: RuntimeError: out of memory" in text
    with open(tmp_path / "out" / "report.csv") as handle:
        rows = list(csv.DictReader(handle))
    assert float(rows[0]["accuracy (%) mean"]) == pytest.approx(60.0) and rows[1]["missing seeds"] == "2 3"


def test_runs_written_before_a_key_existed_group_with_runs_holding_its_old_value(runs, tmp_path):
    """The fixture's runs have no model.base_dtype / model.quantize (written before they existed): a new run
    that holds their old values (float32, null) joins their row; a bf16-base run gets its own."""
    for seed, base_dtype in ((4, "float32"), (5, "bfloat16")):
        folder = write_run(runs, "lora", seed, 0.8)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["model"].update(base_dtype=base_dtype, quantize=None)
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
    records = {record["method"]: record for record in report([runs], tmp_path / "out", log_to_wandb=False)["records"]}
    float32_row = next(r for name, r in records.items() if "lora" in name and "bfloat16" not in name)
    bf16_row = next(r for name, r in records.items() if "bfloat16" in name)
    assert (float32_row["n"], float32_row["seeds"]) == (4, "0 1 2 4")
    assert (bf16_row["n"], bf16_row["seeds"]) == (1, "5")


def test_an_experiment_shapes_the_table_with_the_papers_numbers(runs, tmp_path, monkeypatch):
    from rigsa import report as report_module

    spec = {"title": "Table X", "source": "the paper, Table X", "columns": ["accuracy", "memory"],
            "rows": [{"label": "SpaRTA", "match": {"method.name": "sparta"}, "paper": {"accuracy": 93.1}},
                     {"label": "LoRA r=8", "match": {"method.name": "lora"}, "paper": {"accuracy": 94.0}},
                     {"label": "Head only", "match": {"method.name": "head"}, "paper": {"accuracy": 80.5}}],
            "seeds": [0, 1, 2, 3]}  # the experiment's sweep runs seeds 0-3
    monkeypatch.setattr(report_module, "experiment_spec", lambda name: spec)
    write_run(runs, "dora", 7, 0.9)  # in the folder, not in the experiment's rows: left out, seed 7 not expected
    text = report([runs], tmp_path / "out", experiment="any", log_to_wandb=False)["markdown"]
    assert "dora" not in text and "1 other runs here are not in this table" in text
    lines = text.splitlines()
    assert lines[0] == "## Table X" and "Paper: the paper, Table X" in text
    header = next(line for line in lines if line.startswith("| method"))
    assert header == ("| method | n | accuracy (%) | base weights (MiB) | adapter (MiB) | gradients (MiB) | "
                      "optimizer state (MiB) | paper accuracy | missing seeds |")
    body = [line for line in lines if line.startswith("| ") and line != header]
    assert body[0].startswith("| SpaRTA | 2 | 45.0 ± 7.1 | 1.0 ± 0.0 | 0.5 ± 0.0 | 0.5 ± 0.0 | 1.0 ± 0.0 | 93.1 |")
    assert body[1].startswith("| LoRA r=8 | 3 | 60.0 ± 10.0 |") and body[1].endswith("| 94.0 | 3 (unfinished) |")
    assert body[0].endswith("| 93.1 | 2 (failed), 3 |")
    assert body[2] == "| Head only | 0 | - | - | - | - | - | 80.5 | 0, 1, 2, 3 |"  # not run yet: every seed missing


def test_the_figures_are_pngs_holding_plots(runs, tmp_path):
    from matplotlib.image import imread

    made = report([runs], tmp_path / "out", log_to_wandb=False)
    names = sorted(path.name for path in made["figures"])
    assert names == ["accuracy_vs_trainable.png", "forgetting.png", "iterations.png", "learning_forgetting.png"]
    for path in made["figures"]:
        assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and path.stat().st_size > 10_000
        pixels = imread(path)
        assert pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels[..., :3].std() > 0.05  # lines, markers and text, not a blank canvas


def test_the_command_line_refuses_an_empty_folder_and_an_unknown_experiment(tmp_path, capsys):
    assert main([str(tmp_path), "--no-wandb"]) == 2
    assert "no finished or failed runs under" in capsys.readouterr().err
    write_run(tmp_path, "lora", 0, 0.5)
    assert main([str(tmp_path), "--experiment", "nope", "--no-wandb"]) == 2
    assert "--experiment 'nope' is not an experiment config. Fix: one of [" in capsys.readouterr().err


def test_the_table_goes_to_wandb_as_a_table_in_the_sweeps_group(tmp_path, monkeypatch):
    import wandb

    logged = {}

    class FakeRun:
        def log(self, values):
            logged.update(values)

        def finish(self):
            logged["finished"] = True

    monkeypatch.setattr(wandb, "init", lambda **kwargs: logged.update(init=kwargs) or FakeRun())
    folder = write_run(tmp_path, "lora", 0, 0.5)
    (folder / "wandb_id.txt").write_text("abc")
    config = yaml.safe_load((folder / "config.yaml").read_text())
    config["report"]["name"], config["logger"] = "my_sweep", {"mode": "offline", "project": "p"}
    (folder / "config.yaml").write_text(yaml.safe_dump(config))
    report([tmp_path], tmp_path / "out")
    assert logged["init"]["group"] == "my_sweep" and logged["init"]["job_type"] == "report"
    assert logged["init"]["project"] == "p" and logged["init"]["mode"] == "offline"
    table = logged["report"]
    assert table.columns[:3] == ["method", "n", "accuracy (%)"] and table.data[0][2] == "50.0"
    assert logged["finished"]


def test_an_experiments_report_section_carries_its_sweeps_seeds():
    from rigsa.report import experiment_spec

    spec = experiment_spec("rigsa_fig2_cpu")
    assert spec["seeds"] == [0, 1] and spec["name"] == "rigsa_fig2_cpu"
    assert [row["match"] for row in spec["rows"]] == [{"variant": "rigsa"}, {"variant": "random_mask_rigsa_budget"}]
    assert experiment_spec("sparta_table3_cpu")["seeds"] == [0]


def test_each_row_against_the_first_is_a_welch_interval_equal_to_a_hand_computation(runs, tmp_path):
    from scipy import stats

    text = report([runs], tmp_path / "out", log_to_wandb=False)["markdown"]
    lora, sparta = [50.0, 60.0, 70.0], [40.0, 50.0]  # the fixture's accuracies in points (lora is the first row)
    # by hand: difference of means, each mean's variance s^2/n, Welch-Satterthwaite degrees of freedom
    va, vb = statistics.variance(lora) / 3, statistics.variance(sparta) / 2  # 100/3 and 50/2
    df = (va + vb) ** 2 / (va ** 2 / 2 + vb ** 2 / 1)
    half = stats.t.ppf(0.975, df) * (va + vb) ** 0.5
    assert df == pytest.approx(49 / 17) and half == pytest.approx(24.877, abs=1e-3)  # t(0.975, 2.88) = 3.257
    low, high = -15.0 - half, -15.0 + half
    assert "### Against lora (this row minus it; 95% Welch interval over seeds)" in text
    line = next(line for line in text.splitlines() if line.startswith("| sparta | 2 vs 3 |"))
    assert f"| -15.0 | [{low:+.1f}, {high:+.1f}] | cannot tell |" in line  # the interval holds 0
    from rigsa.report_compare import difference_interval, verdict

    interval = difference_interval(lora, sparta)
    assert (interval["low"], interval["high"]) == pytest.approx((low, high), rel=1e-12)
    assert verdict(difference_interval([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]), True) == "better"
    assert verdict(difference_interval([1.0, 1.1, 0.9], [2.0, 2.1, 1.9]), False) == "worse"
    assert difference_interval([1.0], [2.0, 3.0]) is None  # one seed: no interval, "cannot tell"


def test_runs_of_two_tasks_get_two_tables_and_a_one_class_answerer_is_flagged(tmp_path):
    root = tmp_path / "runs"
    for seed in (0, 1):
        write_run(root, "lora", seed, 0.5 + 0.1 * seed)
    for seed in (0, 1):  # another task: ten classes, one of them always answered
        folder = write_run(root / "mnist", "sparta", seed, 0.1)
        config = yaml.safe_load((folder / "config.yaml").read_text())
        config["task"]["name"] = "digits"
        (folder / "config.yaml").write_text(yaml.safe_dump(config))
        results = json.loads((folder / "results.json").read_text())
        confusion = [[0] * 10 for _ in range(10)]
        for true in range(10):
            confusion[true][6] = 2  # every digit answered "6"
        results["target"].update(answer_counts=[0] * 6 + [20] + [0] * 3,
                                 metrics={"accuracy": 0.1, "macro_f1": 2 * 2 / (20 + 2) / 10, "confusion": confusion})
        (folder / "results.json").write_text(json.dumps(results))
    made = report([root], tmp_path / "out", log_to_wandb=False)
    text = made["markdown"]
    assert "## rigsa runs (digits on tiny)" in text and "## rigsa runs (textual_mnist on tiny)" in text
    digits = text[text.index("(digits on tiny)"):text.index("(textual_mnist on tiny)")]
    assert "| macro-F1 (%) |" in digits and "| sparta | 2 | 10.0 ± 0.0 | 1.8 ± 0.0 |" in digits
    assert "sparta (seed 0: every answer is class 6)" in digits
    assert "Confusion matrix of sparta (2 seeds summed" in digits and "| 3 | 0 | 0 | 0 | 0 | 0 | 0 | 4 | 0 | 0 | 0 |" in digits
    assert {record["task"] for record in made["records"]} == {"digits", "textual_mnist"}
    assert {path.parent.name for path in made["figures"]} == {"digits-tiny", "textual_mnist-tiny"}


def test_a_tuned_rows_chosen_setting_and_the_learning_rate_figure_come_from_its_search(runs, tmp_path):
    from matplotlib.image import imread

    search = runs / "search" / "lora"
    search.mkdir(parents=True)
    trials = [{"number": 0, "params": {"train.lr": 0.0003}, "state": "complete", "value": 2.1},
              {"number": 1, "params": {"train.lr": 0.001}, "state": "complete", "value": 1.7},
              {"number": 2, "params": {"train.lr": 0.01}, "state": "pruned", "value": 2.3}]
    (search / "selection.yaml").write_text(yaml.safe_dump({
        "row": ["method.name=lora"], "objective": "target.loss", "trials": trials,
        "chosen": {"trial": 1, "params": {"train.lr": 0.001}, "value": 1.7},
        "counts": {"complete": 2, "pruned": 1, "fail": 0}}))
    made = report([runs], tmp_path / "out", log_to_wandb=False)
    line = next(line for line in made["markdown"].splitlines() if line.startswith("| lora |"))
    assert "| lr=0.001 | 1.7000 (2 complete, 1 pruned, 0 failed) |" in line
    sparta = next(line for line in made["markdown"].splitlines() if line.startswith("| sparta |"))
    assert "| - | - |" in sparta  # no search chose it
    figure = tmp_path / "out" / "learning_rate.png"
    assert figure in made["figures"] and imread(figure)[..., :3].std() > 0.05


@pytest.mark.parametrize("damaged", ["results.json", "config.yaml", "error.json"])
def test_a_damaged_file_skips_its_run_with_one_line_and_the_report_goes_on(runs, tmp_path, capsys, damaged):
    folder = runs / ("sparta-seed2" if damaged == "error.json" else "lora-seed0")
    (folder / damaged).write_text("{not json: [" if damaged != "config.yaml" else "seed: [unclosed\n")
    made = report([runs], tmp_path / "out", log_to_wandb=False)
    error = capsys.readouterr().err
    assert error.count("rigsa-report: skipped") == 1 and f"skipped {folder}: a file there is not readable" in error
    records = {record["method"]: record for record in made["records"]}
    assert records["sparta"]["n"] == 2 and records["lora"]["n"] == (2 if damaged != "error.json" else 3)
