"""From a composed ``generate`` config to a :class:`Job`: the requests (in batch order), their output paths, the
adapter specs and where ``@file`` text came from. Reads ``@file`` values only; loads no weights."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from acestep_train.inference.generate_schema import request_field_names

AUDIO_SUFFIXES = (".wav", ".flac")
TEXT_FIELDS = ("prompt", "lyrics", "audio_code_string")  # values that may be @file


class GenerateError(ValueError):
    """A command-line input that cannot be used; the message says which and why."""


def request_fields() -> tuple[str, ...]:
    return request_field_names()


# ---- config -> requests --------------------------------------------------------------------------------------------

def read_text_value(value: Any, what: str) -> tuple[str, str | None]:
    """``@path`` -> (file contents stripped, absolute path); ``@@x`` -> literal ``@x``; anything else as a string."""
    if isinstance(value, (Mapping, list, tuple)):
        raise GenerateError(f"{what} must be text, got {type(value).__name__} {value!r}")
    if not isinstance(value, str):  # Hydra parses prompt=123 as a number
        return str(value), None
    if value.startswith("@@"):
        return value[1:], None
    if not value.startswith("@"):
        return value, None
    path = Path(value[1:]).expanduser()
    if not value[1:]:
        raise GenerateError(f"{what}=@: give a file name after @ (e.g. {what}=@{what}.txt)")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise GenerateError(f"{what}={value}: no such file {path.resolve()}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise GenerateError(f"{what}={value}: cannot read {path.resolve()} as UTF-8 text ({e})") from None
    return text.strip(), str(path.resolve())


@dataclass
class AdapterSpec:
    path: str
    strength: float = 1.0
    format: str | None = None


@dataclass
class Job:
    """What one command generates: requests (in batch order), their output paths, where text came from."""

    requests: list[Any]
    outputs: list[Path]
    text_files: list[dict[str, str]]
    adapters: list[AdapterSpec] = field(default_factory=list)


def plain(value: Any) -> Any:
    return OmegaConf.to_container(value, resolve=True) if OmegaConf.is_config(value) else value


def output_paths(out: Any, n: int) -> list[Path]:
    if out is None or (isinstance(out, str) and not out.strip()):
        raise GenerateError("out= is required: the .wav or .flac file to write (e.g. out=song.wav)")
    path = Path(str(out)).expanduser()
    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise GenerateError(f"out={out}: the file name must end in {' or '.join(AUDIO_SUFFIXES)} (the format follows "
                            "the suffix)")
    if path.exists() and path.is_dir():
        raise GenerateError(f"out={out} is a folder; give a file name such as {path / 'song.wav'}")
    if n == 1:
        return [path]
    return [path.with_name(f"{path.stem}_{i}{path.suffix}") for i in range(n)]


def _adapter_specs(value: Any) -> list[AdapterSpec]:
    value = plain(value)
    if value is None:
        return []
    if isinstance(value, (str, Mapping)):
        value = [value]
    if not isinstance(value, Sequence):
        raise GenerateError(f"adapters must be a list like [{{path: a.safetensors, strength: 0.8}}], got {value!r}")
    specs = []
    for i, item in enumerate(value):
        if isinstance(item, str):
            item = {"path": item}
        if not isinstance(item, Mapping) or "path" not in item:
            raise GenerateError(f"adapters[{i}] must be a path or {{path: ..., strength: ...}}, got {item!r}")
        unknown = sorted(set(item) - {"path", "strength", "format"})
        if unknown:
            raise GenerateError(f"adapters[{i}]: unknown keys {unknown} (allowed: path, strength, format)")
        strength = item.get("strength", 1.0)
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise GenerateError(f"adapters[{i}].strength must be a number, got {strength!r}")
        specs.append(AdapterSpec(str(Path(str(item["path"])).expanduser()), float(strength), item.get("format")))
    return specs


def build_job(cfg: Mapping) -> Job:
    """Requests, output paths and adapter specs from a composed ``generate`` config; reads ``@file`` values only."""
    from acestep_train.inference import GenerationRequest

    names = request_fields()
    given = {k: plain(cfg.get(k)) for k in names if cfg.get(k) is not None}
    prompts = plain(cfg.get("prompts"))
    if prompts is not None:
        if "prompt" in given:
            raise GenerateError("give prompt= or prompts=[...], not both")
        if isinstance(prompts, str) or not isinstance(prompts, Sequence) or not prompts:
            raise GenerateError(f"prompts must be a non-empty list of captions, got {prompts!r}")
    seeds = given.pop("seed", None)
    if seeds is not None and not isinstance(seeds, Sequence):
        seeds = [seeds]
    if seeds is not None and len(seeds) == 0:
        raise GenerateError("seed=[] is empty: give a seed, a list of seeds, or null for a random one")
    sizes = {len(x) for x in (prompts, seeds) if x is not None and len(x) > 1}
    if len(sizes) > 1:
        raise GenerateError(f"prompts ({len(prompts)}) and seed ({len(seeds)}) lists differ in length; give lists of "
                            "the same length (paired in order) or a single value for one of them")
    n = sizes.pop() if sizes else 1

    files: dict[str, str] = {}
    for k in TEXT_FIELDS:
        if k in given:
            given[k], src = read_text_value(given[k], k)
            if src:
                files[k] = src
    prompt_list: list[tuple[str, str | None]] = []
    if prompts is not None:
        prompt_list = [read_text_value(p, f"prompts[{i}]") for i, p in enumerate(prompts)]
    for k in ("guidance_interval",):
        if isinstance(given.get(k), list):
            given[k] = tuple(given[k])
    if isinstance(given.get("repainting_ranges"), list):
        given["repainting_ranges"] = [tuple(r) if isinstance(r, list) else r for r in given["repainting_ranges"]]

    requests, text_files = [], []
    for i in range(n):
        kw = dict(given)
        item_files = dict(files)
        if prompt_list:
            kw["prompt"], src = prompt_list[i if len(prompt_list) > 1 else 0]
            if src:
                item_files["prompt"] = src
        if seeds is not None:
            kw["seed"] = seeds[i if len(seeds) > 1 else 0]  # one seed for several prompts: each track gets it
        requests.append(GenerationRequest(**kw))
        text_files.append(item_files)
    outputs = output_paths(cfg.get("out"), n)
    return Job(requests, outputs, text_files, _adapter_specs(cfg.get("adapters")))
