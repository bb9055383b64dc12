"""The catalogue of bad inputs (#14): each through the real `rigsa-run` entry point, in this process.

For every one: exit code 2, one error line naming the value, no model loaded where the value can be checked
without one, no run folder written, and an earlier finished run's files byte-identical (mtimes too)."""
from __future__ import annotations

import json
import sys

import pytest

from rigsa import assets, cli, models
from rigsa.config import compose
from rigsa.run import run

from test_reliability import files_of

BASE = ["model=tiny", "pruning=none", "eval=none", "logger=none", "task.image_size=7", "task.train_size=64",
        "task.val_size=0", "task.test_size=40", "train.max_steps=2", "dtype=float32"]
SPARSE = ["method=sparta", "method.selection=magnitude", "method.budget.density=null"]
# a researcher's own data (the files are made by the `world` fixture)
OWN = ["method=lora", "task=classification", "task.text_column=review", "task.label_column=sentiment",
       "task.labels=[neg,pos]", "task.label_words=[Bad,Good]"]

# (overrides, the error line must contain this, the model may load first)
CATALOGUE = [
    (["method=lora", "train.lrr=1e-3"], "train.lrr is not a setting. Fix: did you mean train.lr? The valid keys of "
                                        "train are: batch_size, checkpoint_every,", False),
    (["method=lora", "+train.lrr=1e-3"], "train.lrr is not a setting. Fix: did you mean train.lr?", False),
    (["method=lora", "method.rr=3"], "method.rr is not a setting. Fix: did you mean method.r? The valid keys of "
                                     "method are: alpha, dropout, name,", False),
    (["method=lora", "+colour=red"], "colour is not a setting. Fix: The valid keys of the run config are:", False),
    (["method=lora", "train.lr=-1"], "train.lr=-1.0 is invalid: expected a number > 0", False),
    (["method=lora", "train.lr=0"], "train.lr=0.0 is invalid: expected a number > 0", False),
    (["method=lora", "train.batch_size=0"], "train.batch_size=0 is invalid", False),
    (["method=lora", "train.grad_accum=0"], "train.grad_accum=0 is invalid", False),
    (["method=lora", "train.warmup_steps=-1"], "train.warmup_steps=-1 is invalid: expected a number >= 0", False),
    (["method=lora", "train.max_steps=0", "train.epochs=0"], "train.epochs=0 is invalid", False),
    (["method=lora", "train.lr_schedule=step"], "train.lr_schedule='step' is invalid", False),
    (["method=lora", "train.on_nonfinite=ignore"], "train.on_nonfinite='ignore' is invalid: expected stop or skip_step",
     False),
    (["method=lora", "dtype=float8"], "dtype='float8' is invalid", False),
    (["method=lora", "device=cuda"], "device='cuda' is invalid: expected a CUDA device this machine has (0 visible)",
     False),
    (["method=lora", "device=cuda:7"], "device='cuda:7' is invalid", False),
    (["method=lora", "device=tpu"], "device='tpu' is invalid: expected auto, cpu, cuda, cuda:N or mps", False),
    (["method=lora", "run.name=../../x"], "run.name='../../x' is invalid: expected a folder name inside run.root",
     False),
    (["method=lora", "run.name=a/b"], "run.name='a/b' is invalid", False),
    (["method=lora", "model=local"], "model.path=None is invalid: expected an existing local Hugging Face", False),
    (["method=lora", "model=local", "model.path=/no/such/dir"], "model.path='/no/such/dir' is invalid", False),
    (["method=lora", "model=local", "model.path={empty}"], "is invalid: expected a folder with a readable config.json",
     False),
    (["method=lora", "model=local", "model.path={encoder}"], "is invalid: expected a causal language model (its "
                                                             "config.json names ['BertModel'])", False),
    (["method=lora", "model=smollm2_1.7b"], "model.hub_id='HuggingFaceTB/SmolLM2-1.7B-Instruct' is invalid: expected "
                                           "a model this machine can load", False),
    (["method=lora", "pruning=imp"], "pruning='imp' is invalid: expected a method that prunes (method=rigsa)", False),
    (["method=lora", "method.dropout=1.5"], "method.dropout=1.5 is invalid", False),
    (["method=lora", "method.r=0"], "method.r=0 is invalid: expected a rank >= 1", False),
    (["method=qlora", "model.quantize=int3"], "model.quantize='int3' is invalid: expected null or one of ['nf4', 'fp4']",
     False),
    (["method=sparta", "method.budget.params=1000"], "method.budget=['density', 'params'] is invalid", False),
    (["method=sparta", "method.budget.density=2"], "method.budget.density=2.0 is invalid", False),
    ([*SPARSE, "method.budget.from_run={lora_run}"], "is invalid: expected a sparse run (that run's method 'lora' "
                                                     "trained no sparse values)", False),
    ([*SPARSE, "method.budget.from_run=/no/run"], "method.budget.from_run='/no/run' is invalid", False),
    (["method=gallop", "method.selection=best"], "method.selection='best' is invalid", False),
    (["method=rigsa", "pruning=imp", "pruning.keep_fraction=1.5"], "pruning.keep_fraction=1.5 is invalid", False),
    (["method=rigsa", "pruning=imp", "pruning.pruned_value=half"], "pruning.pruned_value='half' is invalid", False),
    (["method=lora", "logger=wandb", "logger.mode=loud"], "logger.mode='loud' is invalid", False),
    (["method=lora", "eval.batch_size=0"], "eval.batch_size=0 is invalid", False),
    (["method=lora", "task.test_size=1001"], "task.test_size=1001 is invalid", False),
    (["method=lora", "task.readout=logits"], "task.readout='logits' is invalid: expected one of ['answer_token', "
                                             "'classifier_head']", False),
    (["method=lora", "task.head_init=zeros"], "task.head_init='zeros' is invalid", False),
    (["method=lora", "eval=paper"], "whose data come from the Hugging Face hub, but test: offline", False),
    (["method=lora", "run.name=finished", "train.lr=2e-3"], "holds a run with a different config (train.lr: 0.001 -> "
                                                            "0.002)", False),
    # issue #25's options and #26's seeds
    (["method=lora", "train.early_stopping=-1"], "train.early_stopping=-1 is invalid: expected a number >= 0", False),
    (["method=lora", "train.early_stopping=2"], "train.eval_every=0 is invalid: expected > 0 with "
                                                "train.early_stopping=2", False),
    (["method=rigsa", "pruning=imp", "train.early_stopping=2", "train.eval_every=5"],
     "train.early_stopping=2 is invalid: expected 0 with pruning=imp", False),
    (["method=lora", "train.early_stopping=2", "train.eval_every=5"], "train.early_stopping=2 is invalid: expected a "
                                                                     "task with a validation split", False),
    (["method=lora", "eval.split=validation"], "eval.split='validation' is invalid: expected a task with a validation "
                                               "split", False),
    (["method=lora", "eval.split=train"], "eval.split='train' is invalid: expected test or validation", False),
    (["method=lora", "optuna_trial=3"], "optuna_trial=3 is invalid: expected null, or a trial of the study in", False),
    (["method=lora", "optuna_trial=-1"], "optuna_trial=-1 is invalid", False),
    (["method=lora", "seed=-1"], "seed=-1 is invalid: expected an integer in [0, 2**32)", False),
    (["method=lora", "seed=99999999999999"], "seed=99999999999999 is invalid: expected an integer in [0, 2**32)",
     False),
    (["method=lora", "task.val_size=-5"], "task.val_size=-5 is invalid", False),
    (["method=lora", "train.eval_every=-1"], "train.eval_every=-1 is invalid: expected a number >= 0", False),
    (["--multirun", "hparams_search=lora_lr", "eval=target"], "objective.forgetting_weight=1.0 is invalid: expected 0 "
                                                              "with eval=target", False),
    ([*OWN, "task.path={data}/empty.csv"], "task.path='{data}/empty.csv' is invalid: expected a file with rows (this "
                                            "one is empty)", False),
    ([*OWN, "task.path={data}/header.csv"], "expected a file with rows (this one has a header and no rows)", False),
    ([*OWN, "task.path={data}/empty.jsonl"], "expected a file with rows (this one is empty)", False),
    ([*OWN, "task.path={data}/blank.jsonl"], "expected a file with rows (this one has no rows)", False),
    ([*OWN, "task.path={data}/nulls.jsonl"], "task.text_column='review' has an empty (null) cell in row 1 of the "
                                             "data's 'train' split", False),
    ([*OWN, "task.path={data}/nolabel.jsonl"], "task.label_column='sentiment' has an empty (null) cell in row", False),
    ([*OWN, "task.path={data}/latin1.csv"], "expected text in task.encoding=utf-8 (line 7 has the byte 0xe9, which "
                                            "utf-8 cannot decode). Fix: pass task.encoding=<the file's encoding", False),
    ([*OWN, "task.path={data}/latin1.csv", "task.encoding=klingon"], "task.encoding='klingon' is invalid: expected "
                                                                     "an encoding Python knows", False),
    ([*OWN, "task.path={data}/huge.jsonl", "task.splits.column=part"], "row 15 of the test split is 2,000,0", False),
    ([*OWN, "task.path={data}/reviews.jsonl", "task.splits.column=part", "task.splits.dev=null"],
     "task.splits.column='part' is invalid: expected a column of the data", False),
    (["method=sparta", "method.budget.density=0"], "method.budget.density=0 is invalid: expected > 0", False),
    (["method=sparta", "method.budget.density=null", "method.budget.params=0"], "method.budget.params=0 is invalid",
     False),
    (["method=lora", "eval=offline", "eval.forgetting=[{{task:rigsa_gsm8k_bpbb}}]"],
     "eval.forgetting[0].task='rigsa_gsm8k_bpbb' is invalid: expected a task rigsa ships, one in eval.include_path, "
     "or an lm-eval built-in. Fix: did you mean rigsa_gsm8k_bpb?", False),
    (["method=lora", "eval=offline", "eval.include_path=[{broken_tasks}]"],
     "broken.yaml is not valid YAML (", False),
    ([*SPARSE, "method.budget.params=1000000000"], "method.budget.params=1000000000 is invalid: expected a budget "
                                                   "that fits the 12,288 target weights", True),
    (["method=lora", "method.target_modules=[nope]"], "method.target_modules=['nope'] is invalid: expected names of "
                                                      "this model's linear layers", True),
]


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A run root holding a finished run ('finished') and a LoRA run for from_run; a non-model folder and an
    encoder's folder for model.path."""
    root = tmp_path_factory.mktemp("runs")
    for name in ("finished", "lora_run"):
        run(compose([*BASE, "method=lora", f"run.root={root}", f"run.name={name}"]), root / name)
    (root / "empty").mkdir()
    (root / "encoder").mkdir()
    (root / "encoder" / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    (root / "encoder" / "model.safetensors").write_bytes(b"")
    data = root / "data"
    data.mkdir()
    rows = [{"review": f"{'great' if i % 2 else 'awful'} product {i}", "sentiment": "pos" if i % 2 else "neg"}
            for i in range(30)]
    (data / "reviews.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows))
    (data / "empty.csv").write_bytes(b"")
    (data / "header.csv").write_text("review,sentiment\n")
    (data / "empty.jsonl").write_bytes(b"")
    (data / "blank.jsonl").write_text("\n\n  \n")
    (data / "nulls.jsonl").write_text('{"review": "good", "sentiment": "pos"}\n{"review": null, "sentiment": "neg"}\n'
                                      * 15)
    (data / "nolabel.jsonl").write_text('{"review": "good", "sentiment": null}\n' * 20)
    lines = ["review,sentiment"] + [f"{row['review']},{row['sentiment']}" for row in rows]
    lines[6] = "caf\xe9 product 5,pos"  # a latin-1 byte, not utf-8, on line 7
    (data / "latin1.csv").write_bytes("\n".join(lines).encode("latin-1") + b"\n")
    (data / "huge.jsonl").write_text("".join(json.dumps(dict(row, part=["train", "test"][i % 2])) + "\n"
                                             for i, row in enumerate(rows))
                                     + json.dumps({"review": "x" * 2_000_000, "sentiment": "pos", "part": "test"}))
    (root / "broken_tasks").mkdir()
    (root / "broken_tasks" / "broken.yaml").write_text("task: broken\n  dataset_path: [\n")
    return root


def rigsa_run(arguments, monkeypatch, capsys) -> tuple[int, str]:
    monkeypatch.setattr(sys, "argv", ["rigsa-run", *arguments])
    with pytest.raises(SystemExit) as exit_:
        cli.run_main()
    return exit_.value.code, capsys.readouterr().err


@pytest.mark.parametrize("overrides,message,loads_model", CATALOGUE, ids=[" ".join(case[0][-2:]) for case in CATALOGUE])
def test_a_bad_input_is_refused_naming_the_value_and_writes_nothing(overrides, message, loads_model, world,
                                                                   monkeypatch, capsys):
    assert len(CATALOGUE) >= 70
    finished_before, root_before = files_of(world / "finished"), sorted(path.name for path in world.iterdir())
    loaded = []
    real_load = models.load_model
    monkeypatch.setattr(models, "load_model", lambda *args, **kwargs: loaded.append(1) or real_load(*args, **kwargs))
    monkeypatch.setattr(assets, "hub_unreachable_reason", lambda timeout=5.0: "test: offline")
    paths = {"empty": world / "empty", "encoder": world / "encoder", "lora_run": world / "lora_run",
             "broken_tasks": world / "broken_tasks", "data": world / "data"}
    base = [item for item in BASE if not item.startswith("task.")] if "task=classification" in overrides else BASE
    arguments = [*base, f"run.root={world}", "run.name=new", *(item.format(**paths) for item in overrides)]
    code, error = rigsa_run(arguments, monkeypatch, capsys)
    lines = [line for line in error.splitlines() if line.startswith("rigsa-run: error: ")]
    assert code == 2 and len(lines) == 1, error
    assert message.format(**paths) in lines[0]
    assert bool(loaded) == loads_model
    assert files_of(world / "finished") == finished_before
    assert sorted(path.name for path in world.iterdir()) == root_before  # no run folder was written


def test_the_same_entry_point_runs_a_good_command(world, monkeypatch, capsys):
    """The catalogue's commands differ from a working one only in the bad value."""
    monkeypatch.setattr(sys, "argv", ["rigsa-run", *BASE, "method=lora", f"run.root={world}", "run.name=good"])
    cli.run_main()
    assert json.loads((world / "good" / "results.json").read_text())["train"]["steps"] == 2
