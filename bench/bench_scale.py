"""Scale-out benchmark: the full-size 2B DiT training step (time, MFU) and XL LoRA peak memory per strategy.

    .venv/bin/python bench/bench_scale.py                          # both parts, on the first CUDA GPU
    .venv/bin/python bench/bench_scale.py --only step --seconds 120 --batch 2 --no-grad-ckpt
    .venv/bin/python bench/bench_scale.py --only memory --strategies ddp,fsdp,deepspeed_zero2 --json "$(mktemp -d)/scale.json"
    .venv/bin/python bench/bench_scale.py --check-on-cpu            # model=tiny on the CPU: checks the plumbing only

A benchmark, not a test; it asserts nothing. Without CUDA it says that it needs a GPU and exits 0.

(1) step: the 2B DiT (``conf/model/turbo.yaml`` arch: 24 layers, hidden 2048, GQA 16/8 heads, sliding window 128 on
    every other layer) built on the meta device and materialised on the GPU with random weights, trained the way
    ``mode=full trainer=gpu`` trains it: float32 master weights, bf16 autocast (``--master bf16``: bf16 weights),
    per-layer gradient checkpointing (``--no-grad-ckpt`` to disable), masked MSE, gradient clipping at 1.0, fused AdamW.
    Random x_t / context / condition tensors of the shapes a ``--seconds`` clip produces; ``--warmup`` untimed steps,
    then the median of ``--steps`` CUDA-event-timed optimizer steps.
(2) memory: XL (``model=xl-sft``) with ``mode=lora`` (rank 64, alpha 128, attention targets, gradient checkpointing)
    through the real ``AceStepModule`` and a Lightning ``Trainer`` for each strategy of ``conf/trainer/<name>.yaml`` at
    ``trainer.devices=1`` (one GPU: the numbers show each strategy's own overhead, not sharding across GPUs), on
    random weights (bf16; float32 under FSDP, which ``acestep_train.training.checks.check_fsdp_dtype`` requires) and synthetic
    batches of a ``--mem-seconds`` clip. Each strategy runs in a fresh subprocess; ``torch.cuda.max_memory_allocated``
    covers the whole fit (weights included). A strategy that cannot run (DeepSpeed not installed, an error) is listed
    with the reason.

FLOPs per optimizer step, the convention of "model FLOPs" (recomputation by gradient checkpointing is not counted;
it is work the GPU does on top, so MFU with checkpointing on is lower than hardware utilisation):

    S = ceil(25 * seconds / patch_size) audio tokens, L = condition tokens (``--cond-tokens``), B = batch
    dense     = 6 * B * (S * N_tok + L * N_cond)
                N_tok  = weights applied once per audio token: self-attention q/k/v/o, cross-attention q/o, MLP
                         gate/up/down, proj_in (Conv1d) and proj_out (ConvTranspose1d)
                N_cond = weights applied once per condition token: cross-attention k/v, condition_embedder
                (6 = 2 FLOPs per multiply-add x (forward + 2 x forward for backward); per-sample timestep MLPs omitted)
    attention = 3 * B * sum over layers of 4 * H * d_head * (P_self + S * L)
                P_self = S^2 for full-attention layers, and the number of (query, key) token pairs with
                |i - j| <= sliding_window for sliding-window layers (the work the model needs; the masked SDPA kernel
                still computes all S^2 pairs); 4 * H * d_head per pair = QK^T and PV, 2 FLOPs per multiply-add each
    MFU       = (dense + attention) / step time / peak dense bf16 FLOP/s of the GPU
                (``--peak-tflops``; default from the device name: H100/H200 SXM 989, H100 PCIe 756, A100 312, ...)
"""

from __future__ import annotations

import argparse
import json
import math
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import nn

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

GB = 1024**3
FRAMES_PER_SECOND = 25
STRATEGIES = ("ddp", "fsdp", "deepspeed_zero2", "deepspeed_zero3")
# Dense bf16 tensor-core peak (no sparsity), TFLOP/s. First match on the device name wins.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100", 989.0), ("H200", 989.0), ("H800", 989.0), ("GH200", 989.0),
               ("B200", 2250.0), ("A100", 312.0), ("A800", 312.0), ("L40S", 362.0), ("L40", 181.0),
               ("A6000", 155.0), ("RTX 4090", 165.0), ("A10", 125.0), ("L4", 121.0)]


