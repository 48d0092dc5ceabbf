"""What a run saves about itself: the resolved config, the git revision and the dataset manifest hash."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import lightning as L
from omegaconf import DictConfig, OmegaConf

from acestep_train.checkpoints.atomic import write_text_atomic

HERE = Path(__file__).resolve().parent  # git finds the checkout (if any) from here


def git_revision() -> str:
    """``<sha>`` or ``<sha>-dirty``; ``unknown`` outside a git checkout (an installed wheel)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=HERE, capture_output=True, text=True,
                             check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE,
                               capture_output=True, text=True, check=True).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def write_run_record(out: Path, cfg: DictConfig, datamodule) -> Path:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))  # export rebuilds the model from it
    record = {"git_revision": git_revision(),
              "dataset_manifest_hash": getattr(datamodule, "manifest_hash", None),
              "model": OmegaConf.select(cfg, "model.name"), "mode": OmegaConf.select(cfg, "mode.name")}
    path = out / "run.json"
    write_text_atomic(path, json.dumps(record, indent=2, default=str) + "\n")
    return path


class RunRecord(L.Callback):
    """Writes the run record on rank 0 once the data is set up (the manifest hash is known then)."""

    def __init__(self, out: Path, cfg: DictConfig):
        self.out, self.cfg = Path(out), cfg

    def on_fit_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if trainer.is_global_zero:
            write_run_record(self.out, self.cfg, trainer.datamodule)
