"""A run never lies and never loses work (#14): one test per defect found by trying the tool as a user would.

Each test names its item of the issue; each failed on the code before #14 (the closing note says how)."""
from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from rigsa import cache, checkpoints, models, run_folder, tracking
from rigsa.cache import UnreadableFile
from rigsa.readout import AnswerToken
from rigsa.run import run
from rigsa.train import TrainingDiverged
from rigsa.vocabulary import ConfigError

from conftest import killed_at_step
from test_train import metrics_without_timings


def files_of(folder):
    """Every file under `folder`: relative path -> (bytes, mtime)."""
    return {str(path.relative_to(folder)): (path.read_bytes(), path.stat().st_mtime_ns)
            for path in sorted(folder.rglob("*")) if path.is_file()}


def nan_loss_at(monkeypatch, bad_calls: set[int]):
    """Make the training loss NaN on these calls (1-based) of the readout's loss in the training loop."""
    calls = []

    real = AnswerToken.loss

    def loss(self, model, batch):
        calls.append(1)
        value = real(self, model, batch)
        return value * float("nan") if len(calls) in bad_calls else value

    monkeypatch.setattr(AnswerToken, "loss", loss)


# ------------------------------------------------------------------------------------------ 1. divergence
def test_1_a_diverged_run_fails_naming_the_step_and_saves_no_adapter_or_results(tiny_cfg, tmp_path):
    cfg = tiny_cfg("eval=none", "method=rigsa", "train.max_steps=20", "method.init_scale=1e30", "method.gate_init=1.0")
    with pytest.raises(TrainingDiverged, match=r"diverged at step 1: loss nan.*Try a lower train.lr \(now 0.001\), "
                                               r"dtype=float32, or train.on_nonfinite=skip_step"):
        run(cfg, tmp_path / "run")
    assert not (tmp_path / "run").exists()  # nothing was trained: the folder is as it was (absent)


def test_1_divergence_keeps_the_last_good_checkpoint_and_skip_step_drops_the_update(tiny_cfg, tmp_path, monkeypatch):
    nan_loss_at(monkeypatch, {3})
    overrides = ("eval=none", "train.max_steps=4", "train.checkpoint_every=1")
    with pytest.raises(TrainingDiverged, match=r"step 3: loss nan, gradient norm nan \(last finite loss \d+\.\d{4}\)"):
        run(tiny_cfg(*overrides), tmp_path / "stop")
    saved = checkpoints._read(tmp_path / "stop" / "checkpoint" / "train.pt")
    assert saved["step"] == 2 and not (tmp_path / "stop" / "results.json").exists()
    assert not (tmp_path / "stop" / "adapter").exists()

    nan_loss_at(monkeypatch, {3})
    saved, real_save = {}, checkpoints.save
    monkeypatch.setattr(checkpoints, "save", lambda path, step, named, *rest: saved.update(
        {step: {name: p.detach().clone() for name, p in named.items()}}) or real_save(path, step, named, *rest))
    results = run(tiny_cfg(*overrides, "train.on_nonfinite=skip_step", "run.name=skip"), tmp_path / "skip")
    assert results["train"]["skipped_steps"] == 1 and math.isfinite(results["train"]["final_loss"])
    lines = [json.loads(line) for line in (tmp_path / "skip" / "metrics.jsonl").read_text().splitlines()]
    assert [line.get("train/skipped_steps") for line in lines] == [None, None, 1, 1]
    assert lines[2]["train/loss"] is None  # NaN is logged as null
    assert all(torch.equal(saved[2][name], saved[3][name]) for name in saved[2])  # step 3's update was dropped
    assert not all(torch.equal(saved[3][name], saved[4][name]) for name in saved[3])  # step 4's was not
    adapter = load_file(str(tmp_path / "skip" / "adapter" / "adapter_model.safetensors"))
    assert all(torch.isfinite(tensor).all() for tensor in adapter.values())


