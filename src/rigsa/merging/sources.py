"""The adapters a merge takes, by run folder: each folder's config, results and adapter read, and the set checked
against itself before any model loads. Each refusal is one line naming the adapter and the fix.

Refused here: a folder that is no finished run; adapters trained on different base models (the `model` configs,
which name the tokenizer too; the runs' base fingerprints; the adapters' own where two record the same kind), over
different 4-bit settings, or in different compute dtypes; two adapters of one task (their heads and scores would
clash); two adapters whose deltas for one layer have different shapes (never skipped, unlike mergekit). Checked
after the model loads (`check_on_base`): every adapter fits it and was trained on it, as `rigsa-apply` checks one,
and the base is the one each run loaded.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from rigsa.adapters import PEFT_FORMAT, SPARSE_FORMAT, Adapter, AdapterMismatch, DenseDelta, LowRankDelta
from rigsa.adapters.load import check_fits, refuse_other_base
from rigsa.adapters.read import read_adapter
from rigsa.adapters.write import dense_fingerprint, target_fingerprint
from rigsa.models import fingerprint
from rigsa.cache import UnreadableFile
from rigsa.run_folder import read_results, same_spelling, upgraded
from rigsa.vocabulary import ConfigError


@dataclass
class Source:
    """One adapter to merge: its run folder, the run's config and results, and the adapter read as data."""
    run_dir: Path
    cfg: DictConfig
    results: dict
    adapter: Adapter

    @property
    def task(self) -> str:
        return str(self.cfg.task.name)


def read_source(run_dir: str | Path) -> Source:
    run_dir = Path(run_dir)
    fix = "pass the folder of a finished rigsa-run (run.root/run.name, holding config.yaml, results.json, adapter/)"
    if not (run_dir / "results.json").is_file() or not (run_dir / "config.yaml").is_file():
        raise ConfigError(f"adapters: {run_dir} is not a finished run (no results.json or config.yaml there). "
                          f"Fix: {fix}")
    try:  # in today's form: a run written before a key existed has the value then in effect (run_folder.upgraded)
        cfg = OmegaConf.create(upgraded(OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))))
    except Exception as error:
        raise UnreadableFile(run_dir / "config.yaml", f"not a readable config ({type(error).__name__})",
                             "rerun that run's command to rewrite it, or leave the adapter out") from None
    try:
        adapter = read_adapter(run_dir / "adapter")
    except FileNotFoundError:
        raise ConfigError(f"adapters: {run_dir} holds no adapter (its adapter/ folder is missing or empty). "
                          f"Fix: {fix}") from None
    return Source(run_dir, cfg, read_results(run_dir), adapter)


def layer_shapes(adapter: Adapter) -> dict[str, tuple[int, ...]]:
    """The weight shape each layer's delta implies, where its form says it (a sparse delta's does not)."""
    shapes = {}
    for name, delta in adapter.layers.items():
        if isinstance(delta, LowRankDelta):
            shapes[name] = (delta.up.shape[0], delta.down.shape[1])
        elif isinstance(delta, DenseDelta):
            shapes[name] = tuple(delta.delta.shape)
    return shapes


