"""Forgetting through lm-eval, on the in-memory model: base (cached on disk) versus adapted.

A suite is a list of lm-eval tasks. Built-in tasks (piqa, hellaswag, gsm8k) load their data from
the Hugging Face hub; `data_files` points one at local csv, JSON/JSONL or parquet files instead,
through an `include:` of the built-in YAML, so the fixtures and the hub data run the same task
code. rigsa's own offline tasks (GSM8K from a packaged file) ship as YAML templates in
`rigsa/lm_eval_tasks/` and are rendered next to their data under $RIGSA_CACHE. A researcher's own
task YAMLs come from the folders in `eval.include_path`, or are named by their YAML's path; lm-eval
finds all of them through `TaskManager(include_path=...)`, and only tasks whose data lm-eval would
fetch from the hub need it.

Forgetting is signed so that a positive number means the model got worse, whatever the metric's
direction (lm-eval's `higher_is_better`).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import os
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf
from torch import nn

from rigsa import assets
from rigsa.cache import cached
from rigsa.evaluate import autocast

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).parent / "lm_eval_tasks"
GSM8K_FEWSHOT_ROWS = 50  # the first 50 GSM8K test questions are few-shot exemplars only, never evaluated
COLLAPSE_BELOW = 0.01
# The suite averages use these (on comparable 0-1 / bits scales); perplexities stay per task only.
PRIMARY_METRICS = ("acc", "acc_norm", "exact_match", "bits_per_byte")  # "collapsed": a higher-is-better score at or below this where the base was above it
DATA_FORMATS = {".json": "json", ".jsonl": "json", ".csv": "csv", ".parquet": "parquet"}  # local data_files
LOCAL_DATASET_PATHS = ("json", "csv", "parquet", "arrow", "text")  # lm-eval dataset_path values read from disk


class HubUnreachable(RuntimeError):
    """The suite needs the Hugging Face hub and it cannot be reached."""


def read_task_yaml(path: Path) -> dict:
    """An lm-eval task YAML as plain data (its `!function` tags read as None)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_multi_constructor("!", lambda loader, suffix, node: None)
    loaded = yaml.load(Path(path).read_text(), Loader)
    return loaded if isinstance(loaded, dict) else {}


def is_yaml_path(name: str) -> bool:
    return str(name).endswith((".yaml", ".yml"))


def include_paths(suite: DictConfig) -> list[Path]:
    """eval.include_path's folders, and the folder of each task named by its YAML path."""
    folders = [Path(folder).expanduser().resolve() for folder in suite.include_path]
    folders += [Path(task.task).expanduser().resolve().parent for task in suite.forgetting if is_yaml_path(task.task)]
    return list(dict.fromkeys(folders))


def user_tasks(suite: DictConfig) -> dict[str, Path]:
    """The researcher's own tasks: task name -> its YAML, from the include paths."""
    found = {}
    for folder in include_paths(suite):
        for path in sorted(folder.rglob("*.y*ml")):
            name = read_task_yaml(path).get("task")
            if isinstance(name, str):
                found.setdefault(name, path)
    return found


def input_digests(suite: DictConfig) -> dict[str, str]:
    """SHA-256 of every file the suite's scores depend on beyond rigsa's own: each file under the include paths
    (task YAMLs, their `!function` helper modules, data kept beside them), each `data_files` entry of the suite and
    of those YAMLs. An edit to any of them is a new base-cache key, so a stale score is never reused."""
    found: dict[str, str] = {}

    def add(path: Path) -> None:
        if path.is_file():
            found[str(path)] = assets.sha256_file(path)

    def add_data_files(files, folder: Path) -> None:
        values = files.values() if isinstance(files, dict) else files if isinstance(files, list) else [files]
        for value in values:
            if isinstance(value, (list, dict)):
                add_data_files(value, folder)
            elif isinstance(value, str):
                add((folder / Path(value).expanduser()).resolve())

    for folder in include_paths(suite):
        for path in sorted(folder.rglob("*")):
            if "__pycache__" not in path.parts:
                add(path)
                if path.suffix in (".yaml", ".yml"):
                    kwargs = read_task_yaml(path).get("dataset_kwargs")
                    if isinstance(kwargs, dict) and kwargs.get("data_files") is not None:
                        add_data_files(kwargs["data_files"], path.parent)
    for task in suite.forgetting:
        if task.get("data_files"):
            add_data_files(OmegaConf.to_container(task.data_files), Path.cwd())
    return found


def reads_local_data(path: Path, depth: int = 0) -> bool:
    """Whether a task YAML reads its data from disk (a local builder or folder), following `include:`."""
    config = read_task_yaml(path)
    dataset = config.get("dataset_path")
    if dataset is None and config.get("include") and depth < 5:
        return reads_local_data((path.parent / config["include"]).resolve(), depth + 1)
    return dataset in LOCAL_DATASET_PATHS or (isinstance(dataset, str) and Path(dataset).expanduser().is_dir())


