"""Forgetting through lm-eval: packaged GSM8K, paper-shaped fixtures, the base cache, the arithmetic."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from rigsa import forgetting, models
from rigsa.config import compose
from rigsa.forgetting import HubUnreachable, forget_row, forgetting_block
from rigsa.run import run

from conftest import TINY

FIXTURES = Path(__file__).parent / "fixtures"
CPU = torch.device("cpu")
SMALL_OFFLINE = ["eval=offline", "eval.forgetting.0.limit=4", "eval.forgetting.1.limit=3", "eval.forgetting.2.limit=2"]


def tiny():
    cfg = compose(TINY)
    return load(cfg)


def load(cfg):
    model, tokenizer = models.load_model(cfg.model, 0)
    return model, tokenizer


def test_forget_ratio_and_collapse_arithmetic():
    assert forget_row(0.5, 0.4, True) == pytest.approx(
        {"base": 0.5, "adapted": 0.4, "forgetting": 0.1, "forget_ratio": 0.2, "higher_is_better": True, "collapsed": False})
    assert forget_row(0.5, 0.6, True)["forget_ratio"] == 0.0 and forget_row(0.5, 0.6, True)["forgetting"] == pytest.approx(-0.1)
    assert forget_row(0.30, 0.0, True)["collapsed"] and forget_row(0.30, 0.0, True)["forget_ratio"] == 1.0
    assert not forget_row(0.005, 0.0, True)["collapsed"]  # the base was already ~0: nothing to collapse
    bpb = forget_row(1.0, 1.25, False)  # bits per byte went up: worse
    assert bpb["forgetting"] == pytest.approx(0.25) and bpb["forget_ratio"] == pytest.approx(0.25)
    assert not bpb["collapsed"] and forget_row(1.0, 0.8, False)["forget_ratio"] == 0.0
    base = {"a": {"metrics": {"acc": 0.6, "word_perplexity": 100.0}, "higher_is_better": {"acc": True, "word_perplexity": False}},
            "b": {"metrics": {"bits_per_byte": 1.0}, "higher_is_better": {"bits_per_byte": False}}}
    adapted = {"a": {"metrics": {"acc": 0.0, "word_perplexity": 900.0}}, "b": {"metrics": {"bits_per_byte": 1.1}}}
    block = forgetting_block(base, adapted)
    assert block["mean_forgetting"] == pytest.approx((0.6 + 0.1) / 2)  # perplexity left out of the averages
    assert block["mean_forget_ratio"] == pytest.approx((1.0 + 0.1) / 2)
    assert block["collapsed"] == 1 and block["tasks"]["a"]["word_perplexity"]["forgetting"] == 800.0


@pytest.mark.slow  # several rigsa-run processes or an lm-eval run (10-25 s): make test-slow
def test_packaged_gsm8k_and_prose_tasks_run_offline_on_tiny(tmp_path, monkeypatch, capfd, caplog):
    model, tokenizer = tiny()
    cfg = compose(TINY + SMALL_OFFLINE)
    monkeypatch.chdir(tmp_path)  # outside any git repository, as a user's working folder may be
    scores = forgetting.evaluate_suite(model, tokenizer, cfg.eval, CPU, "float32", 0)
    printed = capfd.readouterr().err + caplog.text
    for noise in ("not a git repository", "is defined, but aggregation is not", "is not of type `str`"):
        assert noise not in printed  # warnings a user can do nothing about are silenced
    assert set(scores) == {"rigsa_gsm8k_bpb", "rigsa_prose_bpb", "rigsa_gsm8k"}
    prose = scores["rigsa_prose_bpb"]
    assert prose["n"] == 3 and prose["metrics"]["bits_per_byte"] > 1.0  # a random model is far from the floor
    bpb = scores["rigsa_gsm8k_bpb"]
    assert {"bits_per_byte", "byte_perplexity", "word_perplexity"} <= set(bpb["metrics"]) and bpb["n"] == 4
    assert bpb["metrics"]["bits_per_byte"] > 1.0 and bpb["higher_is_better"]["bits_per_byte"] is False
    gsm = scores["rigsa_gsm8k"]
    assert {"exact_match,strict-match", "exact_match,flexible-extract"} == set(gsm["metrics"]) and gsm["n"] == 2
    assert gsm["metrics"]["exact_match,strict-match"] == 0.0  # a random model solves nothing


def test_the_prose_documents_are_the_novel_in_order_without_the_licence_or_the_typo_list():
    from rigsa import assets

    text = assets.locate("prose").read_text(encoding="utf-8")
    documents = forgetting.prose_documents(text)
    assert documents[0].startswith("BOTCHAN (MASTER DARLING)\nBy The Late Mr. Kin-nosuke Natsume")
    assert documents[-1].endswith("So Kiyo's grave is in the Yogen temple at Kobinata.\n--(THE END)--")
    joined = "\n".join(documents)
    text = text.replace("\r\n", "\n")  # the file has Windows line ends; documents are cut at lines
    novel = text[text.index("Team\nBOTCHAN (MASTER DARLING)") + 5:text.index("--(THE END)--") + len("--(THE END)--")]
    assert joined == novel  # every line of the novel, once, in order, nothing else
    assert "Gutenberg" not in joined and "[A: Insitent]" not in joined
    assert len(documents) == 126 and all(len(document) <= forgetting.PROSE_DOCUMENT_CHARS + 80 for document in documents)


def test_fewshot_pool_is_never_evaluated(tmp_path):
    cfg = compose(TINY + SMALL_OFFLINE)
    folder = forgetting.task_folder(cfg.eval)
    data = folder.parent.parent / "lm_eval_data"
    pool = (data / "gsm8k_fewshot.jsonl").read_text().splitlines()
    evaluated = (data / "gsm8k_eval.jsonl").read_text().splitlines()
    assert len(pool) == 50 and len(evaluated) == 1319 - 50 and not set(pool) & set(evaluated)


@pytest.mark.slow  # a multi-process or lm-eval end-to-end run (15-40 s): make test-slow
def test_paper_shaped_fixtures_run_through_the_builtin_tasks():
    model, tokenizer = tiny()
    # exactly what a user types to point the paper suite at local files of the same shape
    # (both tasks declare a train split for few-shot exemplars; at 0-shot it is loaded, never used)
    piqa, hellaswag = FIXTURES / "piqa.jsonl", FIXTURES / "hellaswag.jsonl"
    cfg = compose(TINY + ["eval=paper", f"eval.forgetting=[{{task:piqa,data_files:{{validation:'{piqa}',train:'{piqa}'}}}},"
                          f"{{task:hellaswag,data_files:{{validation:'{hellaswag}',train:'{hellaswag}'}}}}]"])
    assert forgetting.needs_hub(cfg.eval) == []
    scores = forgetting.evaluate_suite(model, tokenizer, cfg.eval, CPU, "float32", 0)
    for task, rows in (("piqa_local", 5), ("hellaswag_local", 4)):
        metrics = scores[task]["metrics"]
        assert set(metrics) == {"acc", "acc_norm"} and scores[task]["n"] == rows
        assert all(value * rows == pytest.approx(round(value * rows)) for value in metrics.values())  # k of n right
    text = (forgetting.task_folder(cfg.eval) / "hellaswag_local.yaml").read_text()
    assert "lm_eval/tasks/hellaswag/hellaswag.yaml" in text  # the built-in task's own config and process_docs


@pytest.mark.slow  # an lm-eval or multi-process end-to-end run (30-50 s): make test-slow
def test_second_run_hits_the_base_cache(tiny_cfg, tmp_path, monkeypatch, capsys, private_cache):
    calls = []
    real = forgetting.evaluate_suite
    monkeypatch.setattr(forgetting, "evaluate_suite", lambda *a, **k: calls.append(1) or real(*a, **k))
    first = run(tiny_cfg(*SMALL_OFFLINE, "run.name=a"), tmp_path / "a")
    assert len(calls) == 2 and "(cached)" not in capsys.readouterr().out
    second = run(tiny_cfg(*SMALL_OFFLINE, "run.name=b", "seed=0", "method=head"), tmp_path / "b")
    assert len(calls) == 3 and "(cached)" in capsys.readouterr().out  # only the adapted model was evaluated
    for results in (first, second):
        block = results["forgetting"]
        assert set(block["tasks"]) == {"rigsa_gsm8k_bpb", "rigsa_prose_bpb", "rigsa_gsm8k"}
        row = block["tasks"]["rigsa_gsm8k_bpb"]["bits_per_byte"]
        assert row["forgetting"] == pytest.approx(row["adapted"] - row["base"])
    assert first["forgetting"]["tasks"]["rigsa_gsm8k_bpb"]["bits_per_byte"]["base"] == \
        second["forgetting"]["tasks"]["rigsa_gsm8k_bpb"]["bits_per_byte"]["base"]


@pytest.mark.slow  # an lm-eval or multi-process end-to-end run (30-50 s): make test-slow
def test_merged_sparse_adapter_scores_like_the_unmerged_model(tiny_cfg, tmp_path):
    from rigsa.apply import apply_adapter
    from rigsa.sparse.engine import sparse_layers

    run(tiny_cfg("method=sparta", "method.budget.density=0.05", "train.lr=1e-2", "eval=none"), tmp_path / "run")
    cfg = compose(TINY + SMALL_OFFLINE)
    unmerged, tokenizer = tiny()
    unmerged = apply_adapter(unmerged, tmp_path / "run" / "adapter", merge=False)
    assert sparse_layers(unmerged)
    merged, _ = tiny()
    merged = apply_adapter(merged, tmp_path / "run" / "adapter", merge=True)
    a = forgetting.evaluate_suite(unmerged, tokenizer, cfg.eval, CPU, "float32", 0)
    b = forgetting.evaluate_suite(merged, tokenizer, cfg.eval, CPU, "float32", 0)
    for task in a:
        for metric, value in a[task]["metrics"].items():
            assert b[task]["metrics"][metric] == pytest.approx(value, rel=1e-5), (task, metric)


def test_paper_suite_without_the_hub_fails_before_any_model_loads(tiny_cfg, tmp_path, monkeypatch):
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("loaded a model"))
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # nothing listens there: unreachable at once
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    with pytest.raises(HubUnreachable) as error:
        run(tiny_cfg("eval=paper"), tmp_path / "run")
    message = str(error.value)
    assert "eval=paper runs lm-eval's ['piqa', 'hellaswag', 'gsm8k']" in message and "Use eval=offline" in message
    assert not (tmp_path / "run").exists()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(HubUnreachable, match="HF_HUB_OFFLINE"):
        run(tiny_cfg("eval=paper"), tmp_path / "run")


# ---------------------------------------------------------------- a researcher's own forgetting tasks
QUIZ = [{"question": "Which is a fruit?", "choices": ["apple", "brick"], "answer": 0},
        {"question": "Which is hot?", "choices": ["ice", "fire"], "answer": 1},
        {"question": "Which can fly?", "choices": ["bird", "stone"], "answer": 0}]


def quiz_task(folder: Path, dataset_path: str = "json") -> Path:
    """An lm-eval task YAML of one's own (multiple choice over a local JSONL file), as a researcher writes it."""
    import json

    data = folder / "quiz.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in QUIZ))
    yaml_path = folder / "my_quiz.yaml"
    yaml_path.write_text(f"""task: my_quiz
dataset_path: {dataset_path}
dataset_kwargs:
  data_files:
    test: {data}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: answer
doc_to_choice: "{{{{choices}}}}"
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
""")
    return yaml_path


