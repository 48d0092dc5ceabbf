"""From the composed config to the objects a run needs: the LightningModule, the DataModule, the Trainer.

Shared by the training job and the export command (which rebuilds the module of a checkpoint).
"""

from __future__ import annotations

from pathlib import Path

import lightning as L
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from acestep_train.training import checks
from acestep_train.training.atomic_checkpoint import AtomicCheckpointIO
from acestep_train.training.module import AceStepModule
from acestep_train.training.objective import ObjectiveConfig
from acestep_train.training.strategies import slurm_environment_plugins


def output_dir(cfg: DictConfig) -> Path:
    return Path(OmegaConf.select(cfg, "paths.output_dir"))


def build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = kwargs.get("strategy")
    if isinstance(strategy, dict):
        kwargs["strategy"] = instantiate(strategy)
    return L.Trainer(**kwargs, callbacks=callbacks, logger=loggers or False, default_root_dir=str(output_dir(cfg)),
                     plugins=[AtomicCheckpointIO(), *slurm_environment_plugins()])


def build_module(cfg: DictConfig, bundle) -> AceStepModule:
    mode = cfg.mode
    return AceStepModule(
        bundle=bundle,
        mode="full" if mode.name == "full" else "lora",
        lora=None if mode.lora is None else OmegaConf.to_container(mode.lora, resolve=True),
        optimizer=instantiate(mode.optimizer),
        scheduler=None if mode.scheduler is None else instantiate(mode.scheduler),
        objective=ObjectiveConfig(**OmegaConf.to_container(cfg.objective, resolve=True)),
        gradient_checkpointing=bool(mode.gradient_checkpointing),
        offload_activations=bool(mode.offload_activations),
        seed=int(cfg.seed),
        frozen_fp8=bool(mode.get("frozen_fp8", False)),
    )


def world_size(cfg: DictConfig) -> int:
    return checks.device_count(cfg.trainer.devices) * int(cfg.trainer.num_nodes)


def build_datamodule(cfg: DictConfig):
    """Instantiate ``cfg.data``; ``data.global_batch_size`` (optional) sets the per-device batch size.

    Nested mappings (``data.fields``, ``data.demo``) reach the data module as plain dicts (``_convert_="all"``):
    its hyperparameters go into every checkpoint, and a DictConfig there makes the checkpoint unloadable with
    ``weights_only=True`` (resume, export)."""
    data = OmegaConf.to_container(cfg.data, resolve=True)
    global_batch = data.pop("global_batch_size", None)
    if global_batch:
        data["batch_size"] = int(global_batch) // world_size(cfg)
    return instantiate(data, _convert_="all")