def needs_hub(suite: DictConfig) -> list[str]:
    """Tasks in the suite whose data lm-eval would download from the hub: built-in tasks without data_files,
    and a researcher's own tasks whose YAML names a hub dataset."""
    shipped = {path.stem for path in TEMPLATES.glob("*.yaml")}
    own = user_tasks(suite)
    hub = []
    for task in suite.forgetting:
        name = local_name(task)
        if name in shipped or task.get("data_files"):
            continue
        if name in own and reads_local_data(own[name]):
            continue
        hub.append(name)
    return hub


def check_hub(suite: DictConfig, timeout: float = 5.0) -> None:
    """Fail fast, before any training, when the suite needs a hub that is unreachable."""
    tasks = needs_hub(suite)
    if not tasks:
        return
    reason = assets.hub_unreachable_reason(timeout)
    if reason:
        raise HubUnreachable(f"eval={suite.name} runs lm-eval's {tasks}, whose data come from the Hugging Face hub, "
                             f"but {reason}. Use eval=offline (packaged GSM8K data), or eval=target for the target "
                             f"task only.")


def _prepare_gsm8k(folder: Path) -> None:
    """Split the packaged GSM8K test file: a fixed few-shot part and the evaluated rest."""
    rows = assets.locate("gsm8k").read_text().splitlines()
    (folder / "gsm8k_fewshot.jsonl").write_text("\n".join(rows[:GSM8K_FEWSHOT_ROWS]) + "\n")
    (folder / "gsm8k_eval.jsonl").write_text("\n".join(rows[GSM8K_FEWSHOT_ROWS:]) + "\n")


PROSE_DOCUMENT_CHARS = 2000  # a prose document: whole lines of the novel, cut once it reaches this length


def prose_documents(text: str) -> list[str]:
    """The novel itself, from its title to "--(THE END)--" (Project Gutenberg's licence header and footer, the
    producers' line and the transcriber's list of printed typos left out), cut at line ends into documents of about
    PROSE_DOCUMENT_CHARS characters, in order."""
    lines = text.lstrip("\ufeff").splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("*** START OF")) + 1
    end = next(i for i, line in enumerate(lines) if line.strip() == "--(THE END)--") + 1
    documents, current = [], []
    for line in lines[start:end]:
        if line.startswith("Produced by"):
            continue
        current.append(line)
        if sum(len(item) + 1 for item in current) >= PROSE_DOCUMENT_CHARS:
            documents.append("\n".join(current))
            current = []
    if current:
        documents.append("\n".join(current))
    return documents


def _prepare_prose(folder: Path) -> None:
    documents = prose_documents(assets.locate("prose").read_text(encoding="utf-8"))
    (folder / "prose_eval.jsonl").write_text("".join(json.dumps({"text": text}) + "\n" for text in documents))


def task_folder(suite: DictConfig) -> Path:
    """Render the shipped task templates and any local-data overrides into one include_path folder."""
    digest = hashlib.sha256(json.dumps(OmegaConf.to_container(suite.forgetting, resolve=True), sort_keys=True)
                            .encode()).hexdigest()[:12]  # the include paths are passed to lm-eval beside this folder
    folder = writable(assets.cache_root() / "lm_eval_tasks" / digest)
    data_dir = writable(assets.cache_root() / "lm_eval_data")
    if not (data_dir / "gsm8k_eval.jsonl").exists():
        _prepare_gsm8k(data_dir)
    prose_needed = any(task.task == "rigsa_prose_bpb" for task in suite.forgetting)
    if prose_needed and not (data_dir / "prose_eval.jsonl").exists():
        _prepare_prose(data_dir)
    for template in TEMPLATES.glob("*.yaml"):
        text = template.read_text().replace("__DATA_DIR__", str(data_dir))
        (folder / template.name).write_text(text.replace("__LM_EVAL_GSM8K__", str(builtin_yaml("gsm8k"))))
    for task in suite.forgetting:
        if task.get("data_files"):
            (folder / f"{local_name(task)}.yaml").write_text(json.dumps({
                "include": str(builtin_yaml(task.task)), "task": local_name(task),
                "dataset_path": DATA_FORMATS[Path(next(iter(task.data_files.values()))).suffix.lower()],
                "dataset_name": None,
                "dataset_kwargs": {"data_files": {split: str(Path(path).expanduser().resolve())
                                                  for split, path in task.data_files.items()}}}, indent=2))
    return folder