@pytest.mark.slow  # an lm-eval or multi-process end-to-end run (30-50 s): make test-slow
def test_an_own_task_yaml_runs_as_the_forgetting_suite_through_include_path(tiny_cfg, tmp_path, monkeypatch,
                                                                              private_cache):
    from rigsa import assets

    monkeypatch.setattr(assets, "hub_unreachable_reason", lambda timeout=5.0: "the hub is unreachable (test)")
    folder = tmp_path / "my_tasks"
    folder.mkdir()
    quiz_task(folder)
    cfg = tiny_cfg(f"eval.include_path=[{folder}]", "eval.forgetting=[{task: my_quiz}]")
    assert forgetting.needs_hub(cfg.eval) == []  # a local task: the unreachable hub is not asked for
    results = run(cfg, tmp_path / "run")
    row = results["forgetting"]["tasks"]["my_quiz"]["acc"]
    assert row["base"] * 3 == pytest.approx(round(row["base"] * 3)) and row["higher_is_better"] is True
    by_path = compose(TINY + [f"eval.forgetting=[{{task: '{folder / 'my_quiz.yaml'}'}}]", "eval.limit=2"])
    model, tokenizer = tiny()
    scores = forgetting.evaluate_suite(model, tokenizer, by_path.eval, CPU, "float32", 0)
    assert set(scores) == {"my_quiz"} and scores["my_quiz"]["n"] == 2  # named by its path; eval.limit for all


