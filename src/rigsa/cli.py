"""Console entry points: `rigsa-run` and `rigsa-merge` (Hydra), `rigsa-assets`, `rigsa-convert-gguf`, `rigsa-report`,
`rigsa-apply`.
No logic lives here."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rigsa.assets import ASSETS, AssetError, fetch_all
from rigsa.cache import UnreadableFile
from rigsa.config import CONF_DIR, check_declared, compose, options, unknown_key_message  # registers the resolvers
from rigsa.forgetting import HubUnreachable
from rigsa.run_folder import RunFolderBusy
from rigsa.vocabulary import ConfigError, EnvironmentFault, environment_fault

# Exit codes: 2 = refused (a bad value, a missing asset or hub, an unreadable file, a busy run folder;
# nothing was written), 1 = the run failed (e.g. training diverged; the last good checkpoint stays), or a sweep
# had a job that failed (the summary names it), 4 = the machine stopped it (a full disk, a read-only or forbidden
# folder: rigsa.vocabulary.EnvironmentFault; what was written stays).
EXIT_FAILED, EXIT_REFUSED, EXIT_ENVIRONMENT = 1, 2, 4
REFUSED = (ConfigError, AssetError, HubUnreachable, UnreadableFile, RunFolderBusy)


def job_or_exit(program: str, run_dir: Path, job, failed: tuple = (), refused: tuple = ()):
    """Run one Hydra job; its errors become the documented exit codes (above), each with one line."""
    try:
        return job()
    except (*REFUSED, *refused, *failed) as error:
        if run_dir.is_dir() and not any(run_dir.iterdir()):
            run_dir.rmdir()  # Hydra creates the folder before a run starts: a refused run leaves none
        print(f"{program}: error: {error}", file=sys.stderr)
        sys.exit(EXIT_FAILED if isinstance(error, failed) else EXIT_REFUSED)
    except (OSError, RuntimeError) as error:
        fault = environment_fault(error, str(run_dir))
        if fault is None:
            raise
        print(f"\n{program}: error: {fault}", file=sys.stderr)  # on its own line after a progress bar
        sys.exit(EXIT_ENVIRONMENT)


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> float:
    from hydra.types import RunMode

    from rigsa.sweep import run_job
    from rigsa.train import TrainingDiverged

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    return job_or_exit("rigsa-run", run_dir, lambda: run_job(cfg, run_dir, in_sweep), failed=(TrainingDiverged,))


def first_value(override) -> str:
    """A parsed override's value; a sweep's first value."""
    if override.is_sweep_override():
        return next(iter(override.sweep_string_iterator()))
    return override.get_value_element_as_str()


def refusal(arguments: list[str]) -> str | None:
    """Why the command would be refused, found before Hydra creates the run folder, or None.

    The config is composed as Hydra will (in a sweep, each swept key at its first value). A key no schema
    declares is named with the valid keys of its node (Hydra's own message names neither). A single run is
    also validated and its run folder inspected, read-only, so a refused command writes nothing; a sweep's
    jobs are each checked when they run (one bad job must not stop the others)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import ConfigCompositionException, OverrideParseException

    from omegaconf import OmegaConf

    from rigsa import forgetting, run_folder
    from rigsa.validate import validate

    sweep = any(argument in ("-m", "--multirun") for argument in arguments)
    overrides = [argument for argument in arguments if argument not in ("-m", "--multirun")]
    if any(argument.startswith("-") for argument in overrides):
        return None  # Hydra's own flags (--cfg, --config-dir, ...): left to Hydra
    try:
        parsed = OverridesParser.create().parse_overrides(overrides)
    except OverrideParseException:
        return None  # Hydra reports a syntax error itself
    if any(item.get_key_element().startswith("hydra") for item in parsed):
        return None  # Hydra's own settings (e.g. hydra.run.dir) decide where the run goes
    first = [f"{'+' if item.is_add() else ''}{item.get_key_element()}={first_value(item)}"
             for item in parsed if not item.is_delete()]
    try:
        cfg = compose(first)
        check_declared(cfg)
        if sweep:
            from rigsa.sweep import shared_folders

            run_folder.check_writable(Path(cfg.run.root))

            sweeper = compose(first, with_hydra=True).hydra.sweeper
            if not sweeper._target_.endswith(".BasicSweeper"):
                from rigsa.validate import check_objective

                check_objective(cfg)  # a search whose objective no trial can compute is refused before the first
                return None  # a search (hparams_search) names its jobs by trial: left to each job
            return shared_folders(overrides, OmegaConf.to_container(sweeper.params) if sweeper.params else None)
        validate(cfg)
        forgetting.check_hub(cfg.eval)
        run_folder.inspect(cfg, Path(cfg.run.root) / cfg.run.name)
        run_folder.check_writable(Path(cfg.run.root))
    except ConfigCompositionException as error:
        cause = error.__cause__
        schema = getattr(cause, "object_type", None)
        if getattr(cause, "full_key", None) and schema is not None and "not in" in str(cause):
            return unknown_key_message(cause.full_key, schema)
        return None  # Hydra's own message (e.g. an unknown group option, with the options listed)
    except REFUSED as error:
        return str(error)
    return None


GROUPS = ("model", "method", "task", "pruning", "eval", "logger", "variant", "experiment", "hparams_search")


def help_text() -> str:
    """`rigsa-run --help`: the config groups and their options, read from the shipped conf/ folder."""
    from omegaconf import OmegaConf

    defaults = {}
    for entry in OmegaConf.load(f"{CONF_DIR}/config.yaml").defaults:
        if not isinstance(entry, str):
            defaults.update(entry)
    lines = ["usage: rigsa-run [group=option ...] [key=value ...] [--multirun]", "",
             "Train an adapter on a frozen language model; measure the new task and the forgetting.", "",
             "Config groups (group=option; * marks the default):"]
    for group in GROUPS:
        listed = [option + ("*" if option == defaults.get(group) else "") for option in options(group)]
        lines.append(f"  {group:<15}{', '.join(listed)}")
    lines += ["", "Examples:",
              "  rigsa-run                                   # the default experiment",
              "  rigsa-run model=tiny method=dora pruning=none task.image_size=7 train.max_steps=20 logger=none",
              "  rigsa-run --multirun method=lora,dora pruning=none seed=0,1",
              "  rigsa-run --multirun experiment=rigsa_fig2_cpu   # a paper figure's sweep (rigsa-report runs/rigsa_cpu)",
              "", "rigsa-run --cfg job prints the composed config; --hydra-help lists Hydra's own flags.",
              "Each run writes runs/<run.name>/: config.yaml, metrics.jsonl, results.json, adapter/, checkpoint/."]
    return "\n".join(lines)


def run_main() -> None:
    if any(flag in sys.argv[1:] for flag in ("--help", "-h")):
        print(help_text())
        return
    try:
        message = refusal(sys.argv[1:])
    except EnvironmentFault as fault:
        print(f"rigsa-run: error: {fault}", file=sys.stderr)
        sys.exit(EXIT_ENVIRONMENT)
    if message:
        print(f"rigsa-run: error: {message}", file=sys.stderr)
        sys.exit(EXIT_REFUSED)
    from rigsa import sweep

    _hydra_main()
    failed = sweep.failed_jobs()
    if failed:  # a sweep whose jobs did not all finish: a scheduler must see it
        print(f"rigsa-run: error: {len(failed)} sweep job(s) failed: " + ", ".join(failed) + ". Fix what their "
              "error.json says and resubmit the same command (finished jobs are not recomputed)", file=sys.stderr)
        sys.exit(EXIT_FAILED)


def assets_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="rigsa-assets",
                                     description="Fetch, verify and cache the offline assets (model, MNIST, GSM8K).")
    parser.add_argument("names", nargs="*", choices=[[]] + sorted(ASSETS), help="assets to fetch (default: all)")
    args = parser.parse_args(argv)
    try:
        for line in fetch_all(args.names or None):
            print(line)
    except AssetError as error:
        print(f"rigsa-assets: error: {error}", file=sys.stderr)
        return 2
    return 0


