"""Every config option composes, in every combination of the main axes, and every ``_target_`` resolves and
accepts its keyword arguments (bound to the signature without building anything)."""

import inspect
import itertools
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from acestep_train.checkpoints.variants import CONF_DIR


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


AXES = ["model", "mode", "objective", "data", "trainer"]
OTHER = ["callbacks", "logger", "launcher", "debug", "experiment"]


def compose_train(overrides: list[str], tmp: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose_in_context(overrides, tmp)


def compose_in_context(overrides: list[str], tmp: Path) -> DictConfig:
    from hydra.core.hydra_config import HydraConfig

    cfg = compose(config_name="train", overrides=overrides + [f"hydra.run.dir={tmp}"], return_hydra_config=True)

    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]  # resolved through HydraConfig (the ${hydra:...} resolver), not through this node
    return cfg


def targets(node, path="") -> list[tuple[str, dict]]:
    found = []
    if isinstance(node, DictConfig):
        if "_target_" in node:
            kwargs = {k: v for k, v in node.items() if not str(k).startswith("_")}
            found.append((path, node._target_, kwargs))
        for k in node.keys():
            if k == "hydra":
                continue
            found += targets(node._get_node(k), f"{path}.{k}" if path else str(k))
    elif isinstance(node, ListConfig):
        for i, v in enumerate(node):
            found += targets(node._get_node(i), f"{path}[{i}]")
    return found


def check_targets(cfg: DictConfig) -> int:
    n = 0
    for path, target, kwargs in targets(cfg):
        obj = get_object(target)
        sig = inspect.signature(obj)
        try:
            sig.bind_partial(**kwargs)
        except TypeError as e:
            raise AssertionError(f"{path}: {target} does not accept {sorted(kwargs)}: {e}") from None
        n += 1
    return n


def test_every_group_has_options():
    for group in AXES + OTHER:
        assert options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("model", options("model"))
def test_main_axes_compose(model, tmp_path):
    """model x mode x objective x data x trainer, all of them (one Hydra context per model for speed)."""
    n = 0
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for combo in itertools.product(*(options(a) for a in AXES[1:])):
            overrides = [f"model={model}"] + [f"{a}={o}" for a, o in zip(AXES[1:], combo)] + ["data.metadata=x.csv"]
            cfg = compose_in_context(overrides, tmp_path)
            resolved = OmegaConf.to_container(cfg, resolve=True)  # every interpolation resolves
            assert resolved["model"]["name"] == model
            assert check_targets(cfg) >= 2, overrides
            n += 1
    assert n == len(list(itertools.product(*(options(a) for a in AXES[1:]))))


@pytest.mark.parametrize("group_option", [(g, o) for g in OTHER for o in options(g)], ids=lambda x: "=".join(x))
def test_other_groups_compose(group_option, tmp_path):
    group, option = group_option
    cfg = compose_train([f"{group}={option}", "data.metadata=x.csv"], tmp_path)
    OmegaConf.to_container(cfg, resolve=True)
    check_targets(cfg)


def test_experiments_open_with_their_command():
    """Line 1 is Hydra's package header (it must come first); the command follows right after."""
    for path in (CONF_DIR / "experiment").glob("*.yaml"):
        lines = path.read_text().splitlines()
        assert lines[0] == "# @package _global_", path.name
        assert lines[1].startswith(f"# python -m acestep_train experiment={path.stem} "), (
            f"{path.name} must open with its exact command")


def test_root_config_is_a_table_of_contents():
    root = OmegaConf.load(CONF_DIR / "train.yaml")
    nested = [k for k, v in root.items() if isinstance(v, DictConfig) and k != "defaults"]
    assert nested == [], f"train.yaml should hold only the defaults list and run-level keys, found {nested}"
