"""Console entry points: `rigsa-run` (Hydra) and `rigsa-assets`. No logic lives here."""
from __future__ import annotations

import argparse
import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rigsa.assets import ASSETS, AssetError, fetch_all
from rigsa.config import ConfigError
from rigsa.forgetting import HubUnreachable


@hydra.main(config_path="conf", config_name="config", version_base="1.3")
def _hydra_main(cfg: DictConfig) -> None:
    from rigsa.run import run

    try:
        run(cfg, HydraConfig.get().runtime.output_dir)
    except (ConfigError, AssetError, HubUnreachable) as error:
        print(f"rigsa-run: error: {error}", file=sys.stderr)
        sys.exit(2)


GROUPS = ("model", "method", "task", "pruning", "eval", "logger")


def help_text() -> str:
    """`rigsa-run --help`: the config groups and their options, read from the shipped conf/ folder."""
    from omegaconf import OmegaConf

    from rigsa.config import CONF_DIR, options

    defaults = {}
    for entry in OmegaConf.load(f"{CONF_DIR}/config.yaml").defaults:
        if not isinstance(entry, str):
            defaults.update(entry)
    lines = ["usage: rigsa-run [group=option ...] [key=value ...] [--multirun]", "",
             "Train an adapter on a frozen language model; measure the new task and the forgetting.", "",
             "Config groups (group=option; * marks the default):"]
    for group in GROUPS:
        listed = [option + ("*" if option == defaults.get(group) else "") for option in options(group)]
        lines.append(f"  {group:<8} {', '.join(listed)}")
    lines += ["", "Examples:",
              "  rigsa-run                                   # the default experiment",
              "  rigsa-run model=tiny method=dora task.image_size=7 train.max_steps=20 logger=none",
              "  rigsa-run --multirun method=lora,dora seed=0,1",
              "", "rigsa-run --cfg job prints the composed config; --hydra-help lists Hydra's own flags.",
              "Each run writes runs/<run.name>/: config.yaml, metrics.jsonl, results.json, adapter/, checkpoint/."]
    return "\n".join(lines)


def run_main() -> None:
    if any(flag in sys.argv[1:] for flag in ("--help", "-h")):
        print(help_text())
        return
    _hydra_main()


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


def assets_entry() -> None:
    sys.exit(assets_main())


def apply_entry() -> None:
    from rigsa.apply import main

    sys.exit(main())
