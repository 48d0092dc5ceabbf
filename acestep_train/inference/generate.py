"""``python -m acestep_train.inference.generate``: generate music from the command line (``conf/generate.yaml``).

    python -m acestep_train.inference.generate model=turbo prompt="lo-fi piano" lyrics=@lyrics.txt duration=60 seed=42 \\
        out=song.wav
    python -m acestep_train.inference.generate model=xl-sft prompt=@caption.txt seed=[1,2,3] out=takes/song.flac \\
        adapters=[{path:style.safetensors,strength:0.8}] vram_limit=6

Per track: the audio (``.wav`` 32-bit float or ``.flac`` 24-bit; the sampler already anti-clips and peak-normalises
each track to -1 dBFS, so it is written as returned), ``<stem>.png`` (mel spectrogram) and ``<stem>.json`` (the
request to pass back to :class:`~acestep_train.inference.GenerationRequest`, every resolved parameter, the seed, the
model and the adapters with path, strength, format and SHA-256). Several tracks (``seed=[…]`` and/or
``prompts=[…]``) are sampled as one batch and written as ``<stem>_0<suffix>``, ``<stem>_1<suffix>`` …

Everything that can be checked without the weights is checked before they are loaded (the request through the
sampler's own validation against the variant's config, ``@file`` values, audio inputs, the output path, adapter files
matched against the DiT built on the meta device); a bad input prints one ``error:`` line and exits with status 2.

``vram_limit`` (GB) turns on low-VRAM mode (:mod:`acestep_train.inference.offload`): weights load on the CPU, only what fits
stays on the compute device, the rest streams layer by layer, and VAE decoding is tiled.

Python: :func:`run` takes the composed config and returns the sidecars; :func:`build_job` turns a config into
requests and output paths without loading anything.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import logging
import math
import os
import shlex
import sys
import time
import types
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import fields
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

from acestep_train.inference.generate_job import AdapterSpec, GenerateError, build_job, plain
from acestep_train.inference.generate_schema import register_schema

register_schema()  # before anything composes conf/generate.yaml (the CLI below, tests, Python callers)

log = logging.getLogger(__name__)

EXIT_BAD_INPUT = 2
NORMALIZATION = "sampler: anti-clip (divide by the peak when > 1), then peak -1 dBFS per track"


# ---- checks before loading -------------------------------------------------------------------------------------

def _light_bundle(model_cfg: Mapping):
    """What request validation reads from a bundle (sampling defaults, architecture), without any weights."""
    from acestep_train.checkpoints.loading import SamplingDefaults, arch_from_cfg

    sampling = SamplingDefaults(**{k: (tuple(v) if k == "guidance_interval" else v)
                                   for k, v in dict(model_cfg.get("sampling") or {}).items()})
    return types.SimpleNamespace(sampling=sampling, config=arch_from_cfg(model_cfg["arch"]), name=model_cfg.get("name"))


def precheck_requests(requests: Sequence[Any], model_cfg: Mapping) -> None:
    """The sampler's own request validation (task, duration, audio files, codes, schedule …) before weights load."""
    from acestep_train.inference import plan_request

    light = _light_bundle(model_cfg)
    for i, r in enumerate(requests):
        try:
            plan_request(light, r, i)
        except TypeError as e:  # a value of the wrong kind (e.g. timesteps=5): still the input's fault
            raise GenerateError(f"request {i}: {e}") from None
        except AttributeError as e:  # validation now reads more of the bundle: it runs again after loading
            log.debug("request pre-check skipped (%s); the sampler validates after loading", e)
            return


def read_adapters(specs: Sequence[AdapterSpec], model_cfg: Mapping) -> list[tuple[Any, AdapterSpec]]:
    """Read every adapter and match it against the variant's DiT built on the meta device (no weights needed)."""
    if not specs:
        return []
    import torch

    from acestep_train.checkpoints.finite import check_finite_lora
    from acestep_train.lora import match_adapter, read_lora
    from acestep_train.models.acestep import AceStepModel

    with torch.device("meta"):
        decoder = AceStepModel(_light_bundle(model_cfg).config).decoder
    out = []
    for spec in specs:
        lf = read_lora(spec.path, spec.format)
        check_finite_lora(lf)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # partial matches warn once, when the adapter is really applied
            match_adapter(decoder, lf.weights, spec.path)
        out.append((lf, spec))
    return out


# ---- running ---------------------------------------------------------------------------------------------------

