"""One LightningModule for every training mode (LoRA, DoRA, full fine-tuning of the DiT).

Features: variant-correct flow-matching objective (logit-normal t by default, turbo discrete as an option), 15 %
condition dropout to ``null_condition_emb``, silence-latent text2music context with an all-ones chunk mask,
silence timbre unless a reference is given, loss over valid frames only, per-layer gradient checkpointing with
optional CPU offload of saved activations, a deterministic per-step RNG (so an interrupted run resumes
bit-exactly), checkpoints that hold only the trained weights, and a loud stop on a non-finite loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import asdict
from typing import Any

import lightning as L
import torch

from datamodules.batch import Batch

from .loading import ModelBundle
from .objective import (ObjectiveConfig, drop_conditions, flow_target, masked_mse, noisy_latents, sample_timesteps,
                        silence_context)

log = logging.getLogger(__name__)
MODES = ("lora", "full")


class AceStepModule(L.LightningModule):
    """Fine-tunes the DiT of a :class:`~acestep_train.loading.ModelBundle`.

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
        seed: base of the per-step RNG.
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
        self.model = bundle.model
        self.register_buffer("silence_latent", bundle.silence_latent.clone(), persistent=False)
        # Not registered as submodules: Lightning must neither move nor checkpoint the frozen encoders.
        self.aux = {"vae": bundle.vae, "text_encoder": bundle.text_encoder, "bundle": bundle}
        self.objective = objective or ObjectiveConfig(mu=bundle.config.timestep_mu,
                                                      sigma=bundle.config.timestep_sigma)
        self.optimizer_factory = optimizer or (lambda params: torch.optim.AdamW(params, lr=1e-4))
        self.scheduler_factory = scheduler
        self.seed = int(seed)
        self.lora_settings = dict(lora or {})
        # Micro-batches trained so far (saved in checkpoints): the per-step RNG is keyed on it, so a resumed run
        # draws exactly what the uninterrupted run drew.
        self.batches_trained = 0
        # Checkpoints hold only trained tensors; the frozen ones come from model.source again on resume.
        self.strict_loading = False

        self.model.requires_grad_(False)
        if mode == "lora":
            from .lora.inject import apply_lora

            settings = dict(self.lora_settings)
            apply_lora(self.model.decoder, rank=int(settings.pop("rank")), alpha=float(settings.pop("alpha")),
                       dropout=float(settings.pop("dropout", 0.0)), target_modules=settings.pop("targets"),
                       use_dora=bool(settings.pop("use_dora", False)))
            if settings:
                raise ValueError(f"unknown LoRA settings {sorted(settings)}")
        else:
            # Full fine-tuning keeps float32 master weights; bf16 compute comes from the trainer's precision.
            self.model.decoder.float().requires_grad_(True)
        if frozen_fp8:
            if mode != "lora" or self.lora_settings.get("use_dora"):
                raise ValueError("frozen_fp8 needs mode=lora: full fine-tuning trains the DiT's linears, and DoRA "
                                 "reads the base weights to compute its magnitudes")
            from .fp8 import store_frozen_linears_in_fp8

            n = store_frozen_linears_in_fp8(self.model.decoder) + store_frozen_linears_in_fp8(self.model.encoder)
            log.info("frozen_fp8: %d frozen linear layers stored in float8_e4m3fn", n)
        self.model.set_gradient_checkpointing(gradient_checkpointing, offload_activations)
        n_train = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        if n_train == 0:
            raise RuntimeError(f"mode={mode}: no trainable parameters")
        log.info("mode=%s: %s trainable of %s parameters", mode, f"{n_train:,}",
                 f"{sum(p.numel() for p in self.model.parameters()):,}")

    # ---- the objective ----------------------------------------------------------------------------------------
    def step_generator(self) -> torch.Generator:
        """An RNG that depends only on (seed, micro-batches trained, rank): a resumed run draws the same t, noise
        and dropout as an uninterrupted one."""
        key = self.seed if self.objective.fixed_draws else hash((self.seed, self.batches_trained, self.global_rank))
        g = torch.Generator()
        g.manual_seed(key % (2**63))
        # Dropout inside the model (e.g. LoRA dropout) draws from the global RNG: key it the same way.
        torch.manual_seed((key + 1) % (2**63))
        return g

    def conditions(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """The packed condition of a batch: exactly the code path the sampler uses."""
        dtype = self.model.encoder.text_projector.weight.dtype
        with torch.no_grad():
            return self.model.encode_conditions(
                batch.text_hidden.to(dtype), batch.text_mask, batch.lyric_embeds.to(dtype), batch.lyric_mask,
                self.silence_latent, None if batch.refer_latents is None else batch.refer_latents.to(dtype))

    @staticmethod
    def padded_noise(batch: Batch, generator: torch.Generator) -> torch.Tensor:
        """Noise drawn item by item over valid frames only, zero on padding: how much a clip is padded cannot
        change the noise its valid frames get (one draw over the padded shape would)."""
        b, t, d = batch.latents.shape
        noise = torch.zeros(b, t, d)
        for i, n in enumerate(batch.latent_mask.sum(1).tolist()):
            noise[i, :n] = torch.randn(int(n), d, generator=generator)
        return noise

    def loss_terms(self, batch: Batch, generator: torch.Generator) -> dict[str, torch.Tensor]:
        x0 = batch.latents
        b, t_frames, _ = x0.shape
        enc, enc_mask = self.conditions(batch)
        enc, dropped = drop_conditions(enc, self.model.null_condition_emb, self.objective.cfg_dropout, generator)
        t = sample_timesteps(b, self.objective, generator, device=x0.device)
        noise = self.padded_noise(batch, generator).to(x0)
        x_t = noisy_latents(x0, noise, t)
        ctx = silence_context(self.silence_latent, b, t_frames).to(x0)
        dit_dtype = self.model.decoder.proj_in[1].weight.dtype
        v = self.model.decoder(x_t.to(dit_dtype), t.to(dit_dtype), t.to(dit_dtype), enc.to(dit_dtype),
                               ctx.to(dit_dtype), attention_mask=batch.latent_mask,
                               encoder_attention_mask=enc_mask)
        loss = masked_mse(v, flow_target(x0, noise), batch.latent_mask)
        return {"loss": loss, "t": t, "dropped": dropped}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        terms = self.loss_terms(batch, self.step_generator())
        self.batches_trained += 1
        loss = terms["loss"]
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"non-finite loss ({loss.item()}) at global step {self.global_step} (epoch {self.current_epoch}, "
                f"batch {batch_idx}); samples in this batch: {', '.join(batch.ids)}")
        self.log("train/loss", loss, prog_bar=True, batch_size=len(batch))
        self.log("train/t_mean", terms["t"].mean(), batch_size=len(batch))
        self.log("train/frames", batch.latent_mask.sum().float(), batch_size=len(batch), reduce_fx="sum")
        return loss

    def validation_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        g = torch.Generator()
        g.manual_seed(self.seed + batch_idx)  # the same draw every validation: curves are comparable
        loss = self.loss_terms(batch, g)["loss"]
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
        names = {n for n, p in self.named_parameters() if p.requires_grad}
        return names

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        keep = self.trainable_state_keys()
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in keep}
        checkpoint["acestep"] = {"batches_trained": self.batches_trained, "mode": self.mode, "lora": self.lora_settings, "variant": self.aux["bundle"].name,
                                 "source": self.aux["bundle"].source, "objective": asdict(self.objective)}

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
