"""The inference side of the task classes (:mod:`acestep_train.conditioning.tasks`): one builder per task that turns
a checked request into its task object and output length, the encoders one item asks for, and where each model
component runs.

Each component is called in its own dtype (released weights are bf16, but full fine-tuning keeps the DiT in
float32 while the condition encoder and the null condition stay bf16): inputs are cast to the component's dtype,
outputs come back as float32.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from acestep_train.conditioning.tasks import Cover, Repaint, Semantics, Task, TaskItem, Text2Music, silence_frames
from acestep_train.conditioning.tasks.semantics import CODE_FRAMES
from acestep_train.inference.source_audio import HOP, SAMPLE_RATE

if TYPE_CHECKING:
    from acestep_train.inference.request import GenerationRequest, _Inputs, _Knobs
    from acestep_train.inference.schedules import Schedule

DEFAULT_DURATION_S = 60.0  # DiffSynth's default; the official pipeline picks a random 10-120 s
MAX_DURATION_S = 600.0


def check_duration(seconds: float, what: str) -> None:
    if seconds > MAX_DURATION_S:
        raise ValueError(f"{what} is {seconds:.1f} s, longer than the {MAX_DURATION_S:.0f} s maximum")


def module_device_dtype(module: nn.Module) -> tuple[torch.device, torch.dtype]:
    """Device and dtype of a component's first floating-point parameter."""
    for p in module.parameters():
        if p.is_floating_point():
            return p.device, p.dtype
    raise ValueError(f"{type(module).__name__} has no floating-point parameter to take a dtype from")


def dit_device_dtype(bundle) -> tuple[torch.device, torch.dtype]:
    """Where the DiT (``model.decoder``) runs: the device of every sampler tensor, the dtype of its inputs."""
    return module_device_dtype(bundle.model.decoder)


class ItemEncoders:
    """The encoders of one item (see :class:`acestep_train.conditioning.tasks.Encoders`): float32 ``[T, C]`` out,
    on the DiT's device. ``sample``: VAE-encode with a posterior sample drawn from ``generator`` (else the mean)."""

    def __init__(self, bundle, sample: bool, generator: torch.Generator | None):
        self.bundle, self.sample, self.generator = bundle, sample, generator if sample else None
        self.device, _ = dit_device_dtype(bundle)

    def audio(self, audio: torch.Tensor) -> torch.Tensor:
        """``[2, N]`` 48 kHz -> VAE latents ``[N // 1920, 64]``."""
        lat = self.bundle.vae.encode(audio[None], sample=self.sample, generator=self.generator)
        return lat[0].to(device=self.device, dtype=torch.float32)

    def hints(self, latents: torch.Tensor, crop: bool) -> torch.Tensor:
        model = self.bundle.model
        _, dtype = module_device_dtype(model.tokenizer)
        lat = latents[None].to(dtype)
        if crop:
            return model.latents_to_hints(lat, self.bundle.silence_latent)[0].float()
        quantized, _ = model.tokenizer.tokenize(lat, self.bundle.silence_latent)
        return model.detokenizer(quantized)[0].float()

    def code_hints(self, codes: Sequence[int]) -> torch.Tensor:
        idx = torch.tensor(list(codes), dtype=torch.long, device=self.device)[None]
        return self.bundle.model.codes_to_hints(idx)[0].float()

    def silence(self, frames: int) -> torch.Tensor:
        return silence_frames(self.bundle.silence_latent, frames).to(device=self.device, dtype=torch.float32)


def item_encoders(bundle, plan) -> ItemEncoders:
    """The encoders of a planned item; a posterior sample draws from ``seed + 1`` (the noise uses ``seed``)."""
    gen = torch.Generator(plan.rand_device).manual_seed(plan.seed + 1) if plan.vae_sample else None
    return ItemEncoders(bundle, plan.vae_sample, gen)