def resolve_device(device: str | None) -> str:
    import torch

    if device in (None, "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        d = torch.device(str(device))
    except RuntimeError as e:
        raise GenerateError(f"device={device}: {e}") from None
    if d.type == "cuda" and not torch.cuda.is_available():
        raise GenerateError(f"device={device}: CUDA is not available on this machine (use device=cpu or auto)")
    return str(d)


def _sha256(path: Path) -> str | None:
    if not path.is_file():
        return None
    h = hashlib.sha256()
    with path.open("rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _adapter_record(lf, spec: AdapterSpec, fused: bool) -> dict[str, Any]:
    p = Path(lf.path)
    weights_file = p if p.is_file() else None
    if p.is_dir():
        from acestep_train.lora import PEFT_WEIGHTS, PEFT_WEIGHTS_BIN

        weights_file = next((p / n for n in (PEFT_WEIGHTS, PEFT_WEIGHTS_BIN) if (p / n).is_file()), None)
    meta = lf.metadata.get("acestep_lora", lf.metadata) if lf.format == "peft" else lf.metadata
    return {"path": str(p.resolve()), "strength": spec.strength, "format": lf.format, "fused": fused,
            "modules": len(lf.weights), "sha256": _sha256(weights_file) if weights_file else None,
            "variant": (meta or {}).get("variant"), "rank": (meta or {}).get("rank"),
            "alpha": (meta or {}).get("alpha")}


def _request_record(req) -> dict[str, Any]:
    out = {}
    for f in fields(req):
        v = getattr(req, f.name)
        if isinstance(v, tuple):
            v = list(v)
        elif isinstance(v, list):
            v = [list(x) if isinstance(x, tuple) else x for x in v]
        elif isinstance(v, Path):
            v = str(v)
        out[f.name] = v
    return out


def _hydra_overrides() -> list[str] | None:
    try:
        from hydra.core.hydra_config import HydraConfig

        return list(HydraConfig.get().overrides.task)
    except Exception:  # not under @hydra.main (Python use, tests)
        return None


def run(cfg: DictConfig | Mapping) -> list[dict[str, Any]]:
    """Generate what a composed ``generate`` config asks for; returns the sidecars (also written as JSON)."""
    from acestep_train.checkpoints.loading import load_bundle
    from acestep_train.lora import load_adapters
    from acestep_train.inference import Sampler

    t_start = time.perf_counter()
    if OmegaConf.is_config(cfg) and OmegaConf.is_missing(cfg, "out"):
        raise GenerateError("out= is required: the .wav or .flac file to write (e.g. out=song.wav)")
    model_cfg = plain(cfg["model"])
    job = build_job(cfg)
    vram_limit = cfg.get("vram_limit")
    if vram_limit is not None and (isinstance(vram_limit, bool) or not isinstance(vram_limit, (int, float))
                                   or not vram_limit > 0):
        raise GenerateError(f"vram_limit must be a number of GB > 0, got {vram_limit!r}")
    device = resolve_device(cfg.get("device"))
    precheck_requests(job.requests, model_cfg)
    adapters = read_adapters(job.adapters, model_cfg)
    fuse = bool(cfg.get("fuse_adapters", False))

    offload = vram_limit is not None
    bundle = load_bundle(model_cfg, device="cpu" if offload else device)
    for key, attr in (("vae_decode_chunk_frames", "decode_chunk_frames"),
                      ("vae_decode_overlap_frames", "decode_overlap_frames")):
        if cfg.get(key) is not None:
            setattr(bundle.vae, attr, int(cfg.get(key)))
    if adapters:  # fused into the weights, or frozen PEFT adapters that offloading streams with their layers
        load_adapters(bundle.model, [(lf, spec.strength) for lf, spec in adapters], fuse=fuse)
    tiled = True if offload else cfg.get("tiled_decode")
    sampler = Sampler(bundle, tiled_decode=tiled)
    progress = bool(cfg.get("progress", True))
    mgr = None
    if offload:
        from acestep_train.inference.offload import OffloadManager

        mgr = OffloadManager(bundle, device, vram_limit_gb=float(vram_limit), pin_memory=cfg.get("pin_memory"))
        with mgr:
            result = sampler(job.requests, progress=progress)
            offload_report = mgr.report()
    else:
        result = sampler(job.requests, progress=progress)
    gen_seconds = time.perf_counter() - t_start

    run_record = {"cfg": cfg, "job": job, "model_cfg": model_cfg, "bundle": bundle, "adapters": adapters, "fuse": fuse,
                  "device": device, "tiled": tiled, "vram_limit": vram_limit,
                  "offload": offload_report if mgr is not None else None, "gen_seconds": gen_seconds}
    return _write_tracks(result, run_record)


def _write_tracks(result, run: dict[str, Any]) -> list[dict[str, Any]]:
    """Refuse non-finite audio, then write each track, its spectrogram and its sidecar; returns the sidecars."""
    import torch

    from acestep_train import __version__
    from acestep_train.inference.audio_files import FORMATS, save_spectrogram_png, write_audio, write_sidecar

    cfg, job, model_cfg, bundle, adapters, fuse = (run[k] for k in ("cfg", "job", "model_cfg", "bundle", "adapters", "fuse"))
    device, tiled, vram_limit, offload, gen_seconds = (run[k] for k in ("device", "tiled", "vram_limit", "offload", "gen_seconds"))
    tracks = result.tracks()
    sidecars = []
    overrides = _hydra_overrides()
    adapter_records = [_adapter_record(lf, spec, fuse) for lf, spec in adapters]
    model_record = {"variant": model_cfg.get("name"), "source": bundle.source, "subfolder": model_cfg.get("subfolder"),
                    "components_source": model_cfg.get("components_source"), "dtype": model_cfg.get("dtype"),
                    "seed": model_cfg.get("seed") if bundle.source is None else None, "files": bundle.files,
                    "config": model_cfg}
    for out, track in zip(job.outputs, tracks):  # never write NaN audio as if it were a result
        if not torch.isfinite(track).all():
            raise GenerateError(f"{out}: the generated audio has NaN/Inf samples (a corrupt adapter or model "
                                "weights?); nothing was written")
    for i, (track, params, req, out) in enumerate(zip(tracks, result.params, job.requests, job.outputs)):
        write_audio(out, track, result.sample_rate)
        png = None
        if cfg.get("spectrogram", True):
            png = save_spectrogram_png(out.with_suffix(".png"), track, result.sample_rate, title=req.prompt or None)
        peak = float(track.abs().max())
        request = _request_record(req)
        request["seed"] = params["seed"]  # the seed used: GenerationRequest(**request) reproduces this track
        fmt, subtype = FORMATS[out.suffix.lower()]
        sidecar = {
            "audio": out.name, "spectrogram": png.name if png else None,
            "sample_rate": result.sample_rate, "channels": int(track.shape[0]), "samples": int(track.shape[1]),
            "seconds": track.shape[1] / result.sample_rate, "format": fmt, "subtype": subtype,
            "peak_dbfs": 20 * math.log10(peak) if peak > 0 else None, "normalization": NORMALIZATION,
            "seed": params["seed"], "seed_given": req.seed,
            "request": request, "text_files": job.text_files[i], "params": params,
            "model": model_record, "adapters": adapter_records, "fuse_adapters": fuse if adapters else None,
            "device": device, "tiled_decode": tiled, "vram_limit_gb": vram_limit,
            "offload": offload,
            "batch": {"index": i, "size": len(tracks), "files": [p.name for p in job.outputs]},
            "overrides": overrides,
            "command": None if overrides is None else " ".join(["python -m acestep_train.inference.generate",
                                                                 *map(shlex.quote, overrides)]),
            "acestep_train_version": __version__, "torch_version": torch.__version__,
            "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            "generation_seconds": round(gen_seconds, 3),
        }
        if cfg.get("sidecar", True):
            write_sidecar(out.with_suffix(".json"), sidecar)
        sidecars.append(sidecar)
        print(f"wrote {out} ({sidecar['seconds']:.2f} s, seed {params['seed']})"
              + (f" + {png.name}" if png else "") + (f" + {out.with_suffix('.json').name}" if cfg.get("sidecar", True)
                                                     else ""))
    return sidecars


def bad_input_errors() -> tuple[type[BaseException], ...]:
    """Errors that mean "this input cannot be used" (exit 2 with the message), not a bug."""
    from acestep_train.checkpoints.checkpoint_io import CheckpointError
    from acestep_train.lora import LoraError
    from acestep_train.inference.offload import OffloadError
    from acestep_train.inference import RequestError

    return GenerateError, RequestError, LoraError, OffloadError, CheckpointError


def run_cli(cfg: DictConfig) -> None:
    """:func:`run` with bad inputs reported as one ``error:`` line and exit status 2."""
    logging.basicConfig(level=str(cfg.get("log_level") or "WARNING").upper(), stream=sys.stderr,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        run(cfg)
    except bad_input_errors() as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(EXIT_BAD_INPUT)


def main() -> None:
    import hydra

    from acestep_train.checkpoints.variants import CONF_DIR

    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    @hydra.main(config_path=str(CONF_DIR), config_name="generate", version_base="1.3")
    def _main(cfg: DictConfig) -> None:
        run_cli(cfg)

    from acestep_train.cli import reported_errors

    with reported_errors(bad_input_errors()):  # bad overrides too: one `error:` line, status 2
        _main()


if __name__ == "__main__":
    main()
