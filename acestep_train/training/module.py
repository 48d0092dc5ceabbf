"""One LightningModule for every training mode (LoRA, DoRA, full fine-tuning of the DiT).

Features: variant-correct flow-matching objective (logit-normal t by default, turbo discrete as an option), 15 %
condition dropout to ``null_condition_emb``, silence-latent text2music context with an all-ones chunk mask,
silence timbre unless a reference is given, loss over valid frames only, per-layer gradient checkpointing with
optional CPU offload of saved activations, keyed draws (so an interrupted run resumes bit-exactly), float32
master weights for what trains over a frozen base in its loaded dtype, checkpoints that hold only the trained
weights, and a loud stop on a non-finite loss.

The objective (draws and loss) lives in :class:`~acestep_train.training.objective.Objective`; this module holds
what is Lightning's: the steps, logging, optimizers and checkpoint hooks.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
import torch

from datamodules.batch import Batch

from acestep_train.checkpoints.loading import ModelBundle
from acestep_train.training.dtype_policy import DtypePolicy
from acestep_train.training.objective import Objective, ObjectiveConfig, ObjectiveOutput

log = logging.getLogger(__name__)
MODES = ("lora", "full")


class AceStepModule(L.LightningModule):
    """Fine-tunes the DiT of a :class:`~acestep_train.checkpoints.loading.ModelBundle`.

    Args:
        bundle: the loaded model; its VAE and text encoder are kept outside the module (preprocessing and
            validation audio use them), so Lightning never moves or checkpoints them.
        mode: ``"lora"`` (PEFT adapters on the DiT, base frozen) or ``"full"`` (the whole DiT trains).
        lora: adapter settings for ``mode="lora"``: rank, alpha, dropout, targets (regex), use_dora.
        optimizer: a partial taking the trainable parameters (e.g. ``torch.optim.AdamW`` with lr set).
        scheduler: a partial taking ``(optimizer, total_steps)`` and returning an LR scheduler, or None.
        objective: timestep distribution and condition dropout.
        gradient_checkpointing: recompute each DiT layer in backward instead of storing its activations.
        offload_activations: keep the activations saved for backward in CPU memory.
        seed: base of every key the objective draws with.
        frozen_fp8: hold the frozen linear weights of the DiT and condition encoder in FP8 (LoRA modes only).
    """

    def __init__(
        self,
        bundle: ModelBundle,
        mode: str = "lora",
        lora: dict[str, Any] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        scheduler: Callable[..., Any] | None = None,
        objective: ObjectiveConfig | None = None,
        gradient_checkpointing: bool = False,
        offload_activations: bool = False,
        seed: int = 0,
        frozen_fp8: bool = False,
    ):
        super().__init__()
        if mode not in MODES:
            raise ValueError(f"mode={mode!r}; choose one of {list(MODES)}")
        self.mode = mode
        # ModelBundle is a plain dataclass, so this is an ordinary attribute, not a registered submodule: Lightning
        # moves and checkpoints only registered modules, and the frozen VAE and text encoder must stay where
        # preprocessing and validation put them, out of every checkpoint. The DiT is registered just below.
        self.bundle: ModelBundle = bundle
        self.model = bundle.model
        self.register_buffer("silence_latent", bundle.silence_latent.clone(), persistent=False)
        self.dtypes = DtypePolicy.for_model(bundle.model, dit_trained=mode == "full")
        config = objective or ObjectiveConfig(mu=bundle.config.timestep_mu, sigma=bundle.config.timestep_sigma)
        self.objective = Objective(config, seed=seed, dtypes=self.dtypes)
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self.scheduler_factory = scheduler
        self.lora_settings = dict(lora or {})
        # Micro-batches trained so far (saved in checkpoints): the draws are keyed on it, so a resumed run draws
        # exactly what the uninterrupted run drew.
        self.batches_trained = 0
        # Checkpoints hold only trained tensors; the frozen ones come from model.source again on resume.
        self.strict_loading = False

        self.model.requires_grad_(False)
        self._make_trainable()
        if frozen_fp8:
            self._store_frozen_in_fp8()
        self.model.set_gradient_checkpointing(gradient_checkpointing, offload_activations)
        n_train = sum(p.numel() for p in self.trainable_parameters())
        if n_train == 0:
            raise RuntimeError(f"mode={mode}: no trainable parameters")
        log.info("mode=%s: %s trainable of %s parameters; %s", mode, f"{n_train:,}",
                 f"{sum(p.numel() for p in self.model.parameters()):,}", self.dtypes.describe())

    def _make_trainable(self) -> None:
        """LoRA: adapters on the frozen DiT. Full: the whole DiT, held in the trained dtype (float32 masters; bf16
        compute comes from the trainer's precision)."""
        if self.mode == "lora":
            from acestep_train.lora.inject import apply_lora

            settings = dict(self.lora_settings)
            apply_lora(self.model.decoder, rank=int(settings.pop("rank")), alpha=float(settings.pop("alpha")),
                       dropout=float(settings.pop("dropout", 0.0)), target_modules=settings.pop("targets"),
                       use_dora=bool(settings.pop("use_dora", False)), adapter_dtype=self.dtypes.trained)
            if settings:
                raise ValueError(f"unknown LoRA settings {sorted(settings)}")
        else:
            self.dtypes.hold_trained(self.model.decoder).requires_grad_(True)
        self.dtypes.check_trained(self.trainable_parameters())

    def _store_frozen_in_fp8(self) -> None:
        if self.mode != "lora" or self.lora_settings.get("use_dora"):
            raise ValueError("frozen_fp8 needs mode=lora: full fine-tuning trains the DiT's linears, and DoRA "
                             "reads the base weights to compute its magnitudes")
        from acestep_train.training.fp8 import store_frozen_linears_in_fp8

        n = store_frozen_linears_in_fp8(self.model.decoder) + store_frozen_linears_in_fp8(self.model.encoder)
        log.info("frozen_fp8: %d frozen linear layers stored in float8_e4m3fn", n)

    # ---- steps ------------------------------------------------------------------------------------------------
    def world_size(self) -> int:
        return self.trainer.world_size if self._trainer is not None else 1

    def training_loss(self, batch: Batch) -> ObjectiveOutput:
        """The objective on a training batch, with every draw keyed on (seed, micro-batches trained, position)."""
        step, rank = self.batches_trained, self.global_rank
        # Per-sample draws make DDP train what one process would; debug=overfit keeps its one fixed batch draw.
        generators = self.objective.training_generators(step, len(batch), rank, self.world_size())
        # Dropout inside the model draws from the global RNG: keyed for the step, restored after it.
        with self.objective.model_rng(step, rank, self.device):
            return self.objective(self.model, self.silence_latent, batch, generators)

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        out = self.training_loss(batch)
        self.batches_trained += 1
        loss, global_loss = self.global_frame_mean(out.loss, batch)
        if not torch.isfinite(global_loss):  # every rank sees it (one rank raising alone would hang the others)
            raise FloatingPointError(
                f"non-finite loss ({global_loss.item()}) at global step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {batch_idx}); samples in this batch: {', '.join(batch.ids)}")
        self.log("train/loss", global_loss, prog_bar=True, batch_size=len(batch))
        self.log("train/t_mean", out.t.mean(), batch_size=len(batch))
        self.log("train/frames", batch.latent_mask.sum().float(), batch_size=len(batch), reduce_fx="sum")
        return loss

    def global_frame_mean(self, loss: torch.Tensor, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Rescale this rank's valid-frame mean so that DDP's gradient average is the mean over the valid frames of
        the whole global batch (ranks usually hold different frame counts), and return it with that global loss.

        ``loss * n_local * world / n_global``: averaged over ranks, the gradients are those of
        ``sum(err) / n_global``, the loss one process would compute on the global batch. One scalar-pair all-reduce
        per step; with one process the factor is exactly 1.
        """
        if self._trainer is None or self.trainer.world_size == 1:
            return loss, loss.detach()
        n_local = batch.latent_mask.sum().to(torch.float64)
        stats = torch.stack([n_local, loss.detach().to(torch.float64) * n_local]).to(loss.device)
        n_global, loss_sum = self.trainer.strategy.reduce(stats, reduce_op="sum").tolist()
        scale = float(n_local) * self.trainer.world_size / n_global
        return loss * scale, torch.tensor(loss_sum / n_global, dtype=loss.dtype, device=loss.device)

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        generator = self.objective.validation_generator(batch_idx)  # the same draws every validation
        loss = self.objective(self.model, self.silence_latent, batch, generator).loss
        self.log("val/loss", loss, prog_bar=True, batch_size=len(batch), sync_dist=True)
        return loss

    # ---- optimisation -----------------------------------------------------------------------------------------
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def configure_optimizers(self):
        opt = self.optimizer_factory(self.trainable_parameters())
        if self.scheduler_factory is None:
            return opt
        total = int(self.trainer.estimated_stepping_batches) if self.trainer is not None else 1
        return {"optimizer": opt,
                "lr_scheduler": {"scheduler": self.scheduler_factory(opt, total_steps=max(1, total)),
                                 "interval": "step"}}

    # ---- checkpoints: trained tensors only --------------------------------------------------------------------
    def trainable_state_keys(self) -> set[str]:
        return {n for n, p in self.named_parameters() if p.requires_grad}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["acestep"] = {"batches_trained": self.batches_trained, "mode": self.mode,
                                 "lora": self.lora_settings, "variant": self.bundle.name,
                                 "source": self.bundle.source, "objective": asdict(self.objective.config)}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        saved = checkpoint.get("acestep", {})
        if saved and saved.get("mode") != self.mode:
            raise ValueError(f"checkpoint was trained with mode={saved.get('mode')}, this run uses mode={self.mode}")
        self.batches_trained = int(saved.get("batches_trained", 0))
        expected = self.trainable_state_keys()
        got = set(checkpoint["state_dict"])
        missing, unexpected = sorted(expected - got), sorted(got - expected)
        if missing or unexpected:
            raise ValueError(f"checkpoint does not hold this run's trainable weights: {len(missing)} missing "
                             f"(first: {missing[:3]}), {len(unexpected)} unexpected (first: {unexpected[:3]})")
