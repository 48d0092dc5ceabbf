"""A memory estimate before the first step: weights, gradients, optimizer state and activations of the composed run,
printed at startup and compared with the device; a run that cannot fit stops with what would make it fit.

Without it a run too big for its machine is OOM-killed (exit 137, no message) or dies in the first backward, after
the model has loaded and the feature cache has been built. The estimate is deliberately simple (a few terms per
component, not a simulation) and meant to be right to within a factor of ~2; it compares against:

- GPU runs: the free memory of this rank's GPU (``torch.cuda.mem_get_info``);
- CPU runs: ``MemAvailable`` of ``/proc/meminfo`` plus the weights already loaded, for all processes of the node.

Overrides (config keys added with ``+``, or environment variables):

- ``+memory_limit_gb=24`` / ``ACESTEP_MEMORY_LIMIT_GB=24``: compare against this many GB instead of the device
  (plan a run for a smaller machine; the tests fake a tiny device with it);
- ``+memory_check=warn`` / ``ACESTEP_MEMORY_CHECK=warn``: print the estimate and warn instead of stopping
  (``off``: not even that).
"""

from __future__ import annotations

import dataclasses
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, OmegaConf

from acestep_train.training.checks import StartupCheckError

log = logging.getLogger(__name__)
GB = 1e9
LATENT_FPS = 25  # latent frames per second (48 kHz audio, hop 1920)
# Values a DiT layer keeps for backward, per token: norms, q/k/v/o of self- and cross-attention, the timestep
# modulation and residuals (~16 x hidden) and the SwiGLU MLP's gate/up/product/down input (~4 x intermediate).
ACT_HIDDEN, ACT_INTERMEDIATE = 16, 4
OPTIMIZER_BYTES = {"adam": 2.0, "adam8bit": 0.5, "sgd": 1.0, "sgd_plain": 0.0}  # state per trainable byte


class MemoryFitError(StartupCheckError):
    """The run's estimated memory exceeds what the device has."""


@dataclass(frozen=True)
class RunShape:
    """What the estimate depends on (all plain numbers, so alternatives are a ``dataclasses.replace`` away)."""

    trainable: int                 # trainable parameter count
    trainable_bytes: int           # their bytes (dtype as trained)
    frozen_bytes: int              # frozen weights on the training device (DiT base, condition encoder, ...)
    host_bytes: int                # VAE + text encoder (host memory on GPU runs, same memory on CPU runs)
    factored_state: int            # Adafactor's row+column statistics (elements), for that optimizer
    dit_base_params: int           # DiT parameter count (for the "LoRA instead of full" alternative)
    hidden: int
    intermediate: int
    layers: int
    patch: int
    batch: int
    clip_seconds: float
    act_bytes: int                 # bytes per activation value (precision)
    mixed: bool                    # autocast: bf16 copies of float32 weights during the forward
    checkpointing: bool
    offload_activations: bool
    optimizer: str                 # adam | adam8bit | adafactor | sgd | sgd_plain
    strategy: str                  # single | ddp | fsdp | fsdp_grad_op | deepspeed2 | deepspeed3
    world: int
    offload_optimizer: bool = False
    offload_parameters: bool = False
    cuda: bool = False
    full: bool = False


@dataclass(frozen=True)
class Estimate:
    weights: float
    gradients: float
    optimizer: float
    activations: float
    host: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def describe(self) -> str:
        return (f"weights {self.weights / GB:.2f} GB + gradients {self.gradients / GB:.2f} GB + optimizer state "
                f"{self.optimizer / GB:.2f} GB + activations {self.activations / GB:.2f} GB = {self.total / GB:.2f} GB")


