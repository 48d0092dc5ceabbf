"""Every config option composes, in every combination of the main axes, and every ``_target_`` resolves and
accepts its keyword arguments (bound to the signature without building anything). The variants resolve to the
released architectures and sampling defaults (frozen here), and ``--help`` offers only selectable options."""

import dataclasses
import inspect
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import get_object
from omegaconf import DictConfig, ListConfig, OmegaConf, open_dict

from acestep_train.checkpoints.loading import arch_from_cfg
from acestep_train.checkpoints.variants import CONF_DIR, model_config, variant_names
from acestep_train.models.config import AceStepConfig


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONF_DIR / group).glob("*.yaml"))


AXES = ["model", "mode", "objective", "data", "trainer"]
OTHER = ["callbacks", "logger", "launcher", "debug", "experiment", "mode/optimizer"]


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
    root = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "train.yaml"), resolve=False)
    nested = [k for k, v in root.items() if isinstance(v, dict) and k != "defaults"]
    assert nested == [], f"train.yaml should hold only the defaults list and run-level keys, found {nested}"


def test_no_group_holds_a_partial():
    """Shared fragments live at the root of conf/ (``_*.yaml``), where Hydra offers them as no group option."""
    partials = sorted(str(p.relative_to(CONF_DIR)) for p in CONF_DIR.rglob("_*.yaml") if p.parent != CONF_DIR)
    assert partials == [], f"partials inside a config group become selectable options: {partials}"
    assert variant_names() == options("model")


def test_help_offers_exactly_the_selectable_options():
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    out = subprocess.run([sys.executable, "-m", "acestep_train", "--help"], capture_output=True, text=True, env=env,
                         timeout=120, check=True).stdout
    section = out.split("== Configuration groups ==", 1)[1].split("== Config ==", 1)[0]
    listed = dict(line.split(": ", 1) for line in section.splitlines() if ": " in line)
    for group in AXES + OTHER:
        assert listed.pop(group).split(", ") == options(group), group
    assert listed == {"paths": "default"}


def test_a_partial_is_not_selectable(tmp_path):
    with pytest.raises(Exception, match="Could not find 'model/_model_2b'"):
        compose_train(["model=_model_2b", "data.metadata=x.csv"], tmp_path)


# The released architectures: the 2B one is AceStepConfig's defaults; XL widens and deepens the DiT only.
XL_DIT = dict(hidden_size=2560, intermediate_size=9728, num_hidden_layers=32, num_attention_heads=32,
              encoder_hidden_size=2048, encoder_intermediate_size=6144, encoder_num_attention_heads=16,
              encoder_num_key_value_heads=8)
RELEASED_2B = dict(hidden_size=2048, intermediate_size=6144, num_hidden_layers=24, num_attention_heads=16,
                   num_key_value_heads=8, head_dim=128, rms_norm_eps=1e-6, rope_theta=1e6, sliding_window=128,
                   in_channels=192, patch_size=2, audio_acoustic_hidden_dim=64, text_hidden_dim=1024,
                   timbre_hidden_dim=64, timbre_fix_frame=750, num_lyric_encoder_hidden_layers=8,
                   num_timbre_encoder_hidden_layers=4, num_attention_pooler_hidden_layers=2, pool_window_size=5,
                   fsq_dim=2048, fsq_input_levels=[8, 8, 8, 5, 5, 5], fsq_input_num_quantizers=1, timestep_mu=-0.4,
                   timestep_sigma=1.0)
TURBO = dict(steps=8, schedule="turbo", shift=3.0, guidance="none", guidance_scale=1.0)
GUIDED = dict(steps=50, schedule="linear", shift=1.0, guidance="apg", guidance_scale=7.0)
VARIANTS = {  # name: (XL?, is_turbo, model_version, sampling)
    "base": (False, False, "base", GUIDED), "sft": (False, False, "sft", GUIDED),
    "turbo": (False, True, "turbo", TURBO), "turbo-shift3": (False, True, "turbo", TURBO),
    "turbo-shift1": (False, True, "turbo", {**TURBO, "shift": 1.0}),
    "turbo-continuous": (False, True, "turbo", {**TURBO, "schedule": "continuous"}),
    "xl-base": (True, False, "base", GUIDED), "xl-sft": (True, False, "sft", GUIDED),
    "xl-turbo": (True, True, "turbo", TURBO),
}
LORA_TARGETS = {
    "attention": r"layers\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)",
    "attention_mlp": r"layers\.\d+\.((self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|"
                     r"down_proj))",
    "self_attention": r"layers\.\d+\.self_attn\.(q_proj|k_proj|v_proj|o_proj)",
    "cross_attention": r"layers\.\d+\.cross_attn\.(q_proj|k_proj|v_proj|o_proj)",
}


def test_variants_resolve_to_the_released_architectures_and_sampling():
    assert sorted(VARIANTS) == sorted(set(variant_names()) - {"tiny"})
    for name, (xl, is_turbo, version, sampling) in VARIANTS.items():
        cfg = model_config(name)
        arch = dataclasses.asdict(arch_from_cfg(cfg.arch))
        expected = {**RELEASED_2B, **(XL_DIT if xl else {}), "is_turbo": is_turbo, "model_version": version}
        assert {k: arch[k] for k in expected} == expected, name
        assert arch == dataclasses.asdict(AceStepConfig(**expected)), name  # every other field: its default
        assert dict(cfg.sampling) == sampling, name
        assert dict(cfg.lora_targets) == LORA_TARGETS, name
        assert (cfg.dtype, cfg.vae_dtype, cfg.text_encoder_dtype) == ("bfloat16", None, None), name
    assert dict(model_config("tiny").sampling) == TURBO and dict(model_config("tiny").lora_targets) == LORA_TARGETS


CPU = dict(accelerator="cpu", precision="32-true", max_epochs=10, log_every_n_steps=1)
GPU = dict(accelerator="gpu", precision="bf16-mixed", max_epochs=100, log_every_n_steps=10)
TRAINER_SHARED = dict(devices=1, num_nodes=1, strategy="auto", max_steps=-1, accumulate_grad_batches=1,
                      gradient_clip_val=1.0, gradient_clip_algorithm="norm", check_val_every_n_epoch=1,
                      num_sanity_val_steps=0, deterministic=False, benchmark=False, fast_dev_run=False,
                      overfit_batches=0.0, limit_train_batches=None, limit_val_batches=None, enable_progress_bar=True,
                      use_distributed_sampler=False)
SCHEDULER = {"_target_": "acestep_train.training.lr_schedules.warmup_cosine", "_partial_": True, "warmup_steps": 100,
             "min_lr_ratio": 0.01}


def test_trainer_and_mode_presets_resolve_to_their_frozen_values(tmp_path):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for trainer, device in (("cpu", CPU), ("gpu", GPU)):
            cfg = compose_in_context([f"trainer={trainer}"], tmp_path)
            assert OmegaConf.to_container(cfg.trainer) == {**TRAINER_SHARED, **device}, trainer
        for mode, lr in (("lora", 1e-4), ("dora", 1e-4), ("full", 1e-5)):
            m = OmegaConf.to_container(compose_in_context([f"mode={mode}"], tmp_path).mode)
            assert m["optimizer"] == {"_target_": "torch.optim.AdamW", "_partial_": True, "weight_decay": 0.01,
                                      "lr": lr}, mode
            assert m["scheduler"] == SCHEDULER and m["gradient_checkpointing"] is True
            assert m["offload_activations"] is False and m["name"] == mode
