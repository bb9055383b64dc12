"""GLUE, IMDB and a researcher's own data: SpaRTA's splits, the hub code path on fixtures, metrics, bad inputs."""
from __future__ import annotations

import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch

from rigsa import models
from rigsa.config import compose
from rigsa.evaluate import classification_metrics
from rigsa.run import run
from rigsa.tasks import text_classification as tc
from rigsa.vocabulary import ConfigError

from conftest import TINY

HUB = Path(__file__).parent / "fixtures" / "hub"
# The tiny run without Textual MNIST's keys; small dev sets for ~20-row fixtures.
TINY_TEXT = [item for item in TINY if not item.startswith("task.")] + ["train.max_steps=2", "eval=target"]
# option -> (hub fixture folder, test rows, metrics reported)
TASKS = {"glue_sst2": ("glue", 10, 3), "glue_cola": ("glue", 10, 3), "glue_mrpc": ("glue", 10, 3),
         "glue_qqp": ("glue", 10, 3), "glue_mnli": ("glue", 18, 3), "glue_qnli": ("glue", 10, 3),
         "glue_rte": ("glue", 10, 3), "imdb": ("imdb", 16, 3)}
PRIMARY = {"glue_cola": "mcc", "glue_mrpc": "f1", "glue_qqp": "f1"}


@pytest.mark.parametrize("option", sorted(TASKS))
def test_each_glue_task_and_imdb_trains_through_the_hub_code_path_and_reports_its_metrics(option, tmp_path,
                                                                                       private_cache):
    folder, test_rows, metric_count = TASKS[option]
    dev = [] if option == "glue_mrpc" else ["task.splits.dev_size=4"]
    cfg = compose(TINY_TEXT + [f"task={option}", f"task.hub_id={HUB / folder}", f"run.root={tmp_path}", *dev])
    results = run(cfg, tmp_path / "run")
    target = results["target"]
    assert target["test_size"] == test_rows and results["train"]["steps"] == 2
    assert target["metric"] == PRIMARY.get(option, "accuracy")
    assert len(target["metrics"]) == metric_count
    assert set(target["metrics"]) <= ({"accuracy", "macro_f1", "confusion"} if option == "glue_mnli" else
                                      {"accuracy", "f1", "mcc"})
    assert target["metrics"]["accuracy"] == target["accuracy"]
    assert target["train_size"] == {"glue_mrpc": 20, "imdb": 24}.get(option, 20)  # 24 rows less the dev 4
    assert sum(target["answer_counts"]) == test_rows


def test_local_files_and_the_hub_layout_give_the_same_task(tokenizer):
    from rigsa.tasks import build_task

    hub = build_task(compose(["task=glue_rte", f"task.hub_id={HUB / 'glue'}", "task.splits.dev_size=4"]).task,
                     tokenizer, 1024)
    files = {split: str(HUB / "glue" / "rte" / f"{split}.jsonl") for split in ("train", "validation")}
    data_files = "task.data_files={" + ", ".join(f"{split}: {path}" for split, path in files.items()) + "}"
    local = build_task(compose(["task=glue_rte", data_files, "task.splits.dev_size=4"]).task, tokenizer, 1024)
    assert hub.test_key == local.test_key and len(hub.train) == len(local.train) == 20
    assert hub.label_words == ["Yes", "No"]  # RTE's label 0 is entailment: "Yes"
    row = json.loads((HUB / "glue" / "rte" / "validation.jsonl").read_text().splitlines()[0])
    text = tokenizer.decode(hub.test.prompts[0])
    assert row["sentence1"] in text and row["sentence2"] in text and text.endswith("<|im_start|>assistant\n")
    assert hub.test.classes[0].item() == row["label"]