def test_an_own_task_on_the_hub_still_needs_it_and_bad_paths_are_refused(tmp_path):
    from rigsa.vocabulary import ConfigError
    from rigsa.validate import validate

    quiz_task(tmp_path, dataset_path="someone/quiz_on_the_hub")
    cfg = compose(TINY + [f"eval.include_path=[{tmp_path}]", "eval.forgetting=[{task: my_quiz}, {task: piqa}]"])
    assert forgetting.needs_hub(cfg.eval) == ["my_quiz", "piqa"]
    for override, message in ((["eval.include_path=[/no/such/folder]"], "eval.include_path='/no/such/folder'"),
                               (["eval.forgetting=[{task: /no/such/task.yaml}]"], "an lm-eval task YAML"),
                               (["eval.limit=0"], "eval.limit=0")):
        with pytest.raises(ConfigError, match=message.replace("[", r"\[")):
            validate(compose(TINY + override))


@pytest.mark.slow  # an lm-eval or multi-process end-to-end run (30-50 s): make test-slow
def test_builtin_tasks_read_local_csv_and_parquet_and_refuse_other_formats(tmp_path):
    import datasets

    from rigsa.vocabulary import ConfigError
    from rigsa.validate import validate

    rows = datasets.load_dataset("json", data_files=str(FIXTURES / "piqa.jsonl"))["train"]
    rows.to_csv(str(tmp_path / "piqa.csv"), index=False)
    rows.to_parquet(str(tmp_path / "piqa.parquet"))
    model, tokenizer = tiny()
    metrics = {}
    for path in (FIXTURES / "piqa.jsonl", tmp_path / "piqa.csv", tmp_path / "piqa.parquet"):
        cfg = compose(TINY + [f"eval.forgetting=[{{task:piqa,data_files:{{validation:'{path}',train:'{path}'}}}}]"])
        validate(cfg)
        scores = forgetting.evaluate_suite(model, tokenizer, cfg.eval, CPU, "float32", 0)["piqa_local"]
        assert scores["n"] == 5
        metrics[path.suffix] = scores["metrics"]
    assert metrics[".csv"] == pytest.approx(metrics[".jsonl"]) and metrics[".parquet"] == pytest.approx(metrics[".jsonl"])
    (tmp_path / "piqa.txt").write_text("goal\n")
    with pytest.raises(ConfigError, match=r"data_files.validation=.*piqa.txt.*expected a format datasets reads: "
                                          r".csv, .json, .jsonl, .parquet"):
        validate(compose(TINY + [f"eval.forgetting=[{{task:piqa,data_files:{{validation:'{tmp_path / 'piqa.txt'}'}}}}]"]))


