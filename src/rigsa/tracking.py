"""Where a run's numbers go: metrics.jsonl and results.json in the run directory, and W&B.

W&B modes: `auto` is online when an API key is configured and offline otherwise (no login
prompt, ever); `offline` writes a local run under <run dir>/wandb that `wandb sync` can upload;
`disabled` starts nothing. A resumed run continues the same W&B run (its id is kept in the run
directory).
"""
from __future__ import annotations

import json
import logging
import math
import netrc
import os
import uuid
from pathlib import Path
from urllib.parse import urlparse

from omegaconf import DictConfig, OmegaConf

from rigsa.cache import UnreadableFile, write_text_atomically

log = logging.getLogger(__name__)


def _clean(value):
    """JSON-safe: NaN/inf become null (results.json must parse everywhere)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(item) for item in value]
    return value


def _wandb_key_configured() -> bool:
    """True when W&B has an API key (environment or ~/.netrc), i.e. `wandb login` was done."""
    if os.environ.get("WANDB_API_KEY"):
        return True
    host = urlparse(os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")).hostname
    try:
        return netrc.netrc().authenticators(host) is not None
    except (FileNotFoundError, netrc.NetrcParseError, OSError):
        return False


def wandb_mode(requested: str) -> str:
    if requested != "auto":
        return requested
    if os.environ.get("WANDB_MODE"):
        return os.environ["WANDB_MODE"]
    return "online" if _wandb_key_configured() else "offline"


class Tracker:
    def __init__(self, cfg: DictConfig, run_dir: Path, resume_step: int = 0):
        self.run_dir = run_dir
        self.metrics_path = run_dir / "metrics.jsonl"
        self._truncate_after(resume_step)
        self.wandb_run = None
        if cfg.logger.name == "wandb" and wandb_mode(cfg.logger.mode) != "disabled":
            import wandb

            id_file = run_dir / "wandb_id.txt"
            run_id = id_file.read_text().strip() if id_file.exists() else uuid.uuid4().hex[:12]
            id_file.write_text(run_id)
            self.wandb_run = wandb.init(
                project=cfg.logger.project, entity=cfg.logger.entity, id=run_id, resume="allow",
                name=cfg.run.name, group=cfg.report.name, dir=str(run_dir), mode=wandb_mode(cfg.logger.mode),
                config=OmegaConf.to_container(cfg, resolve=True), settings=wandb.Settings(silent=True))
            log.info("W&B run %s (%s)", run_id, wandb_mode(cfg.logger.mode))

    def _truncate_after(self, step: int) -> None:
        """On resume, drop lines logged after the checkpoint: they are logged again. Remember what is kept,
        so a line logged `once` (a phase's imp/* row) is not written twice."""
        self.kept: set[tuple[int, tuple[str, ...]]] = set()
        if not self.metrics_path.exists():
            return
        kept = []
        lines = self.metrics_path.read_text(errors="replace").splitlines()
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
                if not isinstance(record, dict):
                    raise ValueError("not an object")
            except ValueError:
                if number == len(lines):  # a kill while the line was written: it is logged again
                    log.warning("%s: dropped a partial last line", self.metrics_path)
                    continue
                raise UnreadableFile(self.metrics_path, f"line {number} is not a JSON object",
                                     "delete the file (the run's checkpoints and results do not depend on it) "
                                     "or pass run.overwrite=true") from None
            if record.get("step", 0) <= step:
                kept.append(line)
                self.kept.add((record.pop("step", 0), tuple(sorted(record))))
        self.metrics_path.write_text("".join(line + "\n" for line in kept))

    def log(self, metrics: dict, step: int, once: bool = False) -> None:
        """Append one line to metrics.jsonl (and W&B). once=True: not when a kept line already holds these keys at
        this step (a resumed run replays finished phases)."""
        if once and (step, tuple(sorted(metrics))) in self.kept:
            return
        with open(self.metrics_path, "a") as handle:
            handle.write(json.dumps(_clean({"step": step, **metrics})) + "\n")
        if self.wandb_run is not None:
            self.wandb_run.log(metrics, step=step)

    def finish(self, results: dict, adapter_dir: Path | None, log_adapter: bool) -> None:
        write_json(self.run_dir / "results.json", results)
        if self.wandb_run is None:
            return
        import wandb

        for key, value in flatten(results).items():
            if isinstance(value, (int, float, str, bool)) or value is None:
                self.wandb_run.summary[key] = value
        if results.get("forgetting"):
            columns = ["task", "metric", "base", "adapted", "forgetting", "forget_ratio", "collapsed"]
            rows = [[task, metric, row["base"], row["adapted"], row["forgetting"], row["forget_ratio"], row["collapsed"]]
                    for task, metrics in results["forgetting"]["tasks"].items() for metric, row in metrics.items()]
            self.wandb_run.log({"forgetting": wandb.Table(columns=columns, data=rows)})
        if log_adapter and adapter_dir is not None and adapter_dir.exists():
            artifact = wandb.Artifact(f"adapter-{self.wandb_run.id}", type="adapter")
            artifact.add_dir(str(adapter_dir))
            self.wandb_run.log_artifact(artifact)
        self.wandb_run.finish()


def flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            flat.update(flatten(value, name + "."))
        else:
            flat[name] = value
    return flat


def write_json(path: Path, data: dict) -> None:
    write_text_atomically(path, json.dumps(_clean(data), indent=2))