# SpaRTA's recipe at a tenth of GLUE's and IMDB's sizes: (splits and their rows, dev size, cap) -> (train, dev, test)
SCALED = {
    "glue_sst2": ({"train": 6735, "validation": 87, "test": 182}, 100, (6635, 100, 87)),
    "glue_cola": ({"train": 855, "validation": 104, "test": 106}, 100, (755, 100, 104)),
    "glue_qqp": ({"train": 36385, "validation": 4043, "test": 39096}, 500, (10000, 500, 4043)),
    "glue_qnli": ({"train": 10474, "validation": 546, "test": 546}, 500, (9974, 500, 546)),
    "glue_rte": ({"train": 249, "validation": 28, "test": 300}, 30, (219, 30, 28)),
    "glue_mnli": ({"train": 39270, "validation_matched": 982, "validation_mismatched": 983, "test_matched": 980,
                   "test_mismatched": 985}, 1000, (10000, 1000, 1965)),
    "glue_mrpc": ({"train": 367, "validation": 41, "test": 173}, None, (367, 41, 173)),
    "imdb": ({"train": 2500, "test": 2500, "unsupervised": 5000}, 500, (2500, 500, 2000)),
}


@pytest.mark.parametrize("option", sorted(SCALED))
def test_split_recipe_gives_spartas_sizes_scaled(option):
    sizes, dev_size, expected = SCALED[option]
    table = datasets.DatasetDict({name: datasets.Dataset.from_dict({"idx": list(range(rows))})
                                  for name, rows in sizes.items()})
    recipe = compose([f"task={option}"] + ([f"task.splits.dev_size={dev_size}"] if dev_size else [])).task.splits
    parts = tc.split_rows(table, recipe, seed=0, max_train_size=10000)
    assert tuple(len(parts[name]) for name in ("train", "dev", "test")) == expected
    if recipe.dev == "train":  # the last rows of train, and no longer in train
        assert parts["dev"]["idx"] == list(range(sizes["train"] - dev_size, sizes["train"]))
        assert not set(parts["train"]["idx"]) & set(parts["dev"]["idx"])
    if option == "imdb":  # a seeded sample of the test split, the rest is the test set
        assert not set(parts["dev"]["idx"]) & set(parts["test"]["idx"]) and parts["dev"]["idx"] != list(range(500))
        again = tc.split_rows(table, recipe, seed=0, max_train_size=10000)
        assert again["dev"]["idx"] == parts["dev"]["idx"]


def test_mcc_and_f1_equal_hand_computed_values():
    predicted = torch.tensor([1, 1, 0, 0, 1, 0, 1, 1, 0, 0])
    truth = torch.tensor([1, 0, 0, 0, 1, 1, 1, 0, 0, 1])
    # tp = 3 (0, 4, 6), fp = 2 (1, 7), fn = 2 (5, 9), tn = 3 (2, 3, 8)
    metrics = classification_metrics(predicted, truth, 2)
    assert metrics["accuracy"] == 0.6
    assert metrics["f1"] == pytest.approx(2 * 3 / (2 * 3 + 2 + 2))  # 0.6
    assert metrics["mcc"] == pytest.approx((3 * 3 - 2 * 2) / np.sqrt(5 * 5 * 5 * 5))  # 0.2
    assert classification_metrics(torch.zeros(4, dtype=torch.long), torch.tensor([0, 1, 0, 1]), 2)["mcc"] == 0.0



def test_macro_f1_and_the_confusion_matrix_equal_hand_computed_values():
    truth = torch.tensor([0, 0, 0, 1, 1, 2, 2, 2, 2])
    predicted = torch.tensor([0, 1, 0, 1, 2, 2, 2, 0, 1])
    metrics = classification_metrics(predicted, truth, 3)
    assert metrics["confusion"] == [[2, 1, 0], [0, 1, 1], [1, 1, 2]]  # rows: true class; columns: answered
    # class 0: tp 2, fp 1, fn 1 -> 4/6; class 1: tp 1, fp 2, fn 1 -> 2/5; class 2: tp 2, fp 1, fn 2 -> 4/7
    assert metrics["macro_f1"] == pytest.approx((4 / 6 + 2 / 5 + 4 / 7) / 3)
    assert metrics["accuracy"] == pytest.approx(5 / 9)
    one_class = classification_metrics(torch.full((9,), 2), truth, 3)  # answers "2" every time
    assert one_class["macro_f1"] == pytest.approx((2 * 4 / (9 + 4)) / 3)  # classes 0 and 1 never answered: F1 0


# ---------------------------------------------------------------- a researcher's own data
ROWS = [{"review": f"{'great' if i % 2 else 'awful'} product number {i}", "sentiment": "pos" if i % 2 else "neg"}
        for i in range(30)]
