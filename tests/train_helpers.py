"""Compose the real training config with tiny overrides and run it (shared by the training tests)."""

from __future__ import annotations

from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

from acestep_train.checkpoints.variants import CONF_DIR
from datamodules.batch import Batch


def compose_train(run_dir: Path, overrides: list[str]) -> DictConfig:
    """``conf/train.yaml`` + overrides, with the Hydra runtime set as ``python -m acestep_train`` would."""
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=[f"hydra.run.dir={run_dir}"] + overrides,
                      return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)  # set by a real `python -m` run, not by compose()
    HydraConfig.instance().set_config(cfg)
    with open_dict(cfg):
        del cfg["hydra"]
    return cfg


def tiny_overrides(data: dict, extra: list[str] = ()) -> list[str]:
    """model=tiny on CPU, quiet, no validation audio, on a prepared demo dataset + shared feature cache."""
    return ["model=tiny", "trainer=cpu", "logger=[csv]", "trainer.enable_progress_bar=false",
            "callbacks.validation_audio=null", "data=audio", f"data.metadata={data['metadata']}",
            f"data.cache_dir={data['cache']}", "data.max_duration=3.0", "data.batch_size=2", "data.progress=false",
            *extra]


def run_train(run_dir: Path, overrides: list[str]) -> dict:
    from acestep_train.training.train import run

    return run(compose_train(run_dir, overrides))


def trained_state(ckpt: Path) -> dict[str, torch.Tensor]:
    return torch.load(ckpt, map_location="cpu", weights_only=True)["state_dict"]


class StopAtStep:
    """Test callback: ends training right after optimizer step ``step`` (an interruption with the same config)."""

    def __new__(cls, step: int):
        import lightning as L

        class _Stop(L.Callback):
            def on_train_batch_end(self, trainer, *args):
                if trainer.global_step >= step:
                    trainer.should_stop = True

        return _Stop()


ATTN_MLP = r"layers\.\d+\.((self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)|mlp\.(gate_proj|up_proj|down_proj))"


def batch_of(x0, frames_valid, lengths, text, lyric):
    b = len(lengths)
    mask = torch.zeros(b, x0.shape[1], dtype=torch.bool)
    for i, n in enumerate(lengths):
        mask[i, :n] = True
    return Batch(latents=x0 * mask[..., None], latent_mask=mask, text_hidden=text, text_mask=torch.ones(
        text.shape[:2], dtype=torch.bool), lyric_embeds=lyric, lyric_mask=torch.ones(lyric.shape[:2], dtype=torch.bool),
        ids=[f"item{i}" for i in range(b)])


def demo_batch():
    torch.manual_seed(1)
    return batch_of(torch.randn(2, 30, 8), 30, [30, 22], torch.randn(2, 10, 32), torch.randn(2, 14, 32))


class FakeTrainer:
    """Just what StopOnSignal touches, for one process."""

    def __init__(self, root: Path):
        self.global_step, self.global_rank, self.is_global_zero = 5, 0, True
        self.default_root_dir = str(root)
        self.saved: list[str] = []
        self.strategy = self

    def reduce_boolean_decision(self, decision, all=True):
        return decision

    def broadcast(self, obj, src=0):
        return obj

    def save_checkpoint(self, path):
        self.saved.append(path)
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_bytes(b"")