@pytest.mark.parametrize("edited", ["helper module", "yaml data file", "suite data file", "task yaml"])
def test_the_base_cache_key_changes_with_the_contents_of_every_input_file(tmp_path, monkeypatch, edited):
    """An edit in place (same path, same config) to any file the suite reads gives another base-cache key."""
    tasks, data = tmp_path / "tasks", tmp_path / "data"
    tasks.mkdir(), data.mkdir()
    (data / "quiz.jsonl").write_text('{"q": "1+1", "a": "2"}\n')
    (data / "piqa.jsonl").write_text((FIXTURES / "piqa.jsonl").read_text())
    (tasks / "utils.py").write_text("def process(docs):\n    return docs\n")
    (tasks / "quiz.yaml").write_text(f"task: quiz\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
                                     f"    test: {data / 'quiz.jsonl'}\nprocess_docs: !function utils.process\n")
    cfg = compose(TINY + ["eval=offline", f"eval.include_path=[{tasks}]",
                          f"eval.forgetting=[{{task: quiz}}, {{task: piqa, data_files: {{validation: '{data / 'piqa.jsonl'}'}}}}]"])
    keys = []
    monkeypatch.setattr(forgetting, "cached", lambda kind, key, compute, check: (keys.append(key) or ({}, True)))

    def key_now():
        forgetting.base_scores(None, None, cfg.eval, CPU, "float32", 0, "fingerprint")
        return keys[-1]

    before = key_now()
    assert key_now() == before  # nothing changed: the same key
    path = {"helper module": tasks / "utils.py", "yaml data file": data / "quiz.jsonl",
            "suite data file": data / "piqa.jsonl", "task yaml": tasks / "quiz.yaml"}[edited]
    path.write_text(path.read_text() + "\n")
    after = key_now()
    assert after != before and after["inputs"][str(path.resolve())] != before["inputs"][str(path.resolve())]