OWN = ["task=classification", "task.text_column=review", "task.label_column=sentiment", "task.labels=[neg,pos]",
       "task.label_words=[Bad,Good]", "task.instruction=Is this review good or bad?"]


def write(rows, path: Path) -> Path:
    frame = datasets.Dataset.from_list(rows)
    {".csv": frame.to_csv, ".jsonl": frame.to_json, ".parquet": frame.to_parquet}[path.suffix](str(path))
    return path


@pytest.mark.parametrize("suffix", [".csv", ".jsonl", ".parquet"])
def test_own_data_in_csv_jsonl_and_parquet_splits_by_fractions(suffix, tmp_path, tokenizer):
    from rigsa.tasks import build_task

    path = write(ROWS, tmp_path / f"reviews{suffix}")
    data = build_task(compose(OWN + [f"task.path={path}"]).task, tokenizer, 1024)
    assert (len(data.train), len(data.val), len(data.test)) == (24, 3, 3) and data.label_words == ["Bad", "Good"]
    for split in (data.train, data.val, data.test):
        for prompt, label in zip(split.prompts, split.classes):
            text = tokenizer.decode(prompt)
            number = int(text.split("product number ")[1].split("<")[0])
            assert label.item() == number % 2 and text.count("Is this review good or bad?") == 1


def test_own_data_with_a_split_column(tmp_path, tokenizer):
    from rigsa.tasks import build_task

    rows = [dict(row, part=["train", "validation", "test"][i % 3]) for i, row in enumerate(ROWS)]
    data = build_task(compose(OWN + [f"task.path={write(rows, tmp_path / 'r.jsonl')}", "task.splits.column=part"]).task,
                      tokenizer, 1024)
    assert (len(data.train), len(data.val), len(data.test)) == (10, 10, 10)


BAD_DATA = [
    (["task.labels=[neg,meh]"], "task.labels=['neg', 'meh'] is invalid: expected every label of the data, but its "
                                "train split has the labels ['pos']"),
    (["task.text_column=body"], "task.text_column='body' is invalid: expected a column of the data's 'train' split"),
    (["task.max_prompt_tokens=5"], "the train split of task=classification is empty (after dropping 24 training"),
    (["task.path=/no/such/file.csv"], "task.path='/no/such/file.csv' is invalid: expected an existing file"),
    (["task.path=/etc/hostname"], "expected a file datasets reads: .csv, .json, .jsonl, .parquet"),
    (["task.label_words=[Bad]"], "task.label_words=['Bad'] is invalid: expected a non-empty word for each"),
    (["task.label_words=[Bad,Badly]"], "start with the same token"),
    (["task.metric=mcc", "task.labels=[neg,pos,other]", "task.label_words=[Bad,Good,Other]"], "task.metric='mcc'"),
]