def test_1_a_gradient_of_exactly_zero_for_ten_steps_warns(tiny_cfg, tmp_path):
    with pytest.warns(UserWarning, match=r"gradient norm has been exactly 0 for 10 steps .*Try a lower train.lr "
                                         r"\(now 1000\)"):
        run(tiny_cfg("eval=none", "train.lr=1e3", "train.max_steps=14"), tmp_path / "run")


# ------------------------------------------------------------------------------------- 2. one run per folder
def test_2_a_second_run_on_a_locked_folder_stops_naming_the_pid_and_a_killed_holder_leaves_no_lock(tiny_cfg, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys, time\n"
         f"fd = os.open({str(folder / '.lock')!r}, os.O_RDWR | os.O_CREAT)\n"
         "fcntl.flock(fd, fcntl.LOCK_EX); os.write(fd, b'%d' % os.getpid()); print('locked', flush=True)\n"
         "time.sleep(120)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(run_folder.RunFolderBusy, match=rf"in use by another rigsa-run \(PID {holder.pid}\)"):
            run(tiny_cfg("eval=none"), folder)
        assert sorted(os.listdir(folder)) == [".lock"]  # the busy run wrote nothing
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    assert run(tiny_cfg("eval=none"), folder)["train"]["steps"] == 4  # kill -9 released the lock


# ------------------------------------------------------------------------------------------ 3. resumption
def test_3_snip_with_reselection_resumes_to_the_same_masks_values_and_metrics(tiny_cfg, tmp_path, monkeypatch):
    overrides = ("eval=none", "method=snip", "method.budget.density=0.1", "method.reselect_every=1",
                 "train.max_steps=4", "train.checkpoint_every=1")
    run(tiny_cfg(*overrides), tmp_path / "reference")
    restore = killed_at_step(monkeypatch, 3)  # after the checkpoint of step 2
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(*overrides), tmp_path / "resumed")
    restore()
    resumed = run(tiny_cfg(*overrides), tmp_path / "resumed")
    assert resumed["train"]["resumed_from_step"] == {"train": 2}
    reference = load_file(str(tmp_path / "reference" / "adapter" / "adapter.safetensors"))
    again = load_file(str(tmp_path / "resumed" / "adapter" / "adapter.safetensors"))
    assert reference.keys() == again.keys()
    assert all(torch.equal(reference[name], again[name]) for name in reference)  # indices (re-selected) and values
    assert metrics_without_timings(tmp_path / "resumed") == metrics_without_timings(tmp_path / "reference")


# ------------------------------------------------------------------------------- 4. checkpoints run no code
class Payload:
    def __reduce__(self):
        return (open, (os.environ["RIGSA_TEST_MARKER"], "w"))