def activation_bytes(s: RunShape) -> float:
    tokens = s.batch * max(1, -(-int(s.clip_seconds * LATENT_FPS) // s.patch))
    per_layer = tokens * (ACT_HIDDEN * s.hidden + ACT_INTERMEDIATE * s.intermediate) * s.act_bytes
    if s.checkpointing:  # each layer keeps only its input; one layer is recomputed at a time in backward
        kept = 0 if s.offload_activations else s.layers * tokens * s.hidden * s.act_bytes
        return kept + 2 * per_layer
    return s.layers * per_layer + per_layer


def estimate(s: RunShape) -> Estimate:
    """Bytes per process on the training device."""
    shard_all = s.strategy in ("fsdp", "deepspeed3")
    shard_grads = shard_all or s.strategy in ("fsdp_grad_op", "deepspeed2")
    weights = s.frozen_bytes + s.trainable_bytes
    if s.mixed:
        weights += (s.frozen_bytes + s.trainable_bytes) / 2  # autocast bf16 copies of the weights (a bound)
    grads = s.trainable_bytes * (2 if s.strategy == "ddp" else 1)  # DDP: gradient buckets are a second copy
    if s.optimizer == "adafactor":
        opt = s.factored_state * 4.0
    else:
        opt = s.trainable_bytes * OPTIMIZER_BYTES.get(s.optimizer, 2.0)
    if shard_all:
        weights /= s.world
    if shard_grads:
        grads, opt = grads / s.world, opt / s.world
    if s.offload_optimizer:
        opt = 0.0
    if s.offload_parameters:
        weights = 0.0
    host = s.host_bytes if s.cuda else 0.0
    dev_weights = weights + (0.0 if s.cuda else s.host_bytes)
    return Estimate(dev_weights, grads, opt, activation_bytes(s), host)


def alternatives(s: RunShape, model_dtype_bytes: int) -> list[tuple[str, RunShape]]:
    """Changes that shrink the run, each with the shape it would have."""
    out = []
    if s.full:
        lora_frozen = s.frozen_bytes + s.dit_base_params * model_dtype_bytes
        out.append(("mode=lora (adapters instead of full fine-tuning)",
                    dataclasses.replace(s, trainable=0, trainable_bytes=0, frozen_bytes=lora_frozen,
                                        factored_state=0, full=False)))
    if not s.checkpointing:
        out.append(("mode.gradient_checkpointing=true", dataclasses.replace(s, checkpointing=True)))
    if s.optimizer == "adam" and s.trainable:
        out.append(("an 8-bit AdamW or Adafactor optimizer (mode.optimizer)",
                    dataclasses.replace(s, optimizer="adam8bit")))
    if s.batch > 1:
        out.append(("data.batch_size=1", dataclasses.replace(s, batch=1)))
    if s.clip_seconds > 30:
        out.append((f"data.max_duration={s.clip_seconds / 2:g} (shorter crops)",
                    dataclasses.replace(s, clip_seconds=s.clip_seconds / 2)))
    if s.cuda and s.strategy in ("single", "ddp"):
        out.append(("more GPUs with trainer=fsdp or trainer=deepspeed_zero2 (shards weights/optimizer state)",
                    dataclasses.replace(s, strategy="fsdp", world=max(2, s.world * 2))))
    return out


# ---- from the composed config and the built module ---------------------------------------------------------------

def _optimizer_kind(opt_cfg: Any) -> str:
    target = str((opt_cfg or {}).get("_target_", "")).lower()
    if "8bit" in target or "8_bit" in target or "bnb" in target:
        return "adam8bit"
    if "adafactor" in target:
        return "adafactor"
    if "sgd" in target:
        return "sgd" if float((opt_cfg or {}).get("momentum", 0) or 0) else "sgd_plain"
    return "adam"  # AdamW/Adam and anything unknown: two states per trainable value


def _strategy_kind(strategy: Any, world: int) -> tuple[str, bool, bool]:
    """(kind, offload optimizer, offload parameters)."""
    if isinstance(strategy, dict) or OmegaConf.is_config(strategy):
        target = str(strategy.get("_target_", "")).lower()
        if "fsdp" in target:
            sharding = str(strategy.get("sharding_strategy", "FULL_SHARD")).upper()
            kind = {"SHARD_GRAD_OP": "fsdp_grad_op", "NO_SHARD": "ddp"}.get(sharding, "fsdp")
            off = bool(strategy.get("cpu_offload", False))
            return kind, off, off
        if "deepspeed" in target:
            stage = int(strategy.get("stage", 2))
            return ("deepspeed3" if stage == 3 else "deepspeed2", bool(strategy.get("offload_optimizer", False)),
                    bool(strategy.get("offload_parameters", False)) and stage == 3)
        return ("ddp" if world > 1 else "single"), False, False
    name = str(strategy or "auto").lower()
    if "fsdp" in name:
        return "fsdp", False, False
    if "deepspeed" in name:
        return ("deepspeed3" if "3" in name else "deepspeed2"), "offload" in name, "offload" in name and "3" in name
    return ("ddp" if world > 1 else "single"), False, False


def _bytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def _factored(params) -> int:
    return sum((p.shape[0] + p.shape[-1]) if p.dim() >= 2 else p.numel() for p in params)


def run_shape(cfg: DictConfig, module, bundle, world: int) -> RunShape:
    precision = str(cfg.trainer.precision)
    true_half = precision.endswith("-true") and not precision.startswith(("32", "64"))
    trainable = [p for p in module.model.parameters() if p.requires_grad]
    frozen = [p for p in module.model.parameters() if not p.requires_grad]
    half = (lambda n: n // 2) if true_half else (lambda n: n)  # "bf16-true" casts every weight to 2 bytes
    data = cfg.data
    batch = int(data.get("batch_size") or 1)
    if data.get("global_batch_size"):
        batch = max(1, int(data.global_batch_size) // world)
    kind, off_opt, off_par = _strategy_kind(cfg.trainer.strategy, world)
    c = bundle.config
    return RunShape(
        trainable=sum(p.numel() for p in trainable), trainable_bytes=half(_bytes(trainable)),
        frozen_bytes=half(_bytes(frozen)), host_bytes=_bytes(bundle.vae.parameters()) + _bytes(
            bundle.text_encoder.parameters()),
        factored_state=_factored(trainable), dit_base_params=sum(p.numel() for p in module.model.decoder.parameters()),
        hidden=int(c.hidden_size), intermediate=int(c.intermediate_size), layers=int(c.num_hidden_layers),
        patch=int(c.patch_size), batch=batch, clip_seconds=float(data.get("max_duration") or 240.0),
        act_bytes=4 if precision.startswith("32") else 2, mixed="mixed" in precision and not precision.startswith("32"),
        checkpointing=bool(cfg.mode.get("gradient_checkpointing", False)),
        offload_activations=bool(cfg.mode.get("offload_activations", False)),
        optimizer=_optimizer_kind(OmegaConf.to_container(cfg.mode.optimizer, resolve=True)), strategy=kind,
        world=world, offload_optimizer=off_opt, offload_parameters=off_par,
        cuda=str(cfg.trainer.accelerator) in ("gpu", "cuda", "auto") and torch.cuda.is_available(),
        full=cfg.mode.name == "full")


def host_available_bytes() -> float | None:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return float(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        import psutil

        return float(psutil.virtual_memory().available)
    except ImportError:
        return None


def _setting(cfg: DictConfig, key: str, env: str) -> Any:
    value = os.environ.get(env)
    return value if value not in (None, "") else cfg.get(key)


def available(cfg: DictConfig, s: RunShape, est: Estimate, processes_per_node: int) -> tuple[float | None, float, str]:
    """(memory available, memory needed, what was asked) on the training device."""
    limit = _setting(cfg, "memory_limit_gb", "ACESTEP_MEMORY_LIMIT_GB")
    if limit is not None:
        return float(limit) * GB, est.total, f"memory_limit_gb={float(limit):g}"
    if s.cuda:
        free, _ = torch.cuda.mem_get_info(int(os.environ.get("LOCAL_RANK", 0)))
        return float(free), est.total, f"free memory of GPU {os.environ.get('LOCAL_RANK', 0)}"
    host = host_available_bytes()
    resident = est.weights  # already loaded into this process: counted in the estimate, not in MemAvailable
    need = processes_per_node * est.total - resident
    return (None if host is None else host), need, f"available host memory for {processes_per_node} process(es)"


def check_run_fits(cfg: DictConfig, module, bundle, world: int) -> Estimate | None:
    """Print the estimate; raise :class:`MemoryFitError` (listing what would fit) if the device is too small."""
    mode = str(_setting(cfg, "memory_check", "ACESTEP_MEMORY_CHECK") or "refuse").lower()
    if mode == "off":
        return None
    s = run_shape(cfg, module, bundle, world)
    est = estimate(s)
    per_node = 1 if s.cuda else int(world // max(1, int(cfg.trainer.num_nodes)))
    have, need, what = available(cfg, s, est, per_node)
    where = "GPU" if s.cuda else "CPU"
    log.info("memory estimate per process (%s, %s, batch %d x %g s%s): %s%s; %s: %s", where, s.optimizer, s.batch,
             s.clip_seconds, ", gradient checkpointing" if s.checkpointing else "", est.describe(),
             f" (+ {est.host / GB:.2f} GB host memory for the VAE and text encoder)" if s.cuda else "",
             what, "unknown" if have is None else f"{have / GB:.2f} GB")
    if have is None or need <= have:
        return est
    options = [f"{label}: ~{estimate(alt).total / GB:.2f} GB" for label, alt in
               alternatives(s, torch.empty((), dtype=_model_dtype(cfg)).element_size())]
    message = (f"this run needs ~{need / GB:.2f} GB on the {where} ({est.describe()}) but {what} is "
               f"{have / GB:.2f} GB; what would make it fit: " + "; ".join(options or ["a machine with more memory"])
               + " (the estimate is rough: +memory_check=warn runs anyway)")
    if mode == "warn":
        log.warning(message)
        return est
    raise MemoryFitError(message)


def _model_dtype(cfg: DictConfig) -> torch.dtype:
    name = str(OmegaConf.select(cfg, "model.dtype") or "float32").removeprefix("torch.")
    return getattr(torch, name, torch.float32) if isinstance(getattr(torch, name, None), torch.dtype) else torch.float32
