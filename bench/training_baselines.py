"""Reference training loops that ``bench_training.py`` times our pipeline against. Plain PyTorch, no Lightning.

* :func:`diffsynth_style_train`: what DiffSynth-Studio's ACE-Step trainer does per step
  (``examples/ace_step/model_training/train.py`` + ``diffsynth/diffusion/{runner,loss}.py``; ``docs/training.md`` §4):
  batch 1 (``collate_fn=lambda x: x[0]``), the audio file decoded and resampled to 48 kHz in the dataset every step,
  VAE encode with a posterior ``.sample()``, the text encoder (caption prompt, full pass) and lyric embeddings, the
  frozen condition encoder with ``silence_latent[:, :750]`` as timbre, silence context + all-ones chunk mask, one t
  per step from the 1000 shift-3 sigmas with DiffSynth's loss weight, an unmasked MSE, ``AdamW`` +
  ``ConstantLR``, no gradient clipping, no cache. Same model, LoRA, gradient checkpointing and optimizer settings
  as the run it is compared with; the text/VAE/condition code is ours (the same functions our cache uses), so
  the two sides differ only in *when* the frozen encoders run and how batches are formed.
* :func:`bare_train`: the minimum a hand-written loop needs for our objective on cached batches: condition
  encoder + DiT forward, condition dropout, masked MSE, backward, clip, AdamW step, LR schedule step. It iterates
  over the same ``DataLoader`` (same sampler, collate and cache files) as the Lightning run it is compared with.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.data import DataLoader, Dataset

from acestep_train.conditioning.text import encode_text_conditions
from acestep_train.lora.inject import apply_lora
from acestep_train.conditioning.tasks import Text2Music
from datamodules.audio import SAMPLE_RATE, load_audio


@dataclass
class LoopSettings:
    """What both sides of a comparison share: LoRA, gradient checkpointing, optimizer."""

    lora: dict  # rank, alpha, dropout, targets, use_dora
    gradient_checkpointing: bool
    lr: float
    weight_decay: float


def prepare_model(bundle, s: LoopSettings) -> list[torch.nn.Parameter]:
    """Freeze the bundle's model, put LoRA on the DiT (exactly as ``AceStepModule`` does) and return the
    trainable parameters."""
    model = bundle.model
    model.requires_grad_(False)
    lora = dict(s.lora)
    apply_lora(model.decoder, rank=int(lora["rank"]), alpha=float(lora["alpha"]),
               dropout=float(lora.get("dropout", 0.0)), target_modules=lora["targets"],
               use_dora=bool(lora.get("use_dora", False)))
    model.set_gradient_checkpointing(s.gradient_checkpointing)
    model.train()
    return [p for p in model.parameters() if p.requires_grad]


# ---- DiffSynth-style: re-encode everything every step, batch 1 ----------------------------------------------------

class _AudioRows(Dataset):
    """DiffSynth's ``UnifiedDataset`` + ``LoadPureAudioWithTorchaudio(48000)``: the file is read and resampled in
    ``__getitem__``, i.e. once per training step."""

    def __init__(self, records):
        self.records = list(records)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, i):
        rec = self.records[i]
        return {"audio": load_audio(rec.audio), "record": rec}


def diffsynth_shift3_table(n: int = 1000, shift: float = 3.0) -> tuple[torch.Tensor, torch.Tensor]:
    """DiffSynth's training sigmas and per-sigma loss weights (``docs/training.md`` §2)."""
    s = torch.linspace(1.0, 0.0, n + 1)[:-1]
    sigma = shift * s / (1 + (shift - 1) * s)
    y = torch.exp(-2 * ((sigma * n - n / 2) / n) ** 2)
    w = (y - y.min()) * n / (y - y.min()).sum()
    return sigma, w


