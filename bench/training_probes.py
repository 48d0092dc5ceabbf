"""Measuring instruments for ``bench_training.py``: a Lightning step timer, a peak-RSS sampler and the memory probe
that runs in a fresh subprocess per setting."""

from __future__ import annotations

import gc
import os
import statistics
import threading
import time

import lightning as L

# StepTimer instances register here, so the bench can read timings of a Trainer built inside ``train.run``.
TIMERS: list["StepTimer"] = []


class StepTimer(L.Callback):
    """Wall-clock (``perf_counter``) and process CPU-time (``process_time``) stamps of ``on_train_batch_start`` /
    ``on_train_batch_end`` for every training batch.

    Added to a real run through the config (``+callbacks.bench_timer._target_=training_probes.StepTimer``).
    """

    def __init__(self):
        self.start: list[float] = []
        self.end: list[float] = []
        self.cpu_start: list[float] = []
        self.cpu_end: list[float] = []
        TIMERS.append(self)

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.start.append(time.perf_counter())
        self.cpu_start.append(time.process_time())

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.end.append(time.perf_counter())
        self.cpu_end.append(time.process_time())


def window_per_step(start: list[float], end: list[float], skip: int) -> float:
    """Seconds per step over steps ``skip..`` : from the start of step ``skip`` to the end of the last step, so all
    work between steps (data loading, logging, epoch boundaries) is counted, and the first ``skip`` warm-up steps
    are not."""
    n = len(end) - skip
    if n < 1:
        raise ValueError(f"only {len(end)} steps recorded, {skip} of them warm-up")
    return (end[-1] - start[skip]) / n


# ---- resident memory ------------------------------------------------------------------------------------------

_PAGE = os.sysconf("SC_PAGE_SIZE")


def rss_bytes() -> int:
    """Current resident set size from ``/proc/self/statm`` (field 2, pages)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * _PAGE


class PeakRSS:
    """Samples ``rss_bytes()`` in a thread every ``interval`` seconds while the ``with`` block runs.

    ``peak_growth`` = highest sample minus the RSS just before the block. ``ru_maxrss`` is no use here: it
    is the lifetime peak, which includes import-time and model-construction peaks.
    """

    def __init__(self, interval: float = 0.001):
        self.interval = interval
        self.base = self.peak = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss_bytes())
            time.sleep(self.interval)

    def __enter__(self) -> "PeakRSS":
        gc.collect()
        self.base = self.peak = rss_bytes()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_bytes())

    @property
    def peak_growth(self) -> int:
        return self.peak - self.base


# ---- benchmark (c): one DiT training step ------------------------------------------------------------------------

class ProbeStep:
    """The model, batch and optimizer of ``spec`` (model=tiny with ``spec["arch"]``, LoRA, random cached-style
    batch), and one training step of ``AceStepModule.training_loss`` + backward + clip + AdamW."""

    def __init__(self, spec: dict):
        import torch

        from acestep_train import load_model
        from acestep_train.training.module import AceStepModule
        from datamodules.collate import collate

        self.torch = torch
        self.device = torch.device(spec["device"])
        torch.manual_seed(0)
        bundle = load_model("tiny", overrides=spec["arch"], silence_frames=max(15000, spec["frames"]))
        self.module = AceStepModule(bundle, mode="lora", lora=spec["lora"],
                                    gradient_checkpointing=spec["checkpointing"]).to(self.device)
        g = torch.Generator().manual_seed(0)
        latent_dim = bundle.config.audio_acoustic_hidden_dim
        text_dim = bundle.config.text_hidden_dim
        items = [{"latents": torch.randn(spec["frames"], latent_dim, generator=g),
                  "text_hidden": torch.randn(spec["text_len"], text_dim, generator=g),
                  "lyric_embeds": torch.randn(spec["lyric_len"], text_dim, generator=g), "id": str(i)}
                 for i in range(spec["batch"])]
        self.batch = collate(items).to(self.device)
        self.params = self.module.trainable_parameters()
        self.opt = torch.optim.AdamW(self.params, lr=1e-4, weight_decay=0.01)
        self.cuda = self.device.type == "cuda"

    def set_checkpointing(self, enabled: bool) -> None:
        self.module.model.set_gradient_checkpointing(enabled)

    def __call__(self) -> tuple[float, float]:
        """One step; returns (wall seconds, process CPU seconds)."""
        torch, m = self.torch, self.module
        t0, c0 = time.perf_counter(), time.process_time()
        loss = m.training_loss(self.batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)
        if self.cuda:
            torch.cuda.synchronize()
        m.batches_trained += 1
        return time.perf_counter() - t0, time.process_time() - c0


def memory_probe(spec: dict) -> dict:
    """Run in a fresh process per setting. Warm-up steps first (optimizer state and gradients get allocated), then
    the peak memory growth of each measured step with ``spec["checkpointing"]``.

    The parent starts this process with ``MALLOC_MMAP_THRESHOLD_`` fixed, so glibc serves every large tensor with
    its own mmap and returns it on free; otherwise freed activations would stay in the heap after the warm-up
    step and the measured step would show little growth.
    """
    step = ProbeStep(spec)
    torch = step.torch
    for _ in range(spec["warmup"]):
        step()
    out = {"checkpointing": spec["checkpointing"], "device": str(step.device), "steps": []}
    for _ in range(spec["measure"]):
        if step.cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats(step.device)
            cuda_base = torch.cuda.memory_allocated(step.device)
        with PeakRSS() as rss:
            seconds, _ = step()
        rec = {"seconds": seconds, "rss_base_mb": rss.base / 2**20, "rss_peak_growth_mb": rss.peak_growth / 2**20}
        if step.cuda:
            rec["cuda_peak_growth_mb"] = (torch.cuda.max_memory_allocated(step.device) - cuda_base) / 2**20
        out["steps"].append(rec)
    out["rss_peak_growth_mb"] = statistics.median(s["rss_peak_growth_mb"] for s in out["steps"])
    if step.cuda:
        out["cuda_peak_growth_mb"] = statistics.median(s["cuda_peak_growth_mb"] for s in out["steps"])
    return out


def timing_probe(spec: dict, pairs: int) -> dict:
    """Step time (wall and process CPU) with checkpointing on vs off in one process (normal allocator): one warm-up
    step of each, then ``pairs`` pairs, the order flipped every pair (on/off, off/on, ...)."""
    step = ProbeStep(dict(spec, checkpointing=True))
    wall, cpu = {True: [], False: []}, {True: [], False: []}
    for flag in (True, False):
        step.set_checkpointing(flag)
        step()
    for k in range(pairs):
        for flag in ((True, False) if k % 2 == 0 else (False, True)):
            step.set_checkpointing(flag)
            w, c = step()
            wall[flag].append(w)
            cpu[flag].append(c)
    return {"checkpointing_s": wall[True], "no_checkpointing_s": wall[False],
            "checkpointing_cpu_s": cpu[True], "no_checkpointing_cpu_s": cpu[False]}
