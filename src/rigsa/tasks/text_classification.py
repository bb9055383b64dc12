"""Text classification: GLUE's seven tasks and IMDB as SpaRTA prepares them, and a researcher's own data.

Every source goes through one code path: `load_table` reads the hub dataset (`task.hub_id` +
`task.hub_config`, e.g. nyu-mll/glue sst2), local files with the hub's columns (`task.data_files`,
one per split name), or one file or saved dataset (`task.path`: csv, json/jsonl, parquet, or a
`save_to_disk` folder); `split_rows` cuts train / dev / test by the task's recipe; `build` writes the
prompts (the task's instruction, then the text), maps each label to its class through
`task.label_words`, and drops training examples whose prompt is longer than `task.max_prompt_tokens`.

SpaRTA's recipe (its Table 2 sizes): dev is the last 1,000 training rows for SST-2 and CoLA, the last
5,000 for QQP and QNLI, the last 300 for RTE and the last 10,000 for MNLI, removed from training; the test
set is GLUE's validation split (MNLI: matched + mismatched); MRPC keeps its own three splits; IMDB's test
split gives a seeded dev of 5,000 and a test of 20,000. Training sets are capped at `max_train_size`
(100,000) by a seeded sample kept in the source order.
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch
from omegaconf import DictConfig, OmegaConf

from rigsa.tasks import Split, TaskData, label_token_ids, render_prompts, test_set_key
from rigsa.vocabulary import ConfigError, fail

FORMATS = {".csv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}  # what `datasets` reads
METRICS = ("accuracy", "f1", "mcc")
SPLIT_NAMES = ("train", "dev", "test")
COLUMN_SPLIT_VALUES = {"train": "train", "dev": "dev", "validation": "dev", "test": "test"}


def file_format(path: str, key: str) -> str:
    """The `datasets` builder for a local file or folder, or a ConfigError naming the accepted ones."""
    expanded = Path(os.path.expanduser(str(path)))
    if not expanded.exists():
        from rigsa.assets import cache_root

        if cache_root() / "assets" in expanded.parents:  # a packaged task's data (conf/task/sentiment_*.yaml)
            fail(key, path, "a fetched asset", "run `rigsa-assets` (or `make assets`) once to fetch it")
        fail(key, path, "an existing file or folder", f"check the path, or pass {key}=<a csv, jsonl or parquet file>")
    if expanded.is_dir():
        return "saved"  # a folder written by Dataset.save_to_disk / DatasetDict.save_to_disk
    suffix = expanded.suffix.lower()
    if suffix not in FORMATS:
        fail(key, path, f"a file datasets reads: {', '.join(sorted(FORMATS))}, or a save_to_disk folder",
             "convert it to csv, jsonl or parquet")
    return FORMATS[suffix]


def check_config(task: DictConfig, fail) -> None:
    """The checks that read no rows: one source that exists, label words, the split recipe, the metric."""
    files = OmegaConf.to_container(task, resolve=True)["data_files"]
    if files is not None and (not isinstance(files, dict) or not all(isinstance(path, str) for path in files.values())):
        fail("task.data_files", files, "null or {split name: file}", "pass task.data_files={train: /data/train.jsonl}")
    sources = [key for key in ("path", "data_files") if task.get(key)]
    if not sources and not task.hub_id:
        fail("task.path", None, "a data file or folder (or task.hub_id / task.data_files)",
             "pass task.path=/data/reviews.csv")
    if len(sources) > 1:
        fail("task.data_files", OmegaConf.to_container(task.data_files), "either task.path or task.data_files",
             "pass task.data_files=null")
    if task.path:
        file_format(task.path, "task.path")
    builders = {file_format(path, f"task.data_files.{split}") for split, path in (task.data_files or {}).items()}
    if len(builders) > 1:
        fail("task.data_files", OmegaConf.to_container(task.data_files), "files of one format", "convert them to one")
    hub_offline = os.environ.get("HF_DATASETS_OFFLINE") or os.environ.get("HF_HUB_OFFLINE")
    if not sources and task.hub_id and not os.path.isdir(os.path.expanduser(task.hub_id)) and not hub_offline:
        from rigsa import assets

        reason = assets.hub_unreachable_reason()
        if reason:
            fail("task.hub_id", task.hub_id, f"a dataset this machine can load (task={task.name} comes from the "
                 f"Hugging Face hub, but {reason})", "pass task.data_files={train: <file>, validation: <file>, ...} "
                 "with the hub's columns, or set HF_DATASETS_OFFLINE=1 when the dataset is in your cache")
    words = list(task.label_words)
    if len(words) < 2 or not all(str(word).strip() for word in words):
        fail("task.label_words", words, "a non-empty word for each of at least two classes, e.g. [No, Yes]",
             "pass task.label_words=[No,Yes]")
    labels = OmegaConf.to_container(task, resolve=True)["labels"]
    if labels is not None and len(labels) != len(words):
        fail("task.labels", labels, f"one label value per label word ({len(words)}: {words})",
             "pass as many task.labels as task.label_words, in the same order")
    if task.metric not in METRICS or (task.metric != "accuracy" and len(words) != 2):
        fail("task.metric", task.metric, f"one of {list(METRICS)} (f1 and mcc need two labels)",
             "pass task.metric=accuracy")
    recipe = task.splits
    if recipe.dev_pick not in ("last", "shuffled"):
        fail("task.splits.dev_pick", recipe.dev_pick, "last or shuffled", "pass task.splits.dev_pick=last")
    fractions = OmegaConf.to_container(recipe.fractions)
    negative = any(value < 0 for value in fractions.values())
    if set(fractions) - set(SPLIT_NAMES) or negative or sum(fractions.values()) > 1 + 1e-9:
        fail("task.splits.fractions", fractions, "train / dev / test fractions >= 0 that sum to at most 1",
             "pass task.splits.fractions={train: 0.8, dev: 0.1, test: 0.1}")
    for key in ("max_train_size", "max_prompt_tokens"):
        if task[key] < 1:
            fail(f"task.{key}", task[key], "a number >= 1", f"pass task.{key}=256")
    if task.max_test_size < 0:
        fail("task.max_test_size", task.max_test_size, "0 (the whole test set) or a number >= 1",
             "pass task.max_test_size=1000")


def label_values(task: DictConfig) -> list[str]:
    """The label values in class order, as text (task.labels, or 0, 1, ... when it is null)."""
    labels = OmegaConf.to_container(task, resolve=True)["labels"]  # a null list is a ListConfig of None
    return [str(label) for label in (labels if labels is not None else range(len(task.label_words)))]


def check_text_file(path: str, key: str, encoding: str) -> None:
    """A csv or json(l) file that is empty, or not text in task.encoding, refused naming the file (and the first line
    that does not decode, with its byte) before `datasets` reads it."""
    file = Path(os.path.expanduser(path))
    if file.is_dir() or FORMATS.get(file.suffix.lower()) not in ("csv", "json"):
        return
    if file.stat().st_size == 0:
        fail(key, path, "a file with rows (this one is empty)", f"point {key} at the file holding the data")
    filled = 0  # lines holding more than white space
    with open(file, "rb") as handle:
        for number, line in enumerate(handle, start=1):
            filled += bool(line.strip())
            try:
                line.decode(encoding)
            except UnicodeDecodeError as error:
                fail(key, path, f"text in task.encoding={encoding} (line {number} has the byte "
                     f"0x{line[error.start]:02x}, which {encoding} cannot decode)",
                     "pass task.encoding=<the file's encoding, e.g. latin-1 or cp1252>, or convert the file to utf-8")
            except LookupError:
                fail("task.encoding", encoding, "an encoding Python knows (utf-8, latin-1, cp1252, ...)",
                     "pass task.encoding=utf-8")
    if filled <= (1 if FORMATS[file.suffix.lower()] == "csv" else 0):
        fail(key, path, "a file with rows (this one has " + ("a header and no rows)" if filled else "no rows)"),
             f"point {key} at the file holding the data")


def load_table(task: DictConfig):
    """The rows as a DatasetDict of named splits (one `train` split for a single file)."""
    import datasets

    text_options = {"encoding": task.encoding}  # csv and json read text; parquet is binary
    try:
        if task.path:
            builder = file_format(task.path, "task.path")
            path = os.path.expanduser(task.path)
            check_text_file(task.path, "task.path", task.encoding)
            if builder == "saved":
                loaded = datasets.load_from_disk(path)
            else:
                options = text_options if builder != "parquet" else {}
                loaded = datasets.load_dataset(builder, data_files=path, **options)
        elif task.data_files:
            files = {split: os.path.expanduser(path) for split, path in task.data_files.items()}
            builder = file_format(next(iter(files.values())), "task.data_files")
            for split, path in task.data_files.items():
                check_text_file(path, f"task.data_files.{split}", task.encoding)
            options = text_options if builder != "parquet" else {}
            loaded = datasets.load_dataset(builder, data_files=files, **options)
        else:
            loaded = datasets.load_dataset(task.hub_id, task.hub_config, revision=task.revision)
    except ConfigError:
        raise
    except Exception as error:  # a file datasets cannot parse, a dataset or config the hub does not have
        source = task.path or (OmegaConf.to_container(task.data_files) if task.data_files
                               else f"{task.hub_id} ({task.hub_config})")
        raise ConfigError(f"task data {source!r} cannot be read: {type(error).__name__}: {str(error)[:300]}. Fix: "
                          "point task.path or task.data_files at csv, jsonl or parquet files with the task's columns"
                          ) from None
    return loaded if isinstance(loaded, datasets.DatasetDict) else datasets.DatasetDict({"train": loaded})


# A text longer than this many characters per token of train.max_seq_len cannot fit (BPE tokens of natural text
# average about 4 characters): refused, or dropped from training, before a tokenizer spends minutes and GBs on it.
MAX_CHARACTERS_PER_TOKEN = 32


def column_key(task: DictConfig, column: str) -> str:
    """The task key naming a data column: text_column, label_column or text_pair_column."""
    return {task.text_column: "text_column", task.label_column: "label_column"}.get(column, "text_pair_column")


def check_cells(rows, split: str, task: DictConfig, columns: list[str]) -> None:
    """Every text and label cell is filled: a null cell would train on the prompt text "None". Named by row."""
    for column in columns:
        for number, value in enumerate(rows[column]):
            if value is None or (isinstance(value, float) and value != value):
                raise ConfigError(f"task.{column_key(task, column)}={column!r} has an empty (null) cell in row "
                                  f"{number} of the data's "
                                  f"{split!r} split. Fix: fill or drop that row")


def take(dataset, indices):
    return dataset.select(np.sort(np.asarray(indices, dtype=np.int64)))


def split_rows(table, recipe: DictConfig, seed: int, max_train_size: int, max_test_size: int = 0) -> dict:
    """{train, dev, test} Datasets from the loaded splits, by the recipe (see the module docstring)."""
    import datasets

    rng = np.random.default_rng(seed)
    if recipe.column:  # one table whose column names each row's split
        rows = datasets.concatenate_datasets(list(table.values()))
        if recipe.column not in rows.column_names:
            raise ConfigError(f"task.splits.column={recipe.column!r} is invalid: expected a column of the data "
                              f"({rows.column_names}). Fix: pass task.splits.column=null")
        names = [COLUMN_SPLIT_VALUES.get(str(value).lower()) for value in rows[recipe.column]]
        parts = {name: rows.select([i for i, found in enumerate(names) if found == name]) for name in SPLIT_NAMES}
    elif set([recipe.train, *recipe.test, *([recipe.dev] if recipe.dev else [])]) <= set(table):
        parts = recipe_parts(table, recipe, rng)
    elif len(table) == 1:  # one file: cut it by the fractions
        rows = next(iter(table.values()))
        order = rng.permutation(len(rows))
        fractions = {name: float(recipe.fractions.get(name, 0.0)) for name in SPLIT_NAMES}
        bounds = np.cumsum([0] + [round(fractions[name] * len(rows)) for name in SPLIT_NAMES])
        parts = {name: take(rows, order[bounds[k]:bounds[k + 1]]) for k, name in enumerate(SPLIT_NAMES)}
    else:
        wanted = sorted({recipe.train, *recipe.test, *([recipe.dev] if recipe.dev else [])} - set(table))
        raise ConfigError(f"task.splits names the splits {wanted}, which the data does not have (it has "
                          f"{sorted(table)}). Fix: name the data's splits in task.splits.train/dev/test, or give "
                          "one file and task.splits.fractions")
    if len(parts["train"]) > max_train_size:
        parts["train"] = take(parts["train"], rng.choice(len(parts["train"]), max_train_size, replace=False))
    if 0 < max_test_size < len(parts["test"]):  # a seeded sample, in the test set's own order
        parts["test"] = take(parts["test"], np.sort(rng.choice(len(parts["test"]), max_test_size, replace=False)))
    return parts


def recipe_parts(table, recipe: DictConfig, rng) -> dict:
    """train / dev / test by a SpaRTA-style recipe; rows taken for dev leave the split they came from."""
    import datasets

    sources = {recipe.train: table[recipe.train]}
    sources.update({name: table[name] for name in recipe.test})
    dev = table[recipe.dev].select([]) if recipe.dev else table[recipe.train].select([])
    if recipe.dev:
        rows = table[recipe.dev]
        size = len(rows) if recipe.dev_size is None else min(recipe.dev_size, len(rows))
        if recipe.dev_pick == "last":
            picked = np.arange(len(rows) - size, len(rows))
        else:
            picked = rng.permutation(len(rows))[:size]
        dev = take(rows, picked)
        if recipe.dev in sources:
            sources[recipe.dev] = take(rows, np.setdiff1d(np.arange(len(rows)), picked))
    test = datasets.concatenate_datasets([sources[name] for name in recipe.test])
    return {"train": sources[recipe.train], "dev": dev, "test": test}


def question(instruction: str, row: dict, task: DictConfig) -> str:
    text = f"{instruction}\n\n{task.text_label}: {row[task.text_column]}"
    if task.text_pair_column:
        text += f"\n{task.text_pair_label}: {row[task.text_pair_column]}"
    return text


def build(task: DictConfig, tokenizer, max_seq_len: int) -> TaskData:
    table = load_table(task)
    word_list = [str(word) for word in task.label_words]
    values = label_values(task)
    words = dict(zip(values, word_list))
    columns = [task.text_column, task.label_column] + ([task.text_pair_column] if task.text_pair_column else [])
    for name, rows in table.items():
        missing = [column for column in columns if column not in rows.column_names]
        if missing:
            key = column_key(task, missing[0])
            raise ConfigError(f"task.{key}={missing[0]!r} is invalid: expected a column of the data's {name!r} split "
                              f"(it has {rows.column_names}). Fix: pass task.{key}=<one of those>")
        check_cells(rows, name, task, columns)
    if not sum(len(rows) for rows in table.values()):
        raise ConfigError(f"task data {task.path or OmegaConf.to_container(task.data_files)!r} has a header but no "
                          "rows. Fix: point task.path or task.data_files at the files holding the rows")
    parts = split_rows(table, task.splits, task.split_seed, task.max_train_size, task.max_test_size)
    splits, dropped = {}, 0
    for name in SPLIT_NAMES:
        rows = parts[name]
        labels = [str(label) for label in rows[task.label_column]]
        unknown = sorted(set(labels) - set(words))
        if unknown:
            raise ConfigError(f"task.labels={values} is invalid: expected every label of the data, but its {name} "
                              f"split has the labels {unknown[:5]}. Fix: list every label in task.labels with its word "
                              "in task.label_words (same order), or drop those rows")
        texts = [question(task.instruction, row, task) for row in rows]
        limit = MAX_CHARACTERS_PER_TOKEN * (task.max_prompt_tokens if name == "train" else max_seq_len)
        huge = {i for i, text in enumerate(texts) if len(text) > limit}
        if huge and name != "train":
            row = min(huge)
            raise ConfigError(f"train.max_seq_len={max_seq_len} is invalid: expected room for every {name} prompt, but "
                              f"row {row} of the {name} split is {len(texts[row]):,} characters long. Fix: cut "
                              "or drop that row (the dev and test sets are kept whole)")
        if huge:  # dropped like any training prompt over task.max_prompt_tokens, without tokenizing them
            keep = [i for i in range(len(texts)) if i not in huge]
            texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
        prompts = render_prompts(texts, tokenizer, task.chat_template)
        classes = torch.tensor([values.index(label) for label in labels], dtype=torch.long)
        if name == "train":  # dev and test are kept whole; too long a training prompt is dropped (and counted)
            kept = [i for i, prompt in enumerate(prompts) if prompt.numel() <= task.max_prompt_tokens]
            dropped = len(prompts) - len(kept) + len(huge)
            prompts, classes = [prompts[i] for i in kept], classes[kept]
        if name != "dev" and not prompts:
            fix = "raise task.max_prompt_tokens" if name == "train" and dropped else "check task.splits"
            raise ConfigError(f"the {name} split of task={task.name} is empty (after dropping {dropped} training "
                              f"prompts over task.max_prompt_tokens={task.max_prompt_tokens}). Fix: {fix}")
        longest = max((prompt.numel() for prompt in prompts), default=0)
        if longest > max_seq_len:
            raise ConfigError(f"train.max_seq_len={max_seq_len} is invalid: expected at least the longest {name} "
                              f"prompt ({longest} tokens). Fix: pass train.max_seq_len={longest}")
        splits[name] = Split(prompts, classes, tokenizer.pad_token_id)
    try:
        tokens = label_token_ids(tokenizer, word_list)
    except ValueError as error:
        raise ConfigError(f"task.label_words={word_list} is invalid: {error}. Fix: pass other words") from None
    return TaskData(task.name, splits["train"], splits["dev"], splits["test"], word_list, tokens, task.metric,
                    test_set_key(splits["test"], word_list), dropped)
