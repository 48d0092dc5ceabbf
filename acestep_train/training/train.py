"""``run(cfg)``: the training job, top to bottom.

seed -> startup checks -> model bundle -> data (+ feature cache) -> module -> memory estimate -> callbacks/loggers
-> trainer -> fit (or resume) -> exports -> run record. SIGTERM/SIGINT/SIGUSR1 during fit -> a checkpoint at the next
step, then exit 128 + signum (``strategies.StopOnSignal``; inside SLURM the warning signal requeues instead).
"""

from __future__ import annotations

import logging
import os
import pickle
from pathlib import Path

import hydra
import lightning as L
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from acestep_train.cli import reported_errors
from acestep_train.training import checks, memory, optimizers
from acestep_train.training.checks import StartupCheckError
from acestep_train.training.builders import build_datamodule, build_module, build_trainer, output_dir, world_size
from acestep_train.checkpoints.loading import load_bundle
from acestep_train.training.module import AceStepModule
from acestep_train.training.features import BundleEncoder
from acestep_train.training.callbacks.run_record import RunRecord
from acestep_train.training.export import export_module
from acestep_train.training.strategies import StopOnSignal, resolve_ckpt_path

log = logging.getLogger(__name__)


def run_startup_checks(cfg: DictConfig) -> None:
    """Fail before any heavy work when the launch and the config disagree."""
    checks.check_no_missing_values(cfg)
    checks.check_ckpt_path(cfg.ckpt_path)
    checks.check_accelerator(_strategy_name(cfg.trainer.strategy), cfg.trainer.accelerator)
    checks.check_strategy_installed(_strategy_name(cfg.trainer.strategy))
    checks.check_fsdp_dtype(_strategy_name(cfg.trainer.strategy), cfg.model.get("dtype"), cfg.trainer.precision,
                            bool(cfg.mode.get("frozen_fp8", False)))
    checks.check_slurm_tasks(cfg.trainer.devices, int(cfg.trainer.num_nodes))
    optimizers.check_available(cfg.mode.get("optimizer"))
    if cfg.data.get("global_batch_size"):
        checks.check_batch_divisible(int(cfg.data.global_batch_size), world_size(cfg))
    if cfg.mode.name != "full":
        checks.check_peft_available()


def _strategy_name(strategy) -> str | None:
    if strategy is None or isinstance(strategy, str):
        return strategy
    return str(strategy.get("_target_", "")).rsplit(".", 1)[-1]


def checkpoint_dir(cfg: DictConfig) -> Path:
    """Where periodic checkpoints (and a signal's ``last.ckpt``) go."""
    return Path(OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath") or output_dir(cfg) / "checkpoints")


def run(cfg: DictConfig) -> dict:
    """Train (or only preprocess) as the composed config says. Returns paths of what it wrote."""
    L.seed_everything(int(cfg.seed), workers=True)
    out = output_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    run_startup_checks(cfg)
    # Catches SIGTERM/SIGINT/SIGUSR1 from here on: a checkpoint at the next step once training runs.
    stopper = StopOnSignal(checkpoint_dir(cfg))
    try:
        return _run(cfg, out, stopper)
    finally:
        stopper.restore()


def _run(cfg: DictConfig, out: Path, stopper: StopOnSignal) -> dict:
    bundle = load_bundle(OmegaConf.to_container(cfg.model, resolve=True))
    datamodule = build_datamodule(cfg)
    accel = "cuda" if cfg.trainer.accelerator in ("gpu", "cuda") and torch.cuda.is_available() else "cpu"
    encoder = BundleEncoder(bundle, device=accel, seed=int(cfg.seed))
    datamodule.connect(encoder)
    if cfg.preprocess_only:
        datamodule.setup("fit")
        encoder.release()
        log.info("feature cache ready: %s", datamodule.manifest_path)
        return {"manifest": datamodule.manifest_path}

    module = build_module(cfg, bundle)
    _apply_start_adapters(cfg, module)
    memory.check_run_fits(cfg, module, bundle, world_size(cfg))
    callbacks = [instantiate(c) for c in (cfg.callbacks or {}).values() if c is not None]
    loggers = [instantiate(c) for c in (cfg.logger or {}).values() if c is not None]
    callbacks += [RunRecord(out, cfg), stopper]
    trainer = build_trainer(cfg, callbacks, loggers)
    ckpt_path = resolve_ckpt_path(cfg.ckpt_path, out, OmegaConf.select(cfg, "callbacks.model_checkpoint.dirpath"))
    # weights_only: a checkpoint is plain data (AtomicCheckpointIO checks it), so no pickle code ever runs on resume.
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except pickle.UnpicklingError as e:  # only the checkpoint is unpickled during fit (the data is safetensors)
        raise StartupCheckError(f"ckpt_path={ckpt_path}: not a plain-data checkpoint of this project, refused "
                                f"without running its code ({str(e).splitlines()[0]})") from e
    encoder.release()

    result = {"output_dir": out}
    if trainer.is_global_zero and cfg.exports and not cfg.trainer.fast_dev_run:
        result["exports"] = export_module(module, out / "exports", list(cfg.exports))
    return result


def _apply_start_adapters(cfg: DictConfig, module: AceStepModule) -> None:
    """Differential LoRA (adapters fused into the base first) and continuing from an exported adapter.

    Each adapter file is checked for NaN/Inf first: otherwise the first loss is NaN and the message blames the
    data samples of that batch."""
    fuse = list(cfg.mode.get("fuse_loras") or [])
    init = cfg.mode.get("init_lora")
    if not fuse and not init:
        return
    from acestep_train.checkpoints.finite import check_finite_weights
    from acestep_train.lora import load_adapter_into_trainable, load_adapters_fused_into_base

    for f in fuse:
        check_finite_weights(f["path"], "mode.fuse_loras adapter")
    if init:
        check_finite_weights(init, "mode.init_lora adapter")
    if fuse:
        load_adapters_fused_into_base(module.model.decoder, [(f["path"], float(f.get("strength", 1.0))) for f in fuse])
    if init:
        load_adapter_into_trainable(module.model.decoder, init)


def main() -> None:
    from acestep_train.checkpoints.variants import CONF_DIR

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    @hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        run(cfg)

    with reported_errors():
        _main()