def diffsynth_style_train(bundle, records, epochs: int, s: LoopSettings, seed: int = 0,
                          on_step: Callable[[int], None] | None = None) -> dict:
    """Train ``epochs`` passes over ``records`` the DiffSynth way. Returns the step count, the last loss and the
    seconds ``spent`` in each re-encoding phase (audio decode, VAE, text encoder, condition encoder) and in the
    whole loop."""
    torch.manual_seed(seed)
    params = prepare_model(bundle, s)
    model, vae, te = bundle.model, bundle.vae, bundle.text_encoder
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    sched = torch.optim.lr_scheduler.ConstantLR(opt)
    sigmas, weights = diffsynth_shift3_table()
    loader = DataLoader(_AudioRows(records), shuffle=True, collate_fn=lambda x: x[0], num_workers=0,
                        generator=torch.Generator().manual_seed(seed))
    dtype = model.decoder.proj_in[1].weight.dtype
    steps, loss = 0, torch.tensor(float("nan"))
    spent = {"audio_decode_s": 0.0, "vae_s": 0.0, "text_encoder_s": 0.0, "condition_encoder_s": 0.0}
    t_loop = time.perf_counter()
    for _ in range(epochs):
        t_fetch = time.perf_counter()
        for data in loader:
            t0 = time.perf_counter()
            spent["audio_decode_s"] += t0 - t_fetch
            rec, audio = data["record"], data["audio"]
            duration = math.floor(audio.shape[-1] / SAMPLE_RATE)  # DiffSynth: floor(samples / rate)
            with torch.no_grad():
                # InputAudioEmbedder: VAE encode of the whole clip, posterior sample, cropped to the context length.
                x0 = vae.encode(audio[None].clamp(-1, 1), sample=True)
                frames = round(duration * SAMPLE_RATE / vae.hop_length)
                x0 = x0[:, :frames].to(dtype)
                t1 = time.perf_counter()
                # PromptEmbedder (caption prompt -> Qwen3, lyric prompt -> embed_tokens) + ConditionEmbedder.
                text = encode_text_conditions(
                    te, [rec.prompt], [rec.lyrics], bpm=[rec.bpm or 100], keyscale=[rec.keyscale or "C major"],
                    timesignature=[rec.timesignature or "4"], duration=[duration],
                    vocal_language=[rec.vocal_language or "unknown"])
                t_text = time.perf_counter()
                enc, enc_mask = model.encode_conditions(
                    text.text_hidden.to(dtype), text.text_mask, text.lyric_embeds.to(dtype), text.lyric_mask,
                    bundle.silence_latent)
                t2 = time.perf_counter()
            # ContextLatentBuilder: silence source + all-ones chunk mask.
            ctx = Text2Music().context(bundle.silence_latent, 1, x0.shape[1]).to(x0)
            # FlowMatchSFTLoss: one sigma per step, x_t = (1 - s) x0 + s noise, target noise - x0, weighted MSE.
            i = int(torch.randint(0, len(sigmas), (1,)))
            t = sigmas[i].reshape(1).to(dtype)
            noise = torch.randn_like(x0)
            x_t = (1 - t) * x0 + t * noise
            # DiffSynth's DiT takes no padding masks (batch 1 has none).
            v = model.decoder(x_t, t, t, enc.to(dtype), ctx, attention_mask=None, encoder_attention_mask=None)
            loss = torch.nn.functional.mse_loss(v.float(), (noise - x0).float()) * weights[i]
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad()
            steps += 1
            t_fetch = time.perf_counter()
            spent["vae_s"] += t1 - t0
            spent["text_encoder_s"] += t_text - t1
            spent["condition_encoder_s"] += t2 - t_text
            if on_step is not None:
                on_step(steps)
    spent["loop_s"] = time.perf_counter() - t_loop
    return {"steps": steps, "last_loss": float(loss), "spent": spent}


# ---- bare loop on cached batches -----------------------------------------------------------------------------

def bare_train(bundle, loader: DataLoader, steps: int, s: LoopSettings, scheduler_factory=None, *,
               mu: float = -0.4, sigma: float = 1.0, cfg_dropout: float = 0.15, clip: float = 1.0,
               seed: int = 0) -> dict:
    """``steps`` optimizer steps over ``loader`` (re-iterated per epoch like Lightning does, with
    ``batch_sampler.set_epoch``). Returns per-step ``start``/``end`` timestamps (start = right after the batch is
    fetched, end = after the optimizer/scheduler step: the points where Lightning calls ``on_train_batch_start`` /
    ``on_train_batch_end``), the same in process CPU time, and the seconds spent in the condition encoder per step."""
    torch.manual_seed(seed)
    params = prepare_model(bundle, s)
    model = bundle.model
    opt = torch.optim.AdamW(params, lr=s.lr, weight_decay=s.weight_decay)
    sched = scheduler_factory(opt, total_steps=steps) if scheduler_factory is not None else None
    silence = bundle.silence_latent
    null = model.null_condition_emb
    starts, ends, cpu_starts, cpu_ends, cond_s = [], [], [], [], []
    done, epoch = 0, 0
    while done < steps:
        if hasattr(loader.batch_sampler, "set_epoch"):
            loader.batch_sampler.set_epoch(epoch)
        for batch in loader:
            t0, c0 = time.perf_counter(), time.process_time()
            x0, mask = batch.latents, batch.latent_mask
            b = x0.shape[0]
            with torch.no_grad():
                enc, enc_mask = model.encode_conditions(batch.text_hidden, batch.text_mask, batch.lyric_embeds,
                                                        batch.lyric_mask, silence)
            t1 = time.perf_counter()
            drop = (torch.rand(b) < cfg_dropout)[:, None, None]
            enc = torch.where(drop, null.expand_as(enc), enc)
            t = torch.sigmoid(torch.randn(b) * sigma + mu)
            m = mask[..., None].to(x0.dtype)
            noise = torch.randn_like(x0) * m
            tt = t[:, None, None]
            x_t = tt * noise + (1 - tt) * x0
            ctx = Text2Music().context(silence, b, x0.shape[1]).to(x0)
            v = model.decoder(x_t, t, t, enc, ctx, attention_mask=mask, encoder_attention_mask=enc_mask)
            loss = ((v - (noise - x0)) ** 2 * m).sum() / (m.sum() * x0.shape[-1])
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, clip)
            opt.step()
            if sched is not None:
                sched.step()
            opt.zero_grad(set_to_none=True)
            ends.append(time.perf_counter())
            cpu_ends.append(time.process_time())
            starts.append(t0)
            cpu_starts.append(c0)
            cond_s.append(t1 - t0)
            done += 1
            if done >= steps:
                break
        epoch += 1
    return {"start": starts, "end": ends, "cpu_start": cpu_starts, "cpu_end": cpu_ends, "cond_s": cond_s,
            "last_loss": float(loss)}
