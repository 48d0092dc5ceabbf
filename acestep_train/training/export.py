"""Exports of a trained run, for the other tools people use.

LoRA / DoRA modes: our own adapter file, a PEFT adapter folder, a ComfyUI file (keys + ``.alpha`` so strength 1.0
means what it meant in training) and a DiffSynth-Studio file. Full fine-tuning: a released-layout checkpoint
folder (``model.safetensors`` with the released key names, ``config.json``, ``silence_latent.pt``) that loads like
any released variant (``model.source=<folder> model.subfolder=""``).

    python -m acestep_train.training.export outputs/tiny-lora/<date>/checkpoints/last.ckpt [--formats peft comfyui] [--out DIR]

The run's resolved ``config.yaml`` (written next to ``checkpoints/``) says which base model to rebuild.
"""

from __future__ import annotations

import argparse
import logging
from pathlib import Path

import torch
from omegaconf import OmegaConf

from acestep_train.checkpoints.checkpoint_io import SILENCE_LATENT_FILE, CheckpointError, save_silence_latent
from acestep_train.checkpoints.loading import save_acestep_model
from acestep_train.cli import UsageError, reported_errors

log = logging.getLogger(__name__)

LORA_FILES = {"acestep": "lora.safetensors", "peft": "peft", "comfyui": "lora_comfyui.safetensors",
              "diffsynth": "lora_diffsynth.safetensors"}
# Formats whose key layout has no place for DoRA magnitudes or LoKr factors.
LORA_ONLY_FORMATS = ("comfyui", "diffsynth")


def export_module(module, out_dir: str | Path, formats: list[str], steps: int | None = None) -> dict[str, Path]:
    """Write a trained :class:`~acestep_train.training.module.AceStepModule`'s exports under ``out_dir``."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    bundle = module.bundle
    if module.mode == "full":
        folder = out_dir / f"{bundle.name}-full-finetune"
        export_full(module.model, bundle.silence_latent, folder, dtype=module.dtypes.released)
        log.info("exported the fine-tuned checkpoint to %s", folder)
        return {"full": folder}

    from acestep_train.lora import export_lora
    from acestep_train.lora.inject import get_spec

    spec = get_spec(module.model.decoder)
    written = {}
    unknown = sorted(set(formats) - set(LORA_FILES))
    if unknown:
        raise UsageError(f"exports={unknown}: unknown format; choose from {sorted(LORA_FILES)}")
    provenance = {"steps": int(module.global_step if steps is None else steps), "sampling": vars(bundle.sampling), "source": bundle.source}
    for fmt in formats:
        if fmt in LORA_ONLY_FORMATS and spec.variant != "lora":
            log.warning("export %s skipped: a %s adapter cannot be expressed in that format (exported as acestep "
                        "and peft instead)", fmt, spec.variant)
            continue
        written[fmt] = export_lora(module.model.decoder, out_dir / LORA_FILES[fmt], format=fmt,
                                   variant=bundle.name, provenance=provenance)
        log.info("exported %s adapter to %s", fmt, written[fmt])
    return written


def export_full(model, silence_latent: torch.Tensor, folder: Path, dtype: torch.dtype | None = None) -> Path:
    """The fine-tuned model in the released layout, every tensor in ``dtype`` (the dtype it was loaded in)."""
    save_acestep_model(model, folder, dtype=dtype)
    save_silence_latent(silence_latent, folder / SILENCE_LATENT_FILE)
    return folder


def module_from_checkpoint(ckpt: Path, config: Path | None = None):
    """Rebuild the run's module (base model from its config) and load the checkpoint's trained weights."""
    from acestep_train.training.builders import build_module
    from acestep_train.checkpoints.loading import load_bundle

    ckpt = Path(ckpt)
    if not ckpt.is_file():
        raise CheckpointError(f"{ckpt}: no such checkpoint (give a .ckpt written by a run, e.g. "
                              "<run>/checkpoints/last.ckpt)")
    config = Path(config) if config else ckpt.parent.parent / "config.yaml"
    if not config.is_file():
        raise CheckpointError(f"{config}: the run's config.yaml is needed to rebuild the base model; pass --config")
    state = load_checkpoint_plain(ckpt)  # before the model is built: a bad file fails fast
    cfg = OmegaConf.load(config)
    module = build_module(cfg, load_bundle(OmegaConf.to_container(cfg.model, resolve=True)))
    module.on_load_checkpoint(state)
    module.load_state_dict(state["state_dict"], strict=False)
    return module, cfg, int(state.get("global_step", 0))


def load_checkpoint_plain(ckpt: Path) -> dict:
    """A Lightning checkpoint loaded with ``weights_only=True`` (no pickle code runs); refusals name the file."""
    import pickle

    try:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{ckpt}: not a training checkpoint that loads safely with weights_only=True "
                              f"({first})") from None
    if not isinstance(state, dict) or "state_dict" not in state:
        raise CheckpointError(f"{ckpt}: not a Lightning training checkpoint (no state_dict)")
    return state


def main(argv: list[str] | None = None) -> None:
    with reported_errors():
        _main(argv)


def _main(argv: list[str] | None) -> None:
    p = argparse.ArgumentParser(prog="python -m acestep_train.training.export", description=__doc__.split("\n\n")[0])
    p.add_argument("ckpt", type=Path, help="a Lightning checkpoint written by training (e.g. checkpoints/last.ckpt)")
    p.add_argument("--config", type=Path, default=None, help="the run's config.yaml (default: next to checkpoints/)")
    p.add_argument("--formats", nargs="+", default=None, help=f"LoRA formats: {sorted(LORA_FILES)}")
    p.add_argument("--out", type=Path, default=None, help="output folder (default: <run>/exports)")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    module, cfg, steps = module_from_checkpoint(args.ckpt, args.config)
    out = args.out or args.ckpt.parent.parent / "exports"
    formats = args.formats or list(cfg.get("exports") or LORA_FILES)
    for fmt, path in export_module(module, out, formats, steps=steps).items():
        print(f"{fmt}: {path}")


if __name__ == "__main__":
    main()