def check_sources(sources: list[Source]) -> None:
    """Refuse a set of adapters that cannot be merged (module docstring), naming the adapter and the fix."""
    first = sources[0]
    model = same_spelling(OmegaConf.to_container(first.cfg.model, resolve=True))
    seen_tasks: dict[str, Path] = {}
    shapes: dict[str, tuple[tuple[int, ...], Path]] = {}
    fingerprints: dict[tuple, tuple[str, Path]] = {}
    for source in sources:
        where = source.run_dir
        other = same_spelling(OmegaConf.to_container(source.cfg.model, resolve=True))
        if other != model:
            raise ConfigError(f"adapters: {where} was trained on model {other.get('name')!r} ({other}), "
                              f"{first.run_dir} on {model.get('name')!r} ({model}): adapters of different base models "
                              "(or tokenizers) cannot be merged. Fix: merge adapters trained on one base model")
        if source.adapter.quantize != first.adapter.quantize:
            raise ConfigError(f"adapters: {where} was trained over the base quantized as "
                              f"{source.adapter.quantize}, {first.run_dir} as {first.adapter.quantize}. Fix: merge "
                              "adapters trained over one base (all full precision, or all one 4-bit setting)")
        if source.cfg.dtype != first.cfg.dtype:
            raise ConfigError(f"adapters: {where} computed in dtype={source.cfg.dtype}, {first.run_dir} in "
                              f"dtype={first.cfg.dtype}. Fix: merge adapters trained in one dtype")
        if source.task in seen_tasks:
            raise ConfigError(f"adapters: {where} and {seen_tasks[source.task]} are both adapters of task "
                              f"{source.task!r}: a merged model keeps one head and one score per task. Fix: merge "
                              "adapters of different tasks")
        seen_tasks[source.task] = where
        for name, shape in layer_shapes(source.adapter).items():
            known = shapes.setdefault(name, (shape, where))
            if known[0] != shape:
                raise ConfigError(f"adapters: layer {name} is {shape} in {where} but {known[0]} in {known[1]}: "
                                  "deltas of different shapes cannot be merged (none is skipped). Fix: merge adapters "
                                  "trained on one base model")
        run_base = source.results.get("base_fingerprint")  # the whole base as the run loaded it, before training
        known_base = fingerprints.setdefault(("run",), (run_base, where)) if run_base else None
        if known_base and known_base[0] != run_base:
            raise ConfigError(f"adapters: {where} was trained from a base model whose weights differ from "
                              f"{known_base[1]}'s (the runs' base fingerprints {run_base[:12]}… and "
                              f"{known_base[0][:12]}…). Fix: merge adapters trained on one base model")
        adapter = source.adapter
        if adapter.base_fingerprint:  # adapters of one format over one set of layers record the same fingerprint
            kind = (adapter.format, tuple(sorted(adapter.layers)), tuple(sorted(adapter.replaced)))
            known_print = fingerprints.setdefault(kind, (adapter.base_fingerprint, where))
            if known_print[0] != adapter.base_fingerprint:
                raise ConfigError(f"adapters: {where} was trained on a base whose weights differ from "
                                  f"{known_print[1]}'s (base fingerprint {adapter.base_fingerprint[:12]}… against "
                                  f"{known_print[0][:12]}…). Fix: merge adapters trained on one base model")


def check_on_base(model, source: Source, loaded_fingerprint: str) -> None:
    """The adapter fits `model` and was trained on it (AdapterMismatch or UnreadableFile otherwise), as apply checks
    it; `model` is the base as the adapters apply to it (a 4-bit base quantized first), `loaded_fingerprint` the
    whole base's as loaded. That one is checked against the source run's: a full fine-tuning adapter replaces every
    parameter, so its own record cannot tell the base, but its delta (new value - base) depends on it."""
    adapter = source.adapter
    check_fits(model, adapter)
    run_base = source.results.get("base_fingerprint")
    if run_base and run_base != loaded_fingerprint:
        raise AdapterMismatch(f"{source.run_dir} was trained from a base model whose weights hash to "
                              f"{run_base[:12]}…, not this one's {loaded_fingerprint[:12]}…: load the base model it was "
                              "trained on")
    if not adapter.base_fingerprint or adapter.fingerprint_before_quantize:
        return  # older records: a dense adapter without one, a QLoRA one hashed before quantizing (apply checks it)
    if adapter.format == PEFT_FORMAT:
        found = fingerprint(model)
    elif adapter.format == SPARSE_FORMAT:
        found = target_fingerprint(model, list(adapter.layers))
    else:
        found = dense_fingerprint(model, list(adapter.layers), list(adapter.replaced))
    refuse_other_base(adapter, found, f" ({source.run_dir})")