def convert_gguf_main(argv: list[str] | None = None) -> int:
    """`rigsa-convert-gguf model.gguf out_dir`: a GGUF causal LM as a float32 model folder for model=local."""
    from rigsa.assets import convert_gguf

    parser = argparse.ArgumentParser(prog="rigsa-convert-gguf", description="Dequantize a GGUF causal LM into a "
                                     "float32 safetensors model folder (tokenizer included) for model=local.")
    parser.add_argument("gguf", type=Path, help="the .gguf file")
    parser.add_argument("out", type=Path, help="the model folder to write (must not exist, or be empty)")
    args = parser.parse_args(argv)
    if not args.gguf.is_file():
        print(f"rigsa-convert-gguf: error: {args.gguf} is not a file: pass the path of a .gguf file", file=sys.stderr)
        return 2
    if args.out.exists() and (not args.out.is_dir() or any(args.out.iterdir())):
        print(f"rigsa-convert-gguf: error: {args.out} exists and is not an empty folder: pass a new folder",
              file=sys.stderr)
        return 2
    try:
        convert_gguf(args.gguf, args.out)
    except Exception as error:  # transformers' GGUF reader: an unsupported architecture or a damaged file
        print(f"rigsa-convert-gguf: error: {args.gguf} could not be converted ({type(error).__name__}: "
              f"{str(error).strip().splitlines()[0][:200] if str(error).strip() else ''})", file=sys.stderr)
        return 2
    print(f"model folder: {args.out} (use it with model=local model.path={args.out})")
    return 0