def test_4_a_checkpoint_carrying_a_pickle_payload_is_refused_without_running_it(tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg("eval=none", "train.max_steps=4", "train.checkpoint_every=2")
    monkeypatch.setattr(tracking.Tracker, "finish", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "run")
    monkeypatch.undo()
    marker = tmp_path / "payload-ran"
    monkeypatch.setenv("RIGSA_TEST_MARKER", str(marker))
    path = tmp_path / "run" / "checkpoint" / "train.pt"
    torch.save({"format": checkpoints.FORMAT, "global_step": 4, "payload": Payload()}, path)
    with pytest.raises(UnreadableFile, match=r"train.pt: it holds objects other than tensors and plain data, refused "
                                             r"because loading it could run code. Fix: delete it"):
        run(cfg, tmp_path / "run")
    assert not marker.exists()
    torch.load(path, weights_only=False)  # the payload is real: the old way of loading runs it
    assert marker.exists()


# ------------------------------------------------------------------------------- 5. corrupt files
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_5_a_damaged_checkpoint_gives_one_line_naming_the_file_and_the_fix(damage, tiny_cfg, tmp_path, monkeypatch):
    cfg = tiny_cfg("eval=none")
    monkeypatch.setattr(tracking.Tracker, "finish", lambda *args: (_ for _ in ()).throw(KeyboardInterrupt()))
    with pytest.raises(KeyboardInterrupt):
        run(cfg, tmp_path / "run")
    monkeypatch.undo()
    path = tmp_path / "run" / "checkpoint" / "train.pt"
    path.write_bytes(path.read_bytes()[:1000] if damage == "truncated" else b"\x00garbage" * 50)
    with pytest.raises(UnreadableFile) as error:
        run(cfg, tmp_path / "run")
    message = str(error.value)
    assert message.startswith(f"{path}: not a readable checkpoint") and "\n" not in message
    assert message.endswith("Fix: delete it to retrain that phase from its start, or pass run.overwrite=true to "
                            "start the run again")
    path.unlink()  # the fix works: the phase retrains
    assert run(cfg, tmp_path / "run")["train"]["resumed_from_step"] == {"train": 0}


def test_5_a_partial_last_metrics_line_is_dropped_and_logged_again(tiny_cfg, tmp_path, monkeypatch):
    overrides = ("eval=none", "train.max_steps=4", "train.checkpoint_every=2")
    run(tiny_cfg(*overrides), tmp_path / "reference")
    original = tracking.Tracker.log

    def killed_writing_step_3(self, metrics, step, **kwargs):
        if step == 3:
            with open(self.metrics_path, "a") as handle:
                handle.write('{"step": 3, "train/lo')
            raise KeyboardInterrupt("killed mid-line")
        original(self, metrics, step, **kwargs)

    monkeypatch.setattr(tracking.Tracker, "log", killed_writing_step_3)
    with pytest.raises(KeyboardInterrupt):
        run(tiny_cfg(*overrides), tmp_path / "resumed")
    monkeypatch.undo()
    run(tiny_cfg(*overrides), tmp_path / "resumed")
    assert metrics_without_timings(tmp_path / "resumed") == metrics_without_timings(tmp_path / "reference")


def test_5_a_corrupt_results_json_is_named_with_its_fix(tiny_cfg, tmp_path):
    cfg = tiny_cfg("eval=none")
    first = run(cfg, tmp_path / "run")
    (tmp_path / "run" / "results.json").write_text('{"method": "lo')
    with pytest.raises(UnreadableFile, match=r"results.json: not a readable results.json .*Fix: delete it and rerun"):
        run(cfg, tmp_path / "run")
    (tmp_path / "run" / "results.json").unlink()  # the fix: the final checkpoint replays, nothing retrains
    again = run(cfg, tmp_path / "run")
    assert again["train"]["final_loss"] == first["train"]["final_loss"]
    assert again["train"]["resumed_from_step"] == {"train": 4}


@pytest.mark.parametrize("entry", ["not json", "wrong shape"])
def test_5_a_bad_base_score_cache_entry_is_moved_aside_and_recomputed(entry, tiny_cfg, tmp_path, private_cache):
    first = run(tiny_cfg("run.name=a"), tmp_path / "a")
    (path,) = private_cache.glob("base_target/*.json")
    if entry == "not json":
        path.write_text("{")
    else:  # the shape that used to pass as "(cached)" and crash after training
        stored = json.loads(path.read_text())
        stored["result"]["answer_counts"] = [40]
        path.write_text(json.dumps(stored))
    with pytest.warns(UserWarning, match=r"cache entry .* is .*: moved to .*\.bad-\d+\.json and recomputed"):
        second = run(tiny_cfg("run.name=b"), tmp_path / "b")
    assert second["target"]["base_accuracy"] == first["target"]["base_accuracy"]
    assert json.loads(path.read_text())["result"]["answer_counts"] == first["target"]["base_answer_counts"]
    assert len(list(private_cache.glob("base_target/*.bad-*.json"))) == 1


def test_5_an_unwritable_cache_warns_and_the_run_goes_on_uncached(tiny_cfg, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setattr(cache, "scores_root", lambda: blocker / "cache")  # cannot be created, even by root
    with pytest.warns(UserWarning, match=r"cannot write the cache folder .*a-file/cache/base_target .*not cached"):
        results = run(tiny_cfg(), tmp_path / "run")
    assert results["target"]["base_accuracy"] is not None


# ------------------------------------------------------------------------ 6. late failures, refused reruns
def test_6_a_failure_after_the_load_leaves_the_folder_as_it_was_and_the_corrected_rerun_runs(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"method.budget.params=1000000000 is invalid: expected a budget that fits "
                                          r"the 12,288 target weights"):
        run(tiny_cfg("eval=none", "method=sparta", "method.selection=magnitude", "method.budget.density=null",
                     "method.budget.params=1000000000"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    with pytest.raises(ConfigError, match=r"method.target_modules=\['nope'\] is invalid"):
        run(tiny_cfg("eval=none", "method.target_modules=[nope]"), tmp_path / "run")
    assert not (tmp_path / "run").exists()
    corrected = run(tiny_cfg("eval=none", "method=sparta", "method.selection=magnitude", "method.budget.density=null",
                             "method.budget.params=1000"), tmp_path / "run")
    assert corrected["sparse"]["values"] == 1000


def test_6_a_config_yaml_without_work_does_not_bind_a_rerun(tiny_cfg, tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "config.yaml").write_text("train: {lr: 5.0}\n")  # left by a run killed before its first checkpoint
    assert run(tiny_cfg("eval=none"), folder)["train"]["steps"] == 4


def test_6_a_refused_rerun_touches_nothing_in_the_finished_folder(tiny_cfg, tmp_path):
    run(tiny_cfg("eval=none"), tmp_path / "run")
    before = files_of(tmp_path / "run")
    with pytest.raises(ConfigError, match="holds a run with a different config"):
        run(tiny_cfg("eval=none", "train.lr=2e-3"), tmp_path / "run")
    run(tiny_cfg("eval=none"), tmp_path / "run")  # a finished rerun reads only
    assert files_of(tmp_path / "run") == before


def test_6_a_folder_written_before_a_key_existed_counts_as_that_keys_old_value(tiny_cfg, tmp_path):
    """model.base_dtype and model.quantize came later: a finished run without them is the float32, unquantized run
    (a rerun reads only); the same folder with model.base_dtype=bfloat16 is another config's work."""
    import yaml

    run(tiny_cfg("eval=none"), tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    del saved["model"]["base_dtype"], saved["model"]["quantize"]
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    before = files_of(tmp_path / "run")
    run(tiny_cfg("eval=none"), tmp_path / "run")
    assert files_of(tmp_path / "run") == before
    with pytest.raises(ConfigError, match=r"model.base_dtype: 'float32' -> 'bfloat16'"):
        run(tiny_cfg("eval=none", "model.base_dtype=bfloat16", "dtype=bfloat16"), tmp_path / "run")


def test_6_a_qlora_folder_written_when_qlora_was_method_load_in_4bit_counts_as_model_quantize(tiny_cfg, tmp_path):
    """QLoRA was method.load_in_4bit / quant_type / compute_dtype before it became LoRA with model.quantize: a finished
    run written then is today's method=qlora run (a rerun reads only); one written with quant_type fp4 is not."""
    import yaml

    run(tiny_cfg("eval=none", "method=qlora"), tmp_path / "run")
    saved = yaml.safe_load((tmp_path / "run" / "config.yaml").read_text())
    saved["model"]["quantize"] = None  # written while model.quantize existed but LoRA's 4 bits were the method's
    saved["method"].update(load_in_4bit=True, quant_type="nf4", compute_dtype="float32")
    for written in (saved, {**saved, "model": {k: v for k, v in saved["model"].items() if k != "quantize"}}):
        (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(written))  # and before it existed
        before = files_of(tmp_path / "run")
        run(tiny_cfg("eval=none", "method=qlora"), tmp_path / "run")
        assert files_of(tmp_path / "run") == before
    saved["method"]["quant_type"] = "fp4"
    (tmp_path / "run" / "config.yaml").write_text(yaml.safe_dump(saved))
    with pytest.raises(ConfigError, match=r"model.quantize: 'fp4' -> 'nf4'"):
        run(tiny_cfg("eval=none", "method=qlora"), tmp_path / "run")


def test_6_budget_from_a_lora_run_is_refused_before_the_folder(tiny_cfg, tmp_path, monkeypatch):
    run(tiny_cfg("eval=none", "run.name=lora"), tmp_path / "lora")
    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("the model was loaded"))
    with pytest.raises(ConfigError, match=r"method.budget.from_run='.*lora' is invalid: expected a sparse run \(that "
                                          r"run's method 'lora' trained no sparse values\)"):
        run(tiny_cfg("eval=none", "method=random_mask", "method.budget.density=null",
                     f"method.budget.from_run={tmp_path / 'lora'}"), tmp_path / "random")
    assert not (tmp_path / "random").exists()


# ---------------------------------------------------------------------------------------- 7. smaller gaps
def test_7_an_undeclared_plus_key_is_refused_with_the_valid_keys(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"train.lrr is not a setting. Fix: did you mean train.lr\? The valid keys "
                                          r"of train are: batch_size, checkpoint_every"):
        run(tiny_cfg("+train.lrr=1e-3"), tmp_path / "run")


def test_7_run_name_must_stay_inside_run_root(tiny_cfg, tmp_path):
    with pytest.raises(ConfigError, match=r"run.name='../../x' is invalid: expected a folder name inside run.root"):
        run(tiny_cfg("run.name=../../x"), tmp_path / "x")


def test_7_a_lora_adapter_is_refused_on_another_base(tiny_cfg, tmp_path):
    from rigsa.apply import apply_adapter
    from rigsa.adapters import AdapterMismatch

    cfg = tiny_cfg("eval=none")
    run(cfg, tmp_path / "run")
    other, _ = models.load_model(cfg.model, seed=1)
    with pytest.raises(AdapterMismatch, match="trained on a different base model"):
        apply_adapter(other, tmp_path / "run" / "adapter")
    same, _ = models.load_model(cfg.model, seed=0)
    apply_adapter(same, tmp_path / "run" / "adapter")  # its own base is accepted


SAVE_LORA = """
import sys
from rigsa.config import compose
sys.path.insert(0, {tests!r})
from conftest import TINY, attach_method
__import__("torch").manual_seed(0)  # as run() seeds before attach
model, method = attach_method(compose(TINY))
method.save(__import__("pathlib").Path({out!r}))
"""


@pytest.mark.slow  # a multi-process or lm-eval end-to-end run (15-40 s): make test-slow
def test_7_saved_peft_adapter_files_are_byte_stable_across_processes(tmp_path):
    tests = os.path.dirname(__file__)
    jobs = [subprocess.Popen([sys.executable, "-c", SAVE_LORA.format(tests=tests, out=str(tmp_path / seed))],
                             env={**os.environ, "PYTHONHASHSEED": seed}) for seed in ("1", "2")]
    assert [job.wait() for job in jobs] == [0, 0]
    first, second = files_of(tmp_path / "1"), files_of(tmp_path / "2")
    assert first.keys() == second.keys() and "adapter_config.json" in first
    assert all(first[name][0] == second[name][0] for name in first)


# --------------------------------------------------------------------------------------- 8. README truths
def test_8_bitsandbytes_missing_hub_kernel_warning_is_silenced_and_others_are_not(caplog):
    import logging

    import rigsa  # noqa: F401  (installs the filter)

    logger = logging.getLogger("bitsandbytes.backends.cpu.ops")
    logger.warning("Failed to load CPU gemm_4bit_forward from kernels-community: No module named 'kernels'.")
    logger.warning("another bitsandbytes warning")
    assert "kernels-community" not in caplog.text and "another bitsandbytes warning" in caplog.text