def writable(folder: Path) -> Path:
    """`folder`, created; or, when the cache cannot be written, a temporary folder (with a warning)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".probe-{os.getpid()}"
        probe.touch()
        probe.unlink()
        return folder
    except OSError as error:
        import tempfile
        import warnings

        fallback = Path(tempfile.mkdtemp(prefix=f"rigsa-{folder.name}-"))
        warnings.warn(f"rigsa: cannot write {folder} ({error.strerror or error}); using {fallback} for this run",
                      stacklevel=2)
        return fallback


def lm_eval_task_file(name: str) -> Path | None:
    """lm-eval's own YAML of a built-in task named like its file, or None."""
    import lm_eval.tasks

    root = Path(lm_eval.tasks.__file__).parent
    candidates = [root / name / f"{name}.yaml"] + sorted(root.glob(f"**/{name}.yaml"))
    return next((path for path in candidates if path.exists()), None)


def builtin_yaml(name: str) -> Path:
    found = lm_eval_task_file(name)
    if found is None:
        raise ValueError(f"lm-eval has no built-in task {name!r} to point at local data")
    return found


def local_name(task) -> str:
    """The name lm-eval knows the task by (and its results are under): `<task>_local` for a built-in task on
    local data_files, the YAML's own `task:` for a task named by its YAML path, else the name as given."""
    if task.get("data_files"):
        return f"{task.task}_local"
    if is_yaml_path(task.task):
        return str(read_task_yaml(Path(task.task).expanduser()).get("task"))
    return task.task


def task_limit(suite: DictConfig, task) -> float | None:
    """eval.limit, when set, is every task's limit; otherwise the task's own."""
    return suite.limit if suite.limit is not None else task.limit


def check_suite(suite: DictConfig, fail) -> None:
    """The suite's values, checked before any model loads (called by rigsa.validate.validate)."""
    import yaml

    if suite.limit is not None and suite.limit <= 0:
        fail("eval.limit", suite.limit, "null (each task's own limit) or > 0", "pass eval.limit=100")
    for folder in suite.include_path:
        if not Path(folder).expanduser().is_dir():
            fail("eval.include_path", folder, "existing folders of lm-eval task YAMLs", "check the path")
    known = {path.stem for path in TEMPLATES.glob("*.yaml")}  # rigsa's tasks, and below the include paths' own
    for folder in include_paths(suite):
        for path in sorted(folder.rglob("*.y*ml")):
            try:
                name = read_task_yaml(path).get("task")
            except (yaml.YAMLError, UnicodeDecodeError) as error:
                where = getattr(error, "problem_mark", None)
                fail("eval.include_path", str(folder), f"folders of readable lm-eval task YAMLs, but {path} is not "
                     f"valid YAML ({getattr(error, 'problem', None) or type(error).__name__}"
                     + (f", line {where.line + 1})" if where else ")"), f"fix or remove {path.name}")
            if isinstance(name, str):
                known.add(name)
    for number, task in enumerate(suite.forgetting):
        close = difflib.get_close_matches(str(task.task), sorted(known), n=1, cutoff=0.8)
        if task.task not in known and close and not is_yaml_path(task.task) and not lm_eval_task_file(task.task):
            fail(f"eval.forgetting[{number}].task", task.task, "a task rigsa ships, one in eval.include_path, or an "
                 "lm-eval built-in", f"did you mean {close[0]}?")
        if task.limit is not None and task.limit <= 0:
            fail(f"eval.forgetting[{number}].limit", task.limit, "null (all) or > 0", "pass a positive limit")
        yaml_path = Path(task.task).expanduser()
        if is_yaml_path(task.task) and not (yaml_path.is_file() and isinstance(read_task_yaml(yaml_path).get("task"), str)):
            fail(f"eval.forgetting[{number}].task", task.task, "an lm-eval task YAML (a file with a `task:` name)",
                 "check the path, or name the task and pass its folder in eval.include_path")
        formats = set()
        for split, path in (task.data_files or {}).items():
            key = f"eval.forgetting[{number}].data_files.{split}"
            if not Path(path).expanduser().is_file():
                fail(key, path, "an existing data file", "point data_files at local files with the task's fields")
            if Path(path).suffix.lower() not in DATA_FORMATS:
                fail(key, path, f"a format datasets reads: {', '.join(sorted(DATA_FORMATS))}",
                     "convert it to jsonl, csv or parquet")
            formats.add(DATA_FORMATS[Path(path).suffix.lower()])
        if len(formats) > 1:
            fail(f"eval.forgetting[{number}].data_files", dict(task.data_files), "files of one format",
                 "convert them to one format")