# ---- FLOPs -----------------------------------------------------------------------------------------------------
def dense_weights(dit: nn.Module) -> tuple[int, int]:
    """(N_tok, N_cond): weights applied per audio token and per condition token (see the module docstring)."""
    n_tok = n_cond = 0
    for name, m in dit.named_modules():
        if not isinstance(m, (nn.Linear, nn.Conv1d, nn.ConvTranspose1d)):
            continue
        if name.startswith(("time_embed", "base_model")) or ".lora_" in name:
            continue  # per-sample timestep MLPs; adapters are not part of the benchmarked full model
        w = m.weight.numel()
        if name == "condition_embedder" or re.search(r"cross_attn\.(k_proj|v_proj)$", name):
            n_cond += w
        else:
            n_tok += w
    return n_tok, n_cond


def window_pairs(s: int, w: int | None) -> int:
    """Number of (i, j) in [0, s)^2 with |i - j| <= w (all s^2 pairs when w is None)."""
    if w is None or w >= s - 1:
        return s * s
    return s * (2 * w + 1) - w * (w + 1)


def step_flops(dit: nn.Module, batch: int, tokens: int, cond: int) -> dict[str, float]:
    cfg = dit.cfg
    n_tok, n_cond = dense_weights(dit)
    dense = 6.0 * batch * (tokens * n_tok + cond * n_cond)
    attn = 0.0
    per_pair = 4.0 * cfg.num_attention_heads * cfg.head_dim
    for kind in cfg.layer_types[: cfg.num_hidden_layers]:
        window = cfg.sliding_window if kind == "sliding_attention" else None
        attn += per_pair * (window_pairs(tokens, window) + tokens * cond)
    attn *= 3.0 * batch
    return {"dense": dense, "attention": attn, "total": dense + attn, "n_tok": n_tok, "n_cond": n_cond}


def peak_tflops(name: str) -> float | None:
    for key, value in PEAK_TFLOPS:
        if key.lower() in name.lower():
            return value
    return None


