"""The ``generate`` command's config schema, derived from :class:`~acestep_train.inference.GenerationRequest`.

Every request field is a top-level key defaulting to ``null`` (null = the request's own default: the model's sampling
defaults for steps, shift, schedule and guidance), so the command accepts exactly what a request does and a new
request field needs no config edit. The output, adapter and runtime options follow. ``conf/generate.yaml`` names the
schema first in its defaults list; it is registered in Hydra's ConfigStore as ``generate_schema``.

Values stay untyped (``Any``) on purpose: :func:`acestep_train.inference.generate.build_job` and the sampler's own
validation check them and report a bad one as one ``error:`` line, which a typed field would pre-empt with a raw
OmegaConf traceback. Unknown keys are still refused (the composed config is in struct mode).
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, make_dataclass
from typing import Any

from omegaconf import MISSING

SCHEMA_NAME = "generate_schema"


@dataclass
class GenerateOptions:
    """What ``generate`` takes besides the request fields (comments give the accepted values)."""

    # several captions in one batch, one track each (instead of prompt); @file allowed per item
    prompts: Any = None
    # ---- output
    out: Any = MISSING            # required: a .wav or .flac path (relative to where the command runs)
    spectrogram: Any = True       # <out stem>.png
    sidecar: Any = True           # <out stem>.json
    # ---- LoRA adapters (ours / PEFT folder / DiffSynth / ComfyUI files)
    # [{path: a.safetensors, strength: 0.8}, b.safetensors]; optional format: peft | ...
    adapters: Any = field(default_factory=list)
    fuse_adapters: Any = False    # true: add strength * scale * B @ A into the weights; false: live PEFT adapters
    # ---- runtime
    device: Any = "auto"          # auto (cuda when available) | cpu | cuda | cuda:N
    vram_limit: Any = None        # GB of weights kept on the device; the rest streams from CPU layer by layer
    pin_memory: Any = None        # page-locked CPU copies in low-VRAM mode (null: when computing on CUDA)
    tiled_decode: Any = None      # null: official semantics tile (512/64 frames), diffsynth one pass; low-VRAM: always
    vae_decode_chunk_frames: Any = None    # decode tile size in latent frames (null: 512); lower it for small GPUs
    vae_decode_overlap_frames: Any = None  # discarded context per side (null: 64)
    progress: Any = True          # tqdm bar over the sampling steps
    log_level: Any = "WARNING"
    # ---- filled by the defaults list (conf/model/<variant>.yaml, conf/paths/default.yaml)
    model: Any = None
    paths: Any = None


def request_field_names() -> tuple[str, ...]:
    from acestep_train.inference import GenerationRequest

    return tuple(f.name for f in fields(GenerationRequest))


def generate_config_class() -> type:
    """A dataclass with one ``Any = None`` field per request field (first, in the request's order), then
    :class:`GenerateOptions`' fields."""
    names = request_field_names()
    clash = sorted(set(names) & {f.name for f in fields(GenerateOptions)})
    if clash:
        raise TypeError(f"GenerationRequest fields {clash} collide with generate's own options")
    options = [(f.name, Any, field(default=f.default, default_factory=f.default_factory))
               for f in fields(GenerateOptions)]
    return make_dataclass("GenerateConfig", [(n, Any, field(default=None)) for n in names] + options)


def register_schema() -> None:
    """Store the schema in Hydra's ConfigStore (idempotent: storing again replaces the entry)."""
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=generate_config_class())
