"""Python access to the Hydra model configs: list the variants, compose one, load it.

    >>> from acestep_train import load_model
    >>> bundle = load_model("tiny")                                   # random toy model, no download
    >>> bundle = load_model("xl-sft", source="/data/acestep-v15-xl-sft")  # a local copy of a released repo
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf

CONF_DIR = Path(__file__).resolve().parent.parent / "conf"


def variant_names() -> list[str]:
    """Every selectable ``model=`` option: each file of ``conf/model/`` (the fragments the variants share live at the
    root of ``conf/``, as ``_model_*.yaml``, so that Hydra offers them as no option)."""
    return sorted(p.stem for p in (CONF_DIR / "model").glob("*.yaml"))


def model_config(name: str, overrides: list[str] | None = None, **values: Any) -> DictConfig:
    """Compose ``conf/model/<name>.yaml`` (with ``paths``) and apply ``model.`` overrides / keyword values."""
    from hydra import compose, initialize_config_dir

    names = variant_names()
    if name not in names:
        raise ValueError(f"unknown model variant {name!r}; choose one of {names}")
    ov = [f"+model={name}", "+paths=default"] + [f"model.{o}" for o in (overrides or [])]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(overrides=ov)
    model = cfg.model
    OmegaConf.set_struct(model, False)
    for k, v in values.items():
        OmegaConf.update(model, k, v, merge=False)
    if model.get("cache_dir") is not None and OmegaConf.is_interpolation(model, "cache_dir"):
        model.cache_dir = str(OmegaConf.select(cfg, "paths.model_cache"))
    return model


def load_model(name: str, device: str = "cpu", overrides: list[str] | None = None, **values: Any):
    """Compose a variant's config and load its :class:`~acestep_train.checkpoints.loading.ModelBundle`."""
    from acestep_train.checkpoints.loading import load_bundle

    cfg = model_config(name, overrides, **values)
    return load_bundle(OmegaConf.to_container(cfg, resolve=True), device=device)