# ---- models with random weights -------------------------------------------------------------------------------
def random_init_(module: nn.Module, seed: int = 0) -> None:
    """N(0, 0.02) weights (norm weights 1, biases 0) in place, on whatever device the module is on."""
    g = torch.Generator(device=next(module.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            leaf = name.rsplit(".", 2)
            if "norm" in name.rsplit(".", 1)[0].rsplit(".", 1)[-1]:
                p.fill_(1.0)
            elif leaf[-1] == "bias":
                p.zero_()
            else:
                p.normal_(0.0, 0.02, generator=g)


def arch(size: str):
    from omegaconf import OmegaConf

    from acestep_train import model_config
    from acestep_train.checkpoints.loading import arch_from_cfg

    return arch_from_cfg(OmegaConf.to_container(model_config(size), resolve=True)["arch"])


def build_dit(size: str, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The DiT of variant ``size`` with random weights: built on meta, materialised directly on ``device``."""
    from acestep_train.models.dit import AceStepDiT

    with torch.device("meta"):
        dit = AceStepDiT(arch(size))
    dit = dit.to(dtype).to_empty(device=device)
    random_init_(dit)
    return dit


def build_bundle(size: str, device: torch.device, dtype: torch.dtype):
    """A ``ModelBundle`` (DiT + condition encoder + (de)tokenizer; no VAE or text encoder: training from cached
    features needs neither) with random weights materialised on ``device``."""
    from acestep_train.checkpoints.loading import ModelBundle
    from acestep_train.models.acestep import AceStepModel

    cfg = arch(size)
    with torch.device("meta"):
        model = AceStepModel(cfg)
    model = model.to(dtype).to_empty(device=device)
    random_init_(model)
    silence = torch.randn(1, 15000, cfg.audio_acoustic_hidden_dim) * 0.5
    return ModelBundle(f"{size}-random", model.eval(), None, None, silence, None)


# ---- (1) the 2B training step ---------------------------------------------------------------------------------
def bench_step(args, device: torch.device) -> dict:
    master = torch.float32 if args.master == "fp32" else torch.bfloat16
    torch.manual_seed(0)
    dit = build_dit(args.size, device, master)
    dit.gradient_checkpointing = args.grad_ckpt
    dit.train().requires_grad_(True)
    cfg = dit.cfg
    b, frames, cond = args.batch, int(round(FRAMES_PER_SECOND * args.seconds)), args.cond_tokens
    tokens = math.ceil(frames / cfg.patch_size)
    d = cfg.audio_acoustic_hidden_dim
    x0 = torch.randn(b, frames, d, device=device)
    noise = torch.randn(b, frames, d, device=device)
    ctx = torch.randn(b, frames, 2 * d, device=device)
    enc = torch.randn(b, cond, cfg.encoder_width, device=device)
    mask = torch.ones(b, frames, dtype=torch.bool, device=device)
    enc_mask = torch.ones(b, cond, dtype=torch.bool, device=device)
    t = torch.rand(b, device=device)
    x_t = t[:, None, None] * noise + (1 - t[:, None, None]) * x0
    target = noise - x0
    fused = device.type == "cuda"
    opt = torch.optim.AdamW(dit.parameters(), lr=1e-5, weight_decay=0.01, fused=fused)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=True)

    def step() -> float:
        with autocast:
            v = dit(x_t, t, t, enc, ctx, attention_mask=mask, encoder_attention_mask=enc_mask)
        loss = (v.float() - target).pow(2).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dit.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        return loss

    times = []
    for i in range(args.warmup + args.steps):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            loss = step()
            end.record()
            torch.cuda.synchronize()
            elapsed = start.elapsed_time(end) / 1000
        else:
            t0 = time.perf_counter()
            loss = step()
            elapsed = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(elapsed)
    if not torch.isfinite(loss):
        raise FloatingPointError(f"non-finite loss {loss.item()} in the step benchmark")
    flops = step_flops(dit, b, tokens, cond)
    sec = statistics.median(times)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    peak = args.peak_tflops or (peak_tflops(name) if device.type == "cuda" else None)
    achieved = flops["total"] / sec / 1e12
    return {
        "size": args.size, "device": name, "params": sum(p.numel() for p in dit.parameters()),
        "master": args.master, "grad_ckpt": args.grad_ckpt, "batch": b, "seconds": args.seconds,
        "tokens": tokens, "cond_tokens": cond, "step_s": sec, "step_s_all": times,
        "tokens_per_s": b * tokens / sec, "flops": flops, "tflops": achieved,
        "peak_tflops": peak, "mfu": achieved / peak if peak else None,
        "max_allocated_gb": torch.cuda.max_memory_allocated(device) / GB if device.type == "cuda" else None,
    }


# ---- (2) XL LoRA memory per strategy (one subprocess each) -----------------------------------------------------
class _Batches(torch.utils.data.Dataset):
    def __init__(self, n: int, batch: int, frames: int, text: int, lyrics: int, latent_dim: int, width: int):
        from datamodules.batch import Batch

        g = torch.Generator().manual_seed(0)
        self.items = [Batch(latents=torch.randn(batch, frames, latent_dim, generator=g),
                            latent_mask=torch.ones(batch, frames, dtype=torch.bool),
                            text_hidden=torch.randn(batch, text, width, generator=g),
                            text_mask=torch.ones(batch, text, dtype=torch.bool),
                            lyric_embeds=torch.randn(batch, lyrics, width, generator=g),
                            lyric_mask=torch.ones(batch, lyrics, dtype=torch.bool),
                            ids=[f"synthetic{i}" for i in range(batch)]) for _ in range(n)]

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def _identity(x):
    return x


def memory_child(spec: dict) -> dict:
    """Train ``spec['steps']`` steps of XL LoRA with one strategy; peak memory and step time."""
    import lightning as L
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from acestep_train.training import checks
    from acestep_train.training import builders, train
    from acestep_train.checkpoints.variants import CONF_DIR

    from hydra import compose, initialize_config_dir

    cpu = spec["device"] == "cpu"
    overrides = [f"model={spec['size']}", "mode=lora", f"trainer={spec['strategy']}", "trainer.devices=1",
                 "logger=[]", "callbacks=none", "hydra.run.dir=" + spec["workdir"]]
    if spec["strategy"].startswith("fsdp"):
        overrides.append("model.dtype=float32")
    if cpu:
        overrides += ["trainer.accelerator=cpu", "trainer.precision=32-true"]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="train", overrides=overrides)
    name = train._strategy_name(cfg.trainer.strategy)
    checks.check_strategy_installed(name)
    checks.check_fsdp_dtype(name, cfg.model.get("dtype"), cfg.trainer.precision)
    device = torch.device("cpu" if cpu else "cuda")
    dtype = getattr(torch, str(cfg.model.dtype))
    if not cpu:
        torch.cuda.reset_peak_memory_stats()
    bundle = build_bundle(spec["size"], torch.device("cpu") if cpu else device, dtype)
    module = builders.build_module(cfg, bundle)
    weights = sum(p.numel() * p.element_size() for p in module.parameters())
    trainable = sum(p.numel() for p in module.parameters() if p.requires_grad)
    c = bundle.config
    frames = int(round(FRAMES_PER_SECOND * spec["seconds"]))
    data = _Batches(spec["steps"], spec["batch"], frames, spec["text_tokens"], spec["lyric_tokens"],
                    c.audio_acoustic_hidden_dim, c.text_hidden_dim)
    loader = torch.utils.data.DataLoader(data, batch_size=None, collate_fn=_identity)

    class Timer(L.Callback):
        def __init__(self):
            self.t: list[float] = []

        def on_train_batch_start(self, *a):
            if not cpu:
                torch.cuda.synchronize()
            self.t0 = time.perf_counter()

        def on_train_batch_end(self, *a):
            if not cpu:
                torch.cuda.synchronize()
            self.t.append(time.perf_counter() - self.t0)

    timer = Timer()
    trainer_kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    strategy = trainer_kwargs.pop("strategy")
    trainer_kwargs.update(max_steps=spec["steps"], max_epochs=1, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                          default_root_dir=spec["workdir"])
    trainer = L.Trainer(**trainer_kwargs, strategy=instantiate(strategy) if isinstance(strategy, dict) else strategy,
                        callbacks=[timer])
    trainer.fit(module, train_dataloaders=loader)
    out = {"strategy": spec["strategy"], "size": spec["size"], "status": "ok", "weights_gb": weights / GB, "trainable": trainable,
           "model_dtype": str(cfg.model.dtype), "precision": str(cfg.trainer.precision),
           "step_s": statistics.median(timer.t[1:] or timer.t)}
    if not cpu:
        out["peak_allocated_gb"] = torch.cuda.max_memory_allocated() / GB
        out["peak_reserved_gb"] = torch.cuda.max_memory_reserved() / GB
    return out


def bench_memory(args, device: torch.device) -> list[dict]:
    results = []
    for strategy in args.strategies.split(","):
        if device.type == "cpu" and strategy != "ddp":
            results.append({"strategy": strategy, "status": "skipped: needs CUDA"})
            continue
        with tempfile.TemporaryDirectory(prefix="bench-scale-") as work:
            spec = {"strategy": strategy, "size": args.mem_size, "device": device.type, "workdir": work,
                    "seconds": args.mem_seconds, "batch": args.mem_batch, "steps": args.mem_steps,
                    "text_tokens": args.text_tokens, "lyric_tokens": args.lyric_tokens}
            env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
                   "MASTER_PORT": str(29500 + len(results)), "TOKENIZERS_PARALLELISM": "false"}
            for k in [k for k in env if k.startswith("SLURM_")]:
                del env[k]
            t0 = time.perf_counter()
            try:
                proc = subprocess.run([sys.executable, __file__, "--memory-child", json.dumps(spec)], env=env,
                                      cwd=work, capture_output=True, text=True, timeout=args.child_timeout)
            except subprocess.TimeoutExpired:
                results.append({"strategy": strategy, "status": f"timed out after {args.child_timeout} s"})
                continue
            found = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
            if proc.returncode == 0 and found:
                result = json.loads(found[-1][len("RESULT "):])
            else:
                lines = [ln for ln in (proc.stderr or proc.stdout).strip().splitlines() if ln.strip()]
                result = {"strategy": strategy, "status": f"failed: {lines[-1] if lines else proc.returncode}"[:160]}
            result["wall_s"] = time.perf_counter() - t0
            results.append(result)
            print(f"  {strategy}: {result['status']} ({result['wall_s']:.0f} s)", flush=True)
    return results


# ---- report ------------------------------------------------------------------------------------------------------
def fmt(x, spec: str = ".2f", none: str = "-") -> str:
    return none if x is None else format(x, spec)


def report(step: dict | None, memory: list[dict] | None, mem_size: str = "xl-sft") -> str:
    out = []
    if step:
        f = step["flops"]
        out += [f"(1) {step['size']} DiT training step on {step['device']}: {step['params'] / 1e9:.3f} B params, "
                f"{step['master']} master weights + bf16 autocast, gradient checkpointing "
                f"{'on' if step['grad_ckpt'] else 'off'}, batch {step['batch']} x {step['seconds']:g} s "
                f"({step['tokens']} tokens + {step['cond_tokens']} condition tokens)",
                "",
                "| step (s) | tokens/s | model TFLOP/step | of which attention | achieved TFLOP/s | peak | MFU |",
                "|---:|---:|---:|---:|---:|---:|---:|",
                f"| {step['step_s']:.3f} | {step['tokens_per_s']:,.0f} | {f['total'] / 1e12:.1f} | "
                f"{f['attention'] / f['total']:.1%} | {step['tflops']:.1f} | {fmt(step['peak_tflops'], '.0f')} | "
                f"{fmt(step['mfu'], '.1%')} |",
                "",
                f"N_tok = {f['n_tok'] / 1e9:.3f} B weights per audio token, N_cond = {f['n_cond'] / 1e6:.0f} M per "
                f"condition token; peak allocated {fmt(step['max_allocated_gb'], '.1f')} GB; all step times (s): "
                + ", ".join(f"{t:.3f}" for t in step["step_s_all"]), ""]
    if memory:
        out += [f"(2) {mem_size} LoRA (mode=lora: r64, attention, gradient checkpointing) peak memory, 1 GPU (trainer.devices=1)", "",
                "| strategy | base dtype | precision | weights (GB) | peak allocated (GB) | peak reserved (GB) | step (s) | status |",
                "|---|---|---|---:|---:|---:|---:|---|"]
        for r in memory:
            out.append(f"| {r['strategy']} | {r.get('model_dtype', '-')} | {r.get('precision', '-')} | "
                       f"{fmt(r.get('weights_gb'))} | {fmt(r.get('peak_allocated_gb'))} | "
                       f"{fmt(r.get('peak_reserved_gb'))} | {fmt(r.get('step_s'), '.3f')} | {r['status']} |")
    return "\n".join(out)


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", default="step,memory", help="comma-separated subset of step,memory")
    ap.add_argument("--size", default="turbo", help="(1) variant whose DiT is timed (a 2B one by default)")
    ap.add_argument("--seconds", type=float, default=240.0, help="(1) clip length (240 s = 3000 tokens)")
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--cond-tokens", type=int, default=768, help="(1) packed condition length (caption+lyrics+timbre)")
    ap.add_argument("--master", choices=["fp32", "bf16"], default="fp32", help="(1) weight/optimizer dtype")
    ap.add_argument("--no-grad-ckpt", dest="grad_ckpt", action="store_false")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak of the GPU (TFLOP/s)")
    ap.add_argument("--strategies", default=",".join(STRATEGIES), help="(2) conf/trainer names")
    ap.add_argument("--mem-size", default="xl-sft", help="(2) variant trained with LoRA")
    ap.add_argument("--mem-seconds", type=float, default=240.0)
    ap.add_argument("--mem-batch", type=int, default=1)
    ap.add_argument("--mem-steps", type=int, default=4)
    ap.add_argument("--text-tokens", type=int, default=256)
    ap.add_argument("--lyric-tokens", type=int, default=512)
    ap.add_argument("--child-timeout", type=int, default=1200)
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    ap.add_argument("--check-on-cpu", action="store_true",
                    help="run both parts with model=tiny on the CPU (only ddp for (2)): checks this script, "
                         "measures nothing meaningful")
    ap.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        import warnings

        warnings.filterwarnings("ignore")
        print("RESULT " + json.dumps(memory_child(json.loads(args.memory_child))), flush=True)
        return 0
    if args.check_on_cpu:
        torch.set_num_threads(1)
        device = torch.device("cpu")
        args.size = args.mem_size = "tiny"
        args.seconds = args.mem_seconds = min(args.seconds, 4.0)
        args.cond_tokens, args.text_tokens, args.lyric_tokens = 32, 16, 16
        args.warmup, args.steps, args.mem_steps = 1, 2, 2
    elif not torch.cuda.is_available():
        print("bench_scale.py needs a CUDA GPU (torch.cuda.is_available() is False here); nothing measured. "
              "`--check-on-cpu` runs the script's plumbing with model=tiny on the CPU.")
        return 0
    else:
        device = torch.device("cuda")
    parts = set(args.only.split(","))
    step = memory = None
    if "step" in parts:
        print(f"(1) timing the {args.size} DiT training step ...", flush=True)
        step = bench_step(args, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    if "memory" in parts:
        print(f"(2) {args.mem_size} LoRA peak memory per strategy (one subprocess each) ...", flush=True)
        memory = bench_memory(args, device)
    print()
    print(report(step, memory, args.mem_size))
    if args.json:
        args.json.write_text(json.dumps({"step": step, "memory": memory}, indent=2, default=str))
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
