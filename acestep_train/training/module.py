"""One LightningModule for every training mode (LoRA, DoRA, full fine-tuning of the DiT).

Features: variant-correct flow-matching objective (logit-normal t by default, turbo discrete as an option), 15 %
condition dropout to ``null_condition_emb``, silence-latent text2music context with an all-ones chunk mask,
silence timbre unless a reference is given, loss over valid frames only, per-layer gradient checkpointing with
optional CPU offload of saved activations, a deterministic per-step RNG (so an interrupted run resumes
bit-exactly), checkpoints that hold only the trained weights, and a loud stop on a non-finite loss.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict
from typing import Any

import lightning as L
import torch

from datamodules.batch import Batch

from acestep_train.checkpoints.loading import ModelBundle
from acestep_train.training.objective import (ObjectiveConfig, drop_conditions, flow_target, masked_mse, noisy_latents, sample_timesteps,
                        silence_context)

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
            from acestep_train.lora.inject import apply_lora

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
            from acestep_train.training.fp8 import store_frozen_linears_in_fp8

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

    def sample_generators(self, batch: Batch) -> list[torch.Generator]:
        """One RNG per sample, keyed on (seed, micro-batches trained, the sample's position in the *global* batch).

        ``BucketBatchSampler`` deals item k of a global batch to rank ``k % world_size`` as its local item
        ``k // world_size``, so local item i of rank r is global item ``i * world_size + r``. Keyed on that position
        (not on the rank), a DDP step draws for every sample exactly the t, noise and condition dropout that one
        process training the whole global batch draws; keyed on ``batches_trained``, a resumed run draws what the
        uninterrupted one did.
        """
        world = self.trainer.world_size if self._trainer is not None else 1
        gens = []
        for i in range(len(batch)):
            pos = i * world + self.global_rank
            key = hash((self.seed, self.batches_trained, pos, 1))  # a 4-tuple: never step_generator's key
            gens.append(torch.Generator().manual_seed(key % (2**63)))
        return gens

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

    def draws(self, batch: Batch, enc: torch.Tensor, generator: torch.Generator | Sequence[torch.Generator]):
        """Condition dropout, t and noise for a batch: ``(enc, dropped, t, noise)``.

        One generator draws for the whole batch (validation, tests); a list (``sample_generators``) draws sample i
        from ``generator[i]`` alone, exactly what a one-sample batch would draw from it.
        """
        p = self.objective.cfg_dropout
        if isinstance(generator, torch.Generator):
            enc, dropped = drop_conditions(enc, self.model.null_condition_emb, p, generator)
            t = sample_timesteps(len(batch), self.objective, generator)
            return enc, dropped, t, self.padded_noise(batch, generator)
        if len(generator) != len(batch):
            raise ValueError(f"{len(generator)} generators for a batch of {len(batch)}")
        b, t_frames, d = batch.latents.shape
        encs, dropped, t, noise = [], [], [], torch.zeros(b, t_frames, d)
        for i, (g, n) in enumerate(zip(generator, batch.latent_mask.sum(1).tolist())):
            e, drop = drop_conditions(enc[i : i + 1], self.model.null_condition_emb, p, g)
            encs.append(e)
            dropped.append(drop)
            t.append(sample_timesteps(1, self.objective, g))
            noise[i, :n] = torch.randn(int(n), d, generator=g)
        return torch.cat(encs), torch.cat(dropped), torch.cat(t), noise

    def loss_terms(self, batch: Batch,
                   generator: torch.Generator | Sequence[torch.Generator]) -> dict[str, torch.Tensor]:
        x0 = batch.latents
        b, t_frames, _ = x0.shape
        enc, enc_mask = self.conditions(batch)
        enc, dropped, t, noise = self.draws(batch, enc, generator)
        t, noise = t.to(x0.device), noise.to(x0)
        x_t = noisy_latents(x0, noise, t)
        ctx = silence_context(self.silence_latent, b, t_frames).to(x0)
        dit_dtype = self.model.decoder.proj_in[1].weight.dtype
        v = self.model.decoder(x_t.to(dit_dtype), t.to(dit_dtype), t.to(dit_dtype), enc.to(dit_dtype),
                               ctx.to(dit_dtype), attention_mask=batch.latent_mask,
                               encoder_attention_mask=enc_mask)
        loss = masked_mse(v, flow_target(x0, noise), batch.latent_mask)
        return {"loss": loss, "t": t, "dropped": dropped}

    def training_step(self, batch: Batch, batch_idx: int) -> torch.Tensor:
        generator = self.step_generator()  # also keys the global RNG (dropout inside the model) on (seed, step, rank)
        # Per-sample draws make DDP train what one process would; debug=overfit keeps its one fixed batch draw.
        terms = self.loss_terms(batch, generator if self.objective.fixed_draws else self.sample_generators(batch))
        self.batches_trained += 1
        loss, global_loss = self.global_frame_mean(terms["loss"], batch)
        if not torch.isfinite(global_loss):  # every rank sees it (one rank raising alone would hang the others)
            raise FloatingPointError(
                f"non-finite loss ({global_loss.item()}) at global step {self.global_step} (epoch "
                f"{self.current_epoch}, batch {batch_idx}); samples in this batch: {', '.join(batch.ids)}")
        self.log("train/loss", global_loss, prog_bar=True, batch_size=len(batch))
        self.log("train/t_mean", terms["t"].mean(), batch_size=len(batch))
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
