"""Training throughput and memory: our pipeline against baselines measured in the same run.

    .venv/bin/python bench/bench_training.py                 # full: ~5.5 CPU-minutes (7.5 min wall, shared 2 vCPUs)
    .venv/bin/python bench/bench_training.py --quick         # smaller sizes: under 2 min
    .venv/bin/python bench/bench_training.py --only b,c --out "$(mktemp -d)/bench.json"

A benchmark, not a test: it asserts nothing and reports ratios against a baseline timed in the same process and
interleaved with ours (ABBA order, median of >= 3 repeats, raw times printed), because absolute times on a shared
machine mean little. Everything it writes (demo audio, feature caches, run folders) goes to a temporary folder;
the JSON result goes to ``--out`` (default: under the system temp dir), never into the repository.

(a) 10 epochs from audio files (demo dataset, 8 clips x 4 s; model=tiny with a mid-size DiT: hidden 256, 4 layers;
    tiny VAE and text encoder; LoRA r64 on attention, gradient checkpointing, AdamW): our real entry
    ``acestep_train.training.train.run`` (model load + feature-cache build + Lightning fit at batch 4, length-bucketed,
    masked) against a DiffSynth-style loop (``training_baselines.diffsynth_style_train``: audio decode, VAE encode,
    text encoder and condition encoder every step, batch 1). Goal: ours >= 5x faster.
(b) Our Lightning step (``train.run`` with a cached dataset, ``Trainer.fit``) against a bare PyTorch loop
    (``training_baselines.bare_train``) doing the same work on the same batches; per-step time after warm-up,
    startup excluded. Goal: ours / bare <= 1.10.
(c) One DiT training step (hidden 512, 8 layers, 60 s clip at batch 2) with and without gradient checkpointing, each
    in a fresh subprocess: peak RSS growth during the step (``/proc/self/statm`` sampled in a thread), on CUDA also
    ``torch.cuda.max_memory_allocated`` growth; plus the step-time ratio (alternated in this process).
    ``--quick`` uses the mid-size DiT and an 8 s clip instead.

``--threads`` (default 1) sets torch's CPU threads. On a shared machine, 2 OpenMP threads on 2 busy vCPUs made a
training step 10-25x slower and erratic (spin-waiting barriers); 1 thread keeps both sides comparable.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
for p in (REPO, REPO / "tests", HERE):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

# DiT sizes (``model.arch.*`` overrides of model=tiny).
MID_ARCH = ["arch.hidden_size=256", "arch.intermediate_size=768", "arch.num_hidden_layers=4",
            "arch.num_attention_heads=4", "arch.num_key_value_heads=2", "arch.head_dim=64", "arch.sliding_window=16"]
BIG_ARCH = ["arch.hidden_size=512", "arch.intermediate_size=1536", "arch.num_hidden_layers=8",
            "arch.num_attention_heads=8", "arch.num_key_value_heads=4", "arch.head_dim=64", "arch.sliding_window=128"]
LORA_ATTENTION = r"layers\.\d+\.(self_attn|cross_attn)\.(q_proj|k_proj|v_proj|o_proj)"

# Sizes per mode. ``repeats`` = timed runs of each side.
PLANS = {
    "full": {
        "a": {"clips": 8, "seconds": 4.0, "epochs": 10, "batch": 4, "repeats": 3},
        "b": {"clips": 8, "seconds": 4.0, "repeat": 4, "batch": 4, "warmup": 2, "steps": 12, "repeats": 4},
        # memory: 2 measured steps per setting (it is deterministic: < 1 % spread); time: 3 alternated pairs
        "c": {"arch": "big", "seconds": 60.0, "batch": 2, "warmup": 1, "measure": 2, "timing_pairs": 3},
    },
    "quick": {
        "a": {"clips": 4, "seconds": 4.0, "epochs": 2, "batch": 4, "repeats": 3},
        "b": {"clips": 8, "seconds": 4.0, "repeat": 1, "batch": 4, "warmup": 1, "steps": 3, "repeats": 3},
        "c": {"arch": "mid", "seconds": 8.0, "batch": 2, "warmup": 1, "measure": 3, "timing_pairs": 3},
    },
}


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="smaller sizes, about 2 minutes")
    ap.add_argument("--only", default="a,b,c", help="comma-separated subset of a,b,c")
    ap.add_argument("--out", default=None, help="JSON result path (default: <tmp>/acestep-bench/...)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1, see the docstring)")
    ap.add_argument("--repeats", type=int, default=None, help="override the timed repeats of (a) and (b) (>= 3)")
    ap.add_argument("--device", default=None, help="(c) device: cpu, cuda (default: cpu, plus cuda if available)")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)  # internal: run one (c) probe
    return ap.parse_args()


def set_threads(n: int) -> None:
    """Before torch is imported, so OpenMP/MKL pools are created with ``n`` threads."""
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ[var] = str(n)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def quiet() -> None:
    import logging
    import warnings

    import lightning  # noqa: F401  (it sets its loggers to INFO on import: import first, then lower them)

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "pytorch_lightning", "acestep_train",
                 "datamodules"):
        logging.getLogger(name).setLevel(logging.ERROR)


def median(xs):
    return statistics.median(xs)


def abba(repeats: int) -> list[tuple[str, str]]:
    """Order of the two sides per repeat: (A, B), (B, A), (A, B), ... so drift in machine load cancels."""
    return [("ours", "base") if k % 2 == 0 else ("base", "ours") for k in range(repeats)]


# ---- configs ---------------------------------------------------------------------------------------------------

def common_overrides(metadata: Path, cache: Path, batch: int, max_duration: float, arch: list[str]) -> list[str]:
    return ["model=tiny", "mode=lora", "trainer=cpu", "logger=[csv]", "trainer.enable_progress_bar=false",
            "callbacks=none", "exports=[]", "data=audio", f"data.metadata={metadata}", f"data.cache_dir={cache}",
            f"data.max_duration={max_duration}", f"data.batch_size={batch}", "data.progress=false",
            *[f"model.{a}" for a in arch]]


def loop_settings(cfg):
    from omegaconf import OmegaConf

    from training_baselines import LoopSettings

    mode = OmegaConf.to_container(cfg.mode, resolve=True)
    return LoopSettings(lora=mode["lora"], gradient_checkpointing=bool(mode["gradient_checkpointing"]),
                        lr=float(mode["optimizer"]["lr"]), weight_decay=float(mode["optimizer"]["weight_decay"]))


# ---- (a) 10 epochs from audio ----------------------------------------------------------------------------------

def bench_a(work: Path, plan: dict, repeats: int) -> dict:
    import acestep_train.training.train as train_mod
    import datamodules.datamodule as dm_mod
    from omegaconf import OmegaConf
    from train_helpers import compose_train

    from acestep_train.checkpoints.loading import load_bundle
    from datamodules.demo import make_demo_dataset
    from datamodules.metadata import load_metadata
    from training_baselines import diffsynth_style_train

    meta = make_demo_dataset(work / "a_songs", n=plan["clips"], seconds=plan["seconds"], seed=0)
    warm_meta = make_demo_dataset(work / "a_warm", n=2, seconds=plan["seconds"], seed=1)

    # ``run`` loads the model itself; wrap its ``load_bundle`` to also report when loading ended.
    marks: dict[str, float] = {}
    real_load = train_mod.load_bundle

    def timed_load(*a, **k):
        out = real_load(*a, **k)
        marks["loaded"] = time.perf_counter()
        return out

    train_mod.load_bundle = timed_load
    # Likewise the feature-cache build inside ``datamodule.setup``.
    real_build = dm_mod.build_cache

    def timed_build(*a, **k):
        t0 = time.perf_counter()
        out = real_build(*a, **k)
        marks["cache_s"] = time.perf_counter() - t0
        return out

    dm_mod.build_cache = timed_build
    counter = iter(range(10_000))

    def ours(metadata: Path, epochs: int) -> dict:
        i = next(counter)
        ov = common_overrides(metadata, work / f"a_cache{i}", plan["batch"], plan["seconds"], MID_ARCH)
        cfg = compose_train(work / f"a_run{i}", ov + [f"trainer.max_epochs={epochs}"])
        t0, c0 = time.perf_counter(), time.process_time()
        train_mod.run(cfg)
        t1, c1 = time.perf_counter(), time.process_time()
        return {"total_s": t1 - t0, "cpu_s": c1 - c0, "after_load_s": t1 - marks["loaded"],
                "cache_build_s": marks["cache_s"]}

    def base(metadata: Path, epochs: int) -> dict:
        i = next(counter)
        cfg = compose_train(work / f"a_run{i}", common_overrides(metadata, work / "unused", plan["batch"],
                                                                 plan["seconds"], MID_ARCH))
        t0, c0 = time.perf_counter(), time.process_time()
        bundle = load_bundle(OmegaConf.to_container(cfg.model, resolve=True))
        t_load = time.perf_counter()
        records = load_metadata(metadata)
        out = diffsynth_style_train(bundle, records, epochs, loop_settings(cfg), seed=int(cfg.seed))
        t1, c1 = time.perf_counter(), time.process_time()
        return {"total_s": t1 - t0, "cpu_s": c1 - c0, "after_load_s": t1 - t_load, "steps": out["steps"],
                "spent": out["spent"]}

    try:
        ours(warm_meta, 1)  # warm-up: imports, lazy initialisation, allocator
        base(warm_meta, 1)
        runs = {"ours": [], "base": []}
        for order in abba(repeats):
            for side in order:
                r = (ours if side == "ours" else base)(meta, plan["epochs"])
                runs[side].append(r)
                print(f"  (a) {side:4s} {r['total_s']:7.2f} s wall, {r['cpu_s']:7.2f} s CPU "
                      f"(after model load {r['after_load_s']:7.2f} s)", flush=True)
    finally:
        train_mod.load_bundle = real_load
        dm_mod.build_cache = real_build
    ours_t = [r["total_s"] for r in runs["ours"]]
    base_t = [r["total_s"] for r in runs["base"]]
    ours_c = [r["cpu_s"] for r in runs["ours"]]
    base_c = [r["cpu_s"] for r in runs["base"]]
    ours_l = [r["after_load_s"] for r in runs["ours"]]
    base_l = [r["after_load_s"] for r in runs["base"]]
    return {
        "plan": plan, "runs": runs,
        "ours_s": ours_t, "baseline_s": base_t,
        "speedup_median": median(base_t) / median(ours_t),
        "speedup_per_pair": [b / o for o, b in zip(ours_t, base_t)],
        "ours_cpu_s": ours_c, "baseline_cpu_s": base_c,
        "speedup_cpu_median": median(base_c) / median(ours_c),
        "speedup_cpu_per_pair": [b / o for o, b in zip(ours_c, base_c)],
        "speedup_after_load_median": median(base_l) / median(ours_l),
        "baseline_steps": runs["base"][0]["steps"],
        # Share of the baseline's loop spent re-encoding what our cache holds (medians over the repeats).
        "baseline_shares": {k: median(r["spent"][k] / r["spent"]["loop_s"] for r in runs["base"])
                            for k in runs["base"][0]["spent"] if k != "loop_s"},
        "ours_steps": plan["epochs"] * -(-plan["clips"] // plan["batch"]),
    }


# ---- (b) Lightning step vs bare loop ---------------------------------------------------------------------------

def bench_b(work: Path, plan: dict, repeats: int) -> dict:
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    from train_helpers import compose_train

    import training_probes
    from acestep_train.checkpoints.loading import load_bundle
    from acestep_train.training.features import BundleEncoder
    from acestep_train.training.builders import build_datamodule
    from acestep_train.training.train import run
    from datamodules.demo import make_demo_dataset
    from training_baselines import bare_train

    meta = make_demo_dataset(work / "b_songs", n=plan["clips"], seconds=plan["seconds"], seed=0)
    total = plan["warmup"] + plan["steps"]
    ov = common_overrides(meta, work / "b_cache", plan["batch"], plan["seconds"], MID_ARCH) + [
        f"data.repeat={plan['repeat']}", f"trainer.max_steps={total}", "trainer.max_epochs=-1"]
    counter = iter(range(10_000))
    run(compose_train(work / "b_prep", ov + ["preprocess_only=true"]))  # the cache, built once, untimed

    def ours() -> dict:
        cfg = compose_train(work / f"b_run{next(counter)}",
                            ov + ["+callbacks.bench_timer._target_=training_probes.StepTimer"])
        training_probes.TIMERS.clear()
        run(cfg)
        timer = training_probes.TIMERS[-1]
        return {"per_step_s": training_probes.window_per_step(timer.start, timer.end, plan["warmup"]),
                "per_step_cpu_s": training_probes.window_per_step(timer.cpu_start, timer.cpu_end, plan["warmup"]),
                "steps": len(timer.end)}

    def base() -> dict:
        cfg = compose_train(work / f"b_run{next(counter)}", ov)
        bundle = load_bundle(OmegaConf.to_container(cfg.model, resolve=True))
        dm = build_datamodule(cfg)
        dm.connect(BundleEncoder(bundle, seed=int(cfg.seed)))
        dm.setup("fit")
        obj = cfg.objective
        out = bare_train(bundle, dm.train_dataloader(), total, loop_settings(cfg), instantiate(cfg.mode.scheduler),
                         mu=float(obj.mu), sigma=float(obj.sigma), cfg_dropout=float(obj.cfg_dropout),
                         clip=float(cfg.trainer.gradient_clip_val), seed=int(cfg.seed))
        return {"per_step_s": training_probes.window_per_step(out["start"], out["end"], plan["warmup"]),
                "per_step_cpu_s": training_probes.window_per_step(out["cpu_start"], out["cpu_end"], plan["warmup"]),
                "steps": len(out["end"]), "cond_s_median": median(out["cond_s"][plan["warmup"]:])}

    runs = {"ours": [], "base": []}
    for order in abba(repeats):
        for side in order:
            r = (ours if side == "ours" else base)()
            runs[side].append(r)
            print(f"  (b) {side:4s} {1000 * r['per_step_s']:8.1f} ms/step wall, "
                  f"{1000 * r['per_step_cpu_s']:8.1f} ms/step CPU over {plan['steps']} steps", flush=True)
    ours_t = [r["per_step_s"] for r in runs["ours"]]
    base_t = [r["per_step_s"] for r in runs["base"]]
    per_pair = [o / b for o, b in zip(ours_t, base_t)]
    ours_c = [r["per_step_cpu_s"] for r in runs["ours"]]
    base_c = [r["per_step_cpu_s"] for r in runs["base"]]
    per_pair_c = [o / b for o, b in zip(ours_c, base_c)]
    return {
        "ours_cpu_s_per_step": ours_c, "baseline_cpu_s_per_step": base_c, "cpu_ratio_per_pair": per_pair_c,
        "cpu_ratio_median_of_pairs": median(per_pair_c),
        "plan": plan, "runs": runs, "ours_s_per_step": ours_t, "baseline_s_per_step": base_t,
        "ratio_per_pair": per_pair, "ratio_median_of_pairs": median(per_pair),
        "ratio_of_medians": median(ours_t) / median(base_t),
        "condition_encoder_share": median(r["cond_s_median"] for r in runs["base"]) / median(base_t),
    }


# ---- (c) memory with / without gradient checkpointing ----------------------------------------------------------

def bench_c(plan: dict, threads: int, devices: list[str]) -> dict:
    frames = int(round(plan["seconds"] * 25))
    # text/lyric lengths of the demo clips' cached features (tiny byte tokenizer)
    base_spec = {"arch": BIG_ARCH if plan["arch"] == "big" else MID_ARCH, "frames": frames, "batch": plan["batch"],
                 "text_len": 298, "lyric_len": 112,
                 "lora": {"rank": 64, "alpha": 128, "targets": LORA_ATTENTION}, "warmup": plan["warmup"],
                 "measure": plan["measure"]}
    env = dict(os.environ)
    # A fixed threshold turns off glibc's dynamic one: every tensor >= 64 KiB is its own mmap, unmapped on free,
    # so RSS follows live tensors (see training_probes.memory_probe).
    env["MALLOC_MMAP_THRESHOLD_"] = "65536"
    out = {"plan": plan, "frames": frames}
    from training_probes import timing_probe

    for device in devices:
        res = {}
        for ckpt in (False, True):
            spec = dict(base_spec, device=device, checkpointing=ckpt)
            cmd = [sys.executable, str(Path(__file__).resolve()), "--threads", str(threads),
                   "--memory-child", json.dumps(spec)]
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=str(REPO))
            lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("BENCH_JSON ")]
            if proc.returncode != 0 or not lines:
                raise RuntimeError(f"memory probe failed ({device}, checkpointing={ckpt}):\n{proc.stderr[-3000:]}")
            res["checkpointing" if ckpt else "no_checkpointing"] = r = json.loads(lines[-1][len("BENCH_JSON "):])
            print(f"  (c) {device} checkpointing={ckpt!s:5s} peak RSS growth {r['rss_peak_growth_mb']:8.1f} MB"
                  + (f", CUDA {r['cuda_peak_growth_mb']:8.1f} MB" if "cuda_peak_growth_mb" in r else ""), flush=True)
        # Step time in this process (normal allocator, not the children's fixed mmap threshold), alternated.
        res["timing"] = timing = timing_probe(dict(base_spec, device=device), plan["timing_pairs"])
        on, off = res["checkpointing"], res["no_checkpointing"]
        res["rss_ratio_off_over_on"] = off["rss_peak_growth_mb"] / max(on["rss_peak_growth_mb"], 1e-9)
        if "cuda_peak_growth_mb" in on:
            res["cuda_ratio_off_over_on"] = off["cuda_peak_growth_mb"] / max(on["cuda_peak_growth_mb"], 1e-9)
        res["time_ratio_on_over_off_per_pair"] = [a / b for a, b in zip(timing["checkpointing_s"],
                                                                        timing["no_checkpointing_s"])]
        res["time_ratio_on_over_off"] = median(res["time_ratio_on_over_off_per_pair"])
        res["cpu_ratio_on_over_off_per_pair"] = [a / b for a, b in zip(timing["checkpointing_cpu_s"],
                                                                       timing["no_checkpointing_cpu_s"])]
        res["cpu_ratio_on_over_off"] = median(res["cpu_ratio_on_over_off_per_pair"])
        print(f"  (c) {device} step time on/off: wall {fmt_list(res['time_ratio_on_over_off_per_pair'])}, "
              f"CPU {fmt_list(res['cpu_ratio_on_over_off_per_pair'])}", flush=True)
        out[device] = res
    return out


# ---- report ----------------------------------------------------------------------------------------------------

def fmt_list(xs, scale=1.0, digits=2) -> str:
    return ", ".join(f"{scale * x:.{digits}f}" for x in xs)


def table(results: dict) -> str:
    """Markdown: one row per measured quantity. Ratios are medians (of per-pair ratios where paired)."""
    rows = ["| benchmark | ours | baseline | ratio, wall | ratio, CPU time | goal | raw |",
            "|---|---|---|---|---|---|---|"]
    if "a" in results:
        a = results["a"]
        p = a["plan"]
        rows.append(
            f"| (a) {p['epochs']} epochs from audio, {p['clips']} clips x {p['seconds']:g} s, end to end "
            f"| {median(a['ours_s']):.1f} s (bs {p['batch']}, cache, {a['ours_steps']} steps) "
            f"| {median(a['baseline_s']):.1f} s (DiffSynth-style, bs 1, {a['baseline_steps']} steps) "
            f"| **{a['speedup_median']:.2f}x** faster | {a['speedup_cpu_median']:.2f}x less | >= 5x "
            f"| wall: ours [{fmt_list(a['ours_s'])}] s, baseline [{fmt_list(a['baseline_s'])}] s, per pair "
            f"[{fmt_list(a['speedup_per_pair'])}]x; CPU: ours [{fmt_list(a['ours_cpu_s'])}] s, baseline "
            f"[{fmt_list(a['baseline_cpu_s'])}] s, per pair [{fmt_list(a['speedup_cpu_per_pair'])}]x |")
        ol = [r["after_load_s"] for r in a["runs"]["ours"]]
        bl = [r["after_load_s"] for r in a["runs"]["base"]]
        rows.append(f"| (a) excluding model construction | {median(ol):.1f} s | {median(bl):.1f} s "
                    f"| {a['speedup_after_load_median']:.2f}x faster | | | ours [{fmt_list(ol)}] s; "
                    f"baseline [{fmt_list(bl)}] s |")
        cb = [r["cache_build_s"] for r in a["runs"]["ours"]]
        sh = a["baseline_shares"]
        rows.append(f"| (a) where the time goes | feature-cache build {median(cb):.1f} s "
                    f"({100 * median(cb) / median(a['ours_s']):.0f} %); the rest: model load, Lightning setup, "
                    f"{a['ours_steps']} steps | " + ", ".join(
                        f"{k[:-2].replace('_', ' ')} {100 * v:.0f} %" for k, v in sh.items())
                    + f"; DiT + optimizer {100 * (1 - sum(sh.values())):.0f} % | | | | cache build "
                    f"[{fmt_list(cb)}] s |")
    if "b" in results:
        b = results["b"]
        p = b["plan"]
        rows.append(
            f"| (b) training step, cached data, bs {p['batch']}, {p['steps']} steps after {p['warmup']} warm-up "
            f"| {1000 * median(b['ours_s_per_step']):.1f} ms/step (Lightning `Trainer.fit`) "
            f"| {1000 * median(b['baseline_s_per_step']):.1f} ms/step (bare loop) "
            f"| **{b['ratio_median_of_pairs']:.3f}** ours/bare | {b['cpu_ratio_median_of_pairs']:.3f} ours/bare "
            f"| <= 1.10 | wall: ours [{fmt_list(b['ours_s_per_step'], 1000, 1)}] ms, bare "
            f"[{fmt_list(b['baseline_s_per_step'], 1000, 1)}] ms, per pair [{fmt_list(b['ratio_per_pair'], 1, 3)}]; "
            f"CPU: ours [{fmt_list(b['ours_cpu_s_per_step'], 1000, 1)}] ms, bare "
            f"[{fmt_list(b['baseline_cpu_s_per_step'], 1000, 1)}] ms, per pair "
            f"[{fmt_list(b['cpu_ratio_per_pair'], 1, 3)}] |")
        rows.append(f"| (b) share of the step in the frozen condition encoder | | "
                    f"{100 * b['condition_encoder_share']:.0f} % of the bare step (wall) | | | | |")
    if "c" in results:
        c = results["c"]
        p = c["plan"]
        for device in ("cpu", "cuda"):
            if device not in c:
                continue
            r = c[device]
            on, off = r["checkpointing"], r["no_checkpointing"]
            size = "hidden 512 x 8 layers" if p["arch"] == "big" else "hidden 256 x 4 layers"
            label = f"(c) DiT step, {size}, {p['seconds']:g} s x bs {p['batch']}, {device}"
            rows.append(
                f"| {label}: peak RSS growth | {on['rss_peak_growth_mb']:.0f} MB (checkpointing) "
                f"| {off['rss_peak_growth_mb']:.0f} MB (none) | **{r['rss_ratio_off_over_on']:.1f}x** less memory "
                f"| | | on [{fmt_list([s['rss_peak_growth_mb'] for s in on['steps']], 1, 0)}] MB; off "
                f"[{fmt_list([s['rss_peak_growth_mb'] for s in off['steps']], 1, 0)}] MB |")
            if "cuda_peak_growth_mb" in on:
                rows.append(f"| {label}: `max_memory_allocated` growth | {on['cuda_peak_growth_mb']:.0f} MB "
                            f"| {off['cuda_peak_growth_mb']:.0f} MB | {r['cuda_ratio_off_over_on']:.1f}x less "
                            f"| | | |")
            t = r["timing"]
            rows.append(
                f"| {label}: step time | {median(t['checkpointing_s']):.2f} s (checkpointing) "
                f"| {median(t['no_checkpointing_s']):.2f} s (none) | {r['time_ratio_on_over_off']:.2f}x slower "
                f"| {r['cpu_ratio_on_over_off']:.2f}x more | | wall: on [{fmt_list(t['checkpointing_s'])}] s, off "
                f"[{fmt_list(t['no_checkpointing_s'])}] s; CPU: on [{fmt_list(t['checkpointing_cpu_s'])}] s, off "
                f"[{fmt_list(t['no_checkpointing_cpu_s'])}] s (alternated) |")
    return "\n".join(rows)


def machine() -> dict:
    import torch

    load = os.getloadavg()
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"), "host": platform.node(),
            "cpus": os.cpu_count(), "loadavg_at_start": load, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "cuda": torch.cuda.is_available(),
            "python": sys.version.split()[0]}


def main() -> None:
    args = parse_args()
    set_threads(args.threads)
    if args.memory_child:
        quiet()
        import torch

        torch.set_num_threads(args.threads)
        from training_probes import memory_probe

        print("BENCH_JSON " + json.dumps(memory_probe(json.loads(args.memory_child))), flush=True)
        return

    import torch

    torch.set_num_threads(args.threads)
    quiet()
    mode = "quick" if args.quick else "full"
    plans = PLANS[mode]
    only = {s.strip() for s in args.only.split(",") if s.strip()}
    if only - {"a", "b", "c"}:
        raise SystemExit(f"--only takes a subset of a,b,c, got {args.only!r}")
    if args.repeats is not None and args.repeats < 3:
        raise SystemExit("--repeats must be >= 3 (results are medians)")
    devices = [args.device] if args.device else (["cpu", "cuda"] if torch.cuda.is_available() else ["cpu"])
    out = Path(args.out) if args.out else (
        Path(tempfile.gettempdir()) / "acestep-bench" / f"bench_training-{mode}-{time.strftime('%Y%m%d-%H%M%S')}.json")

    info = machine()
    print(f"# bench_training ({mode}): {info['cpus']} CPUs, load average {info['loadavg_at_start'][0]:.2f}, "
          f"torch {info['torch']} with {info['torch_threads']} thread(s), CUDA {info['cuda']}", flush=True)
    results: dict = {"mode": mode, "machine": info}
    t_start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="acestep-bench-") as tmp:
        work = Path(tmp)
        if "a" in only:
            results["a"] = bench_a(work, plans["a"], args.repeats or plans["a"]["repeats"])
        if "b" in only:
            results["b"] = bench_b(work, plans["b"], args.repeats or plans["b"]["repeats"])
        if "c" in only:
            results["c"] = bench_c(plans["c"], args.threads, devices)
    results["machine"]["loadavg_at_end"] = os.getloadavg()
    results["wall_s"] = time.perf_counter() - t_start
    md = table(results)
    results["table_markdown"] = md
    print()
    print(md)
    print(f"\nwall time {results['wall_s']:.0f} s; load average at end {results['machine']['loadavg_at_end'][0]:.2f}")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=2, default=str) + "\n")
    print(f"JSON: {out}")


if __name__ == "__main__":
    main()
