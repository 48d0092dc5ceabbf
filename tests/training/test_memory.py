"""The memory estimate printed before the first step: its arithmetic, its agreement with a measured run (order of
magnitude), and the refusal of a run that cannot fit (a tiny device faked with ``+memory_limit_gb``)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import lightning as L
import pytest

from acestep_train.training import memory
from datamodules.demo import make_demo_dataset
from train_helpers import run_train, tiny_overrides

SHAPE = memory.RunShape(
    trainable=1_000_000, trainable_bytes=4_000_000, frozen_bytes=10_000_000, host_bytes=5_000_000,
    factored_state=20_000, dit_base_params=1_000_000, hidden=256, intermediate=1024, layers=8, patch=2, batch=2,
    clip_seconds=10.0, act_bytes=4, mixed=False, checkpointing=False, offload_activations=False, optimizer="adam",
    strategy="single", world=1, cuda=True, full=True)


def test_estimate_terms():
    est = memory.estimate(SHAPE)
    assert est.weights == 14_000_000 and est.gradients == 4_000_000 and est.optimizer == 8_000_000
    tokens = 2 * 125
    per_layer = tokens * (16 * 256 + 4 * 1024) * 4
    assert est.activations == 9 * per_layer and est.host == 5_000_000
    assert memory.estimate(dataclasses.replace(SHAPE, optimizer="adam8bit")).optimizer == 2_000_000
    assert memory.estimate(dataclasses.replace(SHAPE, optimizer="adafactor")).optimizer == 80_000
    ddp = memory.estimate(dataclasses.replace(SHAPE, strategy="ddp", world=4))
    assert ddp.gradients == 8_000_000  # buckets: a second copy
    fsdp = memory.estimate(dataclasses.replace(SHAPE, strategy="fsdp", world=4))
    assert (fsdp.weights, fsdp.gradients, fsdp.optimizer) == (3_500_000, 1_000_000, 2_000_000)
    ckpt = memory.estimate(dataclasses.replace(SHAPE, checkpointing=True))
    assert ckpt.activations == 8 * tokens * 256 * 4 + 2 * per_layer < est.activations
    cpu = memory.estimate(dataclasses.replace(SHAPE, cuda=False))
    assert cpu.weights == 19_000_000 and cpu.host == 0  # VAE + text encoder share the host memory
    for label, alt in memory.alternatives(SHAPE, model_dtype_bytes=2):
        assert memory.estimate(alt).total < est.total, label


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory):
    root = tmp_path_factory.mktemp("long")
    return {"metadata": make_demo_dataset(root / "songs", n=2, seconds=20.0, seed=2), "cache": root / "cache"}


class PeakRss(L.Callback):
    """Peak resident memory over the first ``steps`` optimizer steps, above what was resident when training began
    (the weights, loaded before). Linux: VmHWM is reset through /proc/self/clear_refs."""

    def __init__(self, steps: int = 2):
        self.steps, self.base, self.peak = steps, None, None

    @staticmethod
    def _status(key: str) -> int:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024
        raise KeyError(key)

    def on_train_start(self, trainer, module):
        import ctypes
        import gc

        gc.collect()
        ctypes.CDLL("libc.so.6").malloc_trim(0)  # hand freed heap back: later allocations must show up as RSS
        Path("/proc/self/clear_refs").write_text("5")  # reset the high-water mark to the current RSS
        self.base = self._status("VmRSS")

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step >= self.steps and self.peak is None:
            self.peak = self._status("VmHWM") - self.base
            trainer.should_stop = True


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc")
def test_estimate_matches_a_measured_run(tmp_path, long_clips, monkeypatch):
    """A wider tiny DiT, fully fine-tuned with AdamW on 20 s clips without checkpointing: what training adds on top
    of the loaded weights (gradients, optimizer state, activations) is within a factor of 3 of the estimate."""
    seen = {}
    real = memory.check_run_fits

    def capture(cfg, module, bundle, world):
        seen["estimate"] = real(cfg, module, bundle, world)
        return seen["estimate"]

    monkeypatch.setattr(memory, "check_run_fits", capture)
    peak = PeakRss()
    import acestep_train.training.train as train

    real_build = train.build_trainer

    def with_probe(cfg, callbacks, loggers):
        return real_build(cfg, callbacks + [peak], loggers)

    monkeypatch.setattr(train, "build_trainer", with_probe)
    wide = ["model.arch.hidden_size=384", "model.arch.intermediate_size=1536", "model.arch.num_hidden_layers=4",
            "mode=full", "mode.gradient_checkpointing=false", "data.max_duration=20.0", "data.batch_size=2",
            "trainer.max_steps=3", "exports=[]"]
    run_train(tmp_path / "run", tiny_overrides(long_clips, wide))
    est = seen["estimate"]
    added = est.gradients + est.optimizer + est.activations
    assert peak.peak is not None and est.activations > 0.3 * added  # activations matter at this size
    ratio = peak.peak / added
    print(f"\nestimated {added / 1e6:.0f} MB on top of the weights, measured {peak.peak / 1e6:.0f} MB "
          f"(ratio {ratio:.2f})")
    assert 1 / 3 < ratio < 3


def test_a_run_that_cannot_fit_stops_with_what_would_fit(tmp_path, long_clips):
    over = ["mode=full", "mode.gradient_checkpointing=false", "data.max_duration=20.0", "data.batch_size=2",
            "trainer.max_steps=1", "+memory_limit_gb=0.001"]
    with pytest.raises(memory.MemoryFitError) as err:
        run_train(tmp_path / "run", tiny_overrides(long_clips, over))
    message = str(err.value)
    assert "memory_limit_gb=0.001 is 0.00 GB" in message
    for fix in ("mode=lora", "mode.gradient_checkpointing=true", "8-bit AdamW or Adafactor", "data.batch_size=1"):
        assert fix in message, message
    assert not (tmp_path / "run" / "checkpoints").exists()
    # warn instead of stopping: the same run trains
    run_train(tmp_path / "warned", tiny_overrides(long_clips, [*over, "+memory_check=warn", "exports=[]"]))
    assert (tmp_path / "warned" / "checkpoints" / "last.ckpt").is_file()