def evaluate_suite(model: nn.Module, tokenizer, suite: DictConfig, device: torch.device, dtype: str,
                   seed: int) -> dict[str, dict]:
    """Run the suite on the in-memory model; return {task: {metric: value}} (stderr dropped)."""
    from unittest import mock

    import lm_eval
    import lm_eval.evaluator
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=[str(task_folder(suite)), *map(str, include_paths(suite))])
    was_training = model.training
    model.eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=suite.lm_eval_batch_size, device=str(device))
    scores: dict[str, dict] = {}
    for task in suite.forgetting:  # one call per task: each has its own few-shot count and limit
        # lm-eval records `git describe` of the working directory, printing "fatal: not a git repository" outside
        # one; rigsa keeps none of that record, so the call is skipped
        with autocast(device, dtype), torch.no_grad(), mock.patch.object(lm_eval.evaluator, "get_git_commit_hash",
                                                                          lambda: None):
            output = lm_eval.simple_evaluate(
                model=lm, tasks=[local_name(task)], num_fewshot=task.num_fewshot, limit=task_limit(suite, task),
                task_manager=manager, apply_chat_template=suite.apply_chat_template, random_seed=seed,
                numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed, log_samples=False,
                bootstrap_iters=0)
        name = local_name(task)
        directions = output["higher_is_better"][name]
        metrics = {key.removesuffix(",none"): value for key, value in output["results"][name].items()
                   if key.split(",")[0] in directions and isinstance(value, (int, float))}  # no stderr, sample_len
        scores[name] = {"metrics": metrics, "higher_is_better": directions,
                        "version": output["versions"].get(name), "n": output["n-samples"][name]["effective"]}
    model.train(was_training)
    return scores


def base_scores(model: nn.Module, tokenizer, suite: DictConfig, device, dtype: str, seed: int,
                fingerprint: str, on_device=lambda measure: measure()) -> tuple[dict, bool]:
    """The base model's suite scores, cached by model fingerprint, suite settings and lm-eval version; computed
    through `on_device` (run.staged_on for a model kept on the CPU until quantized)."""
    import lm_eval

    key = {"model": fingerprint, "suite": OmegaConf.to_container(suite.forgetting, resolve=True),
           "limit": suite.limit, "inputs": input_digests(suite),
           "chat_template": suite.apply_chat_template, "dtype": dtype, "seed": seed,
           "lm_eval": getattr(lm_eval, "__version__", "?"),
           "templates": {p.name: hashlib.sha256(p.read_bytes()).hexdigest()[:12] for p in TEMPLATES.glob("*.yaml")}}
    names = [local_name(task) for task in suite.forgetting]
    return cached("base_forgetting", key, lambda: on_device(lambda: evaluate_suite(model, tokenizer, suite, device,
                                                                                    dtype, seed)),
                  check=lambda result: suite_problem(result, names))


def suite_problem(result, names: list[str]) -> str | None:
    """What is wrong with a stored suite result for these tasks (a base-score cache entry), or None."""
    if not isinstance(result, dict) or sorted(result) != sorted(names):
        return f"not the scores of {names}"
    for name, scores in result.items():
        if not isinstance(scores, dict) or not isinstance(scores.get("metrics"), dict) or not scores["metrics"] \
                or not isinstance(scores.get("higher_is_better"), dict) \
                or not all(isinstance(value, (int, float)) for value in scores["metrics"].values()):
            return f"not a score record for {name}"
    return None


def forgetting_block(base: dict, adapted: dict) -> dict:
    """Per task and metric: base, adapted, forgetting (positive = worse), GaLLoP's forget ratio
    max(0, (base - adapted) / base) in the metric's own direction, a collapse flag; plus averages
    and the collapse count over the primary metrics (PRIMARY_METRICS)."""
    per_task, forgets, ratios, collapses = {}, [], [], 0
    for task, scores in base.items():
        rows = {}
        for metric, base_value in scores["metrics"].items():
            adapted_value = adapted[task]["metrics"][metric]
            higher = scores["higher_is_better"].get(metric.split(",")[0], True)
            row = forget_row(base_value, adapted_value, higher)
            rows[metric] = row
            if metric.split(",")[0] not in PRIMARY_METRICS:
                continue
            forgets.append(row["forgetting"])
            if row["forget_ratio"] is not None:
                ratios.append(row["forget_ratio"])
            collapses += row["collapsed"]
        per_task[task] = rows
    return {"tasks": per_task,
            "mean_forgetting": sum(forgets) / len(forgets) if forgets else None,
            "mean_forget_ratio": sum(ratios) / len(ratios) if ratios else None,
            "collapsed": collapses}


def forget_row(base: float, adapted: float, higher_is_better: bool) -> dict:
    worse_by = (base - adapted) if higher_is_better else (adapted - base)
    ratio = max(0.0, worse_by / abs(base)) if base else None
    collapsed = bool(higher_is_better and base > COLLAPSE_BELOW and adapted <= COLLAPSE_BELOW)
    return {"base": base, "adapted": adapted, "forgetting": worse_by, "forget_ratio": ratio,
            "higher_is_better": higher_is_better, "collapsed": collapsed}
