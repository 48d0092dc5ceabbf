"""Render fixed prompts with fixed seeds through the same sampler as ``generate``, so progress can be heard.

At step 0 (before any update) and every ``every_n_steps`` optimizer steps, on rank 0 only, each prompt is
rendered with the variant's own steps and guidance; ``<run>/validation_audio/step_NNNNNN/`` receives a wav, a
mel-spectrogram PNG and a JSON sidecar per prompt, and both are logged to every attached wandb / TensorBoard
logger.

What each model part renders in is the module's dtype policy (``module.dtypes``: the dtypes its weights are held
in); the render runs outside autocast, so the trainer's mixed precision does not override it.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from acestep_train.inference.audio_files import png_as_array, save_spectrogram_png, write_audio, write_sidecar

log = logging.getLogger(__name__)


def _slug(text: str, n: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")[:n] or "prompt"


class ValidationAudio(L.Callback):
    """Args:
        prompts: requests as mappings of ``GenerationRequest`` fields (prompt, lyrics, duration, seed, bpm, ...).
        every_n_steps: render after every this many optimizer steps (0: only at step 0 and at the end).
        at_start: also render before the first update (the baseline to compare against).
        at_end: render once more when training ends.
        output_subdir: folder under the run directory.
        overrides: request fields applied to every prompt (e.g. fewer steps for quick CPU runs).
    """

    def __init__(self, prompts: list[dict[str, Any]], every_n_steps: int = 500, at_start: bool = True,
                 at_end: bool = True, output_subdir: str = "validation_audio",
                 overrides: dict[str, Any] | None = None, output_dir: str | None = None):
        if not prompts:
            raise ValueError("ValidationAudio needs at least one prompt")
        self.prompts = [dict(p) for p in prompts]
        self.every_n_steps = int(every_n_steps)
        self.at_start = at_start
        self.at_end = at_end
        self.output_subdir = output_subdir
        self.overrides = dict(overrides or {})
        self.output_dir = output_dir
        self._rendered: set[int] = set()
        self.written: list[Path] = []

    # ---- hooks ------------------------------------------------------------------------------------------------
    def on_train_start(self, trainer: L.Trainer, module: L.LightningModule) -> None:
        if self.at_start and trainer.global_step == 0:
            self.render(trainer, module)

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        step = trainer.global_step
        if self.every_n_steps > 0 and step > 0 and step % self.every_n_steps == 0:
            self.render(trainer, module)

    def on_train_end(self, trainer, module) -> None:
        if self.at_end:
            self.render(trainer, module)

    # ---- rendering --------------------------------------------------------------------------------------------
    def run_dir(self, trainer: L.Trainer) -> Path:
        return Path(self.output_dir or trainer.default_root_dir) / self.output_subdir

    @torch.no_grad()
    def render(self, trainer: L.Trainer, module: L.LightningModule) -> list[Path]:
        step = trainer.global_step
        if step in self._rendered or trainer.sanity_checking:
            return []
        self._rendered.add(step)
        if not trainer.is_global_zero:
            return []
        from acestep_train.inference import GenerationRequest, Sampler

        bundle = module.bundle
        device = module.device
        if len(self._rendered) == 1:  # the first render: say once what it runs in
            dtypes = module.dtypes.sampler_dtypes()
            log.info("validation audio renders with %s", ", ".join(f"{part} in {dtype}" for part, dtype in dtypes.items()))
        moved = [m for m in (bundle.vae, bundle.text_encoder) if next(m.parameters()).device != device]
        was_training = module.training
        module.eval()
        try:
            for m in moved:
                m.to(device)
            sampler = Sampler(bundle)
            requests = [GenerationRequest(**{**p, **self.overrides}) for p in self.prompts]
            with torch.autocast(device.type, enabled=False):  # the dtype policy, not the trainer's precision
                result = sampler(requests, progress=False)
        finally:
            for m in moved:
                m.to("cpu")
            module.train(was_training)
        out = self.run_dir(trainer) / f"step_{step:06d}"
        files = []
        for i, (req, audio, params) in enumerate(zip(requests, result.tracks(), result.params)):
            stem = out / f"{i:02d}_{_slug(req.prompt)}"
            wav = write_audio(stem.with_suffix(".wav"), audio, 48000)
            png = save_spectrogram_png(stem.with_suffix(".png"), audio, 48000, title=f"step {step}: {req.prompt}")
            write_sidecar(stem.with_suffix(".json"), {"step": step, **params})
            files += [wav, png]
            self._log(trainer, i, req.prompt, audio, wav, png, step)
        self.written += files
        log.info("validation audio for step %d written to %s", step, out)
        return files

    def _log(self, trainer, i, prompt, audio, wav, png, step) -> None:
        for logger in trainer.loggers:
            if isinstance(logger, WandbLogger):
                import wandb

                logger.experiment.log({f"validation_audio/{i:02d}": wandb.Audio(str(wav), sample_rate=48000,
                                                                                 caption=prompt),
                                       f"validation_spectrogram/{i:02d}": wandb.Image(str(png), caption=prompt),
                                       "trainer/global_step": step})
            elif isinstance(logger, TensorBoardLogger):
                exp = logger.experiment
                exp.add_audio(f"validation_audio/{i:02d}", audio.float().mean(0, keepdim=True).cpu(),
                              global_step=step, sample_rate=48000)
                exp.add_image(f"validation_spectrogram/{i:02d}", png_as_array(png), global_step=step,
                              dataformats="HWC")
                exp.flush()