@pytest.mark.parametrize("overrides,message", BAD_DATA)
def test_bad_own_data_fails_before_the_model_loads_and_writes_nothing(overrides, message, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = write(ROWS, tmp_path / "reviews.jsonl")
    cfg = compose(TINY_TEXT + OWN + [f"task.path={path}", f"run.root={tmp_path / 'runs'}", *overrides])
    with pytest.raises(ConfigError) as error:
        run(cfg, tmp_path / "runs" / "run")
    assert message in str(error.value) and "Fix:" in str(error.value)
    assert not (tmp_path / "runs").exists()


def latin1_reviews(path: Path) -> Path:
    """A real-world csv: 30 rows, one of them (line 7) with a latin-1 byte (an e-acute) that is not utf-8."""
    lines = ["review,sentiment"] + [f"{row['review']},{row['sentiment']}" for row in ROWS]
    lines[6] = "caf\xe9 product number 5,pos"
    path.write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    return path


def test_an_absurdly_long_training_row_is_dropped_and_counted_without_being_tokenized(tmp_path, tokenizer, monkeypatch):
    from rigsa.tasks import build_task

    rows = [dict(row, part=["train", "test"][i % 2]) for i, row in enumerate(ROWS)]
    rows.append({"review": "x" * 2_000_000, "sentiment": "pos", "part": "train"})
    path = tmp_path / "huge.jsonl"
    path.write_text("\n".join(json.dumps(row) for row in rows))
    real = tc.render_prompts
    longest = []
    monkeypatch.setattr(tc, "render_prompts", lambda texts, *a: longest.append(max(map(len, texts), default=0)) or real(texts, *a))
    data = build_task(compose(OWN + [f"task.path={path}", "task.splits.column=part"]).task, tokenizer, 1024)
    assert data.dropped_train == 1 and len(data.train) == 15
    assert max(longest) < 1000  # the 2,000,000-character row never reached the tokenizer


def test_a_latin1_file_reads_with_its_encoding_named(tmp_path, tokenizer):
    from rigsa.tasks import build_task

    path = latin1_reviews(tmp_path / "latin1.csv")
    data = build_task(compose(OWN + [f"task.path={path}", "task.encoding=latin-1"]).task, tokenizer, 1024)
    prompts = [tokenizer.decode(prompt) for split in (data.train, data.val, data.test) for prompt in split.prompts]
    assert len(prompts) == 30 and sum("café product number 5" in prompt for prompt in prompts) == 1


def test_a_local_format_datasets_cannot_read_is_refused_for_data_files(tmp_path):
    from rigsa.validate import validate

    odd = tmp_path / "train.tsv"
    odd.write_text("a\tb\n")
    with pytest.raises(ConfigError, match=r"task.data_files.train=.*train.tsv.*expected a file datasets reads"):
        validate(compose(["task=glue_sst2", f"task.data_files={{train: {odd}}}"]))


def test_glue_without_the_hub_or_local_files_is_refused_naming_data_files(monkeypatch):
    from rigsa import assets
    from rigsa.validate import validate

    monkeypatch.setattr(assets, "hub_unreachable_reason", lambda timeout=5.0: "the hub is unreachable (test)")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(ConfigError, match=r"task.hub_id='nyu-mll/glue'.*Fix: pass task.data_files="):
        validate(compose(["task=glue_sst2"]))


def test_bad_data_through_rigsa_run_exits_2_with_one_line_and_leaves_no_folder(tmp_path, monkeypatch, capsys):
    import sys

    from rigsa import cli

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    path = write(ROWS, tmp_path / "reviews.csv")
    monkeypatch.setattr(sys, "argv", ["rigsa-run", *TINY_TEXT, *OWN, f"task.path={path}", "task.labels=[neg,meh]",
                                      f"run.root={tmp_path / 'runs'}"])
    with pytest.raises(SystemExit) as exit_:
        cli.run_main()
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("rigsa-run: error: ")]
    assert exit_.value.code == 2 and len(lines) == 1 and "task.labels=['neg', 'meh'] is invalid" in lines[0]
    assert not (tmp_path / "runs").exists() or not any((tmp_path / "runs").iterdir())  # Hydra's folder removed


def test_max_test_size_takes_a_seeded_sample_of_the_test_set_in_its_order(tokenizer):
    from rigsa.tasks import build_task

    overrides = ["task=imdb", f"task.hub_id={HUB / 'imdb'}", "task.splits.dev_size=4"]
    whole = build_task(compose(overrides).task, tokenizer, 1024)
    capped = build_task(compose([*overrides, "task.max_test_size=5"]).task, tokenizer, 1024)
    again = build_task(compose([*overrides, "task.max_test_size=5"]).task, tokenizer, 1024)
    assert len(whole.test) == 16 and len(capped.test) == 5
    whole_prompts = [tuple(prompt.tolist()) for prompt in whole.test.prompts]
    picked = [whole_prompts.index(tuple(prompt.tolist())) for prompt in capped.test.prompts]
    assert picked == sorted(picked) and len(set(picked)) == 5  # a sample, kept in the test set's order
    assert capped.test_key == again.test_key != whole.test_key  # seeded; the base-score cache tells them apart
    assert len(capped.train) == len(whole.train)  # the training rows are untouched
    with pytest.raises(ConfigError, match=r"task.max_test_size=-1 is invalid.*Fix: pass task.max_test_size=1000"):
        from rigsa.validate import validate

        validate(compose([*TINY_TEXT, *overrides, "task.max_test_size=-1"]))


def test_a_local_model_is_named_after_its_folder():
    assert compose(["model=local", "model.path=/models/my-llm/"]).model.name == "my-llm"
    assert compose(["model=local", "model.path=/models/my-llm"]).run.name.startswith("my-llm-rigsa-")
    assert compose(["model=local"]).model.name == "local"  # no path yet: refused by validate, named as before