def convert_gguf_entry() -> None:
    sys.exit(convert_gguf_main())


def assets_entry() -> None:
    sys.exit(assets_main())


def report_entry() -> None:
    from rigsa.report import main

    sys.exit(main())


@hydra.main(config_path="conf", config_name="merge", version_base="1.3")
def _merge_hydra_main(cfg: DictConfig) -> float:
    from hydra.types import RunMode

    from rigsa.adapters import AdapterMismatch
    from rigsa.merging.run import merge_run
    from rigsa.sweep import run_job

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    in_sweep = HydraConfig.get().mode == RunMode.MULTIRUN
    return job_or_exit("rigsa-merge", run_dir, lambda: run_job(cfg, run_dir, in_sweep, run=merge_run),
                       refused=(AdapterMismatch,))


def merge_refusal(overrides: list[str]) -> str | None:
    """Why a single `rigsa-merge` would be refused, before Hydra makes its folder and before any model loads."""
    from rigsa import forgetting, run_folder
    from rigsa.merging.run import settings_of
    from rigsa.merging.sources import check_sources, read_source

    try:
        cfg = compose(overrides, config_name="merge")
        check_declared(cfg)
        settings_of(cfg)
        check_sources([read_source(folder) for folder in cfg.adapters])
        forgetting.check_hub(cfg.eval)
        run_folder.inspect(cfg, Path(cfg.run.root) / cfg.run.name)
    except REFUSED as error:
        return str(error)
    except Exception:  # noqa: BLE001  Hydra's own composition errors: Hydra reports them itself
        return None
    return None


def merge_main() -> None:
    """`rigsa-merge`; mergekit=<file> becomes the overrides it stands for (rigsa.merging.mergekit)."""
    from rigsa.merging.mergekit import overrides_from

    arguments = sys.argv[1:]
    for argument in arguments:
        if argument.startswith("mergekit=") and argument != "mergekit=null":
            try:
                sys.argv += overrides_from(argument.split("=", 1)[1])
            except ConfigError as error:
                print(f"rigsa-merge: error: {error}", file=sys.stderr)
                sys.exit(EXIT_REFUSED)
    single = [a for a in sys.argv[1:] if not a.startswith("-")]
    if not any(a in ("-m", "--multirun") for a in sys.argv[1:]) and len(single) == len(sys.argv[1:]):
        message = merge_refusal(single)
        if message:
            print(f"rigsa-merge: error: {message}", file=sys.stderr)
            sys.exit(EXIT_REFUSED)
    from rigsa import sweep

    _merge_hydra_main()
    failed = sweep.failed_jobs()
    if failed:
        print(f"rigsa-merge: error: {len(failed)} sweep job(s) failed: " + ", ".join(failed), file=sys.stderr)
        sys.exit(EXIT_FAILED)


def apply_entry() -> None:
    from rigsa.apply import main

    sys.exit(main())