def prepare_item(bundle, plan) -> TaskItem:
    """Run the encoders a planned item needs and return its task item (context, start point, hooks)."""
    return plan.task.prepare(item_encoders(bundle, plan), plan.frames, references=plan.references,
                             start_audio=plan.input_audio)


def encode_references(bundle, plan) -> torch.Tensor | None:
    """The item's 30 s reference clips -> ``[n, 750, 64]``; None when it has none (silence timbre)."""
    if not plan.references:
        return None
    enc = item_encoders(bundle, plan)
    return torch.stack([enc.audio(clip) for clip in plan.references])


# ---- planning: one builder per task (the task object and the output length) ------------------------------------

def _text2music(req: GenerationRequest, semantics: Semantics, inputs: _Inputs, schedule: Schedule,
                knobs: _Knobs) -> tuple[Task, int]:
    duration = DEFAULT_DURATION_S if req.duration is None else float(req.duration)
    return Text2Music(), semantics.text2music_frames(duration, SAMPLE_RATE, HOP)


def _cover(req: GenerationRequest, semantics: Semantics, inputs: _Inputs, schedule: Schedule,
           knobs: _Knobs) -> tuple[Task, int]:
    if inputs.codes is not None:
        frames = CODE_FRAMES * len(inputs.codes)
    else:
        frames = semantics.cover_frames(inputs.src.shape[-1] // HOP)
    switch = int(schedule.steps * knobs.cover_strength) if knobs.cover_strength < 1.0 else None
    codes = None if inputs.codes is None else tuple(inputs.codes)
    return Cover(semantics, source=None if codes is not None else inputs.src, codes=codes, switch_step=switch), frames


def _repaint(req: GenerationRequest, semantics: Semantics, inputs: _Inputs, schedule: Schedule,
             knobs: _Knobs) -> tuple[Task, int]:
    src = inputs.src
    src_seconds = src.shape[-1] / SAMPLE_RATE
    ranges = [(s, src_seconds if e is None else e) for s, e in inputs.ranges]
    for i, (s, e) in enumerate(ranges):
        if e <= s:
            raise ValueError(f"repainting_ranges[{i}] = ({s}, {e}) is empty or inverted: end must be after start")
    # Ranges outside the source: zero-pad the source to reach them (padded coordinates from here on).
    pad_left_s = max(0.0, -min(s for s, _ in ranges))
    pad_left = int(pad_left_s * SAMPLE_RATE)
    pad_right = max(int(max(e for _, e in ranges) * SAMPLE_RATE) - src.shape[-1], 0)
    check_duration((src.shape[-1] + pad_left + pad_right) / SAMPLE_RATE, "src_audio padded to the repaint ranges")
    if pad_left or pad_right:
        src = torch.nn.functional.pad(src, (pad_left, pad_right))
    ranges = [(s + pad_left_s, e + pad_left_s) for s, e in ranges]
    frames = src.shape[-1] // HOP
    region = []
    for s, e in ranges:
        a = min(max(int(s * SAMPLE_RATE // HOP), 0), frames - 1)
        region.append((a, min(max(int(e * SAMPLE_RATE // HOP), a + 1), frames)))
    blend = [(int(s * SAMPLE_RATE / HOP), int(e * SAMPLE_RATE / HOP)) for s, e in ranges]
    task = Repaint(semantics, src, tuple(ranges), tuple(region), tuple(blend), pad_samples=(pad_left, pad_right),
                   pad_frames=(pad_left // HOP, pad_right // HOP), strength=knobs.repainting_strength,
                   inject_steps=round(knobs.injection_ratio * schedule.steps),
                   crossfade_frames=knobs.crossfade_frames)
    return task, frames


# A new task: its class in conditioning/tasks and its builder here.
TASK_BUILDERS: dict[str, Callable[..., tuple[Task, int]]] = {
    "text2music": _text2music, "cover": _cover, "repaint": _repaint}
