"""Peak GPU memory of low-VRAM generation (``acestep_train.inference.offload``) with a turbo-sized model.

    .venv/bin/python bench/bench_low_vram.py                                  # limits: none 8 4 2 1 (GB), 30 s
    .venv/bin/python bench/bench_low_vram.py --limits none 3 1.5 --vae-chunk 256 --json low_vram.json
    .venv/bin/python bench/bench_low_vram.py --device cpu --size tiny          # checks this script without a GPU

A benchmark, not a test. Builds the turbo architecture (``conf/model/turbo.yaml``: DiT 1.58 B, condition encoder,
(de)tokenizer) on the meta device and materialises it on the CPU with random bf16 weights, plus a released-size VAE
(fp32) and a Qwen3-Embedding-0.6B-sized text encoder (bf16, with the offline byte tokenizer): no download, same
shapes and bytes as the released model. For each ``vram_limit`` (``none`` = everything on the GPU, no offload) it runs
one text2music generation of ``--seconds`` (turbo, 8 steps, tiled VAE decode) after a warm-up and reports
``torch.cuda.max_memory_allocated`` (weights + activations), ``max_memory_reserved``, the manager's peak weight bytes,
host-to-device traffic and wall time. The limit covers weights only: peak - limit is the activation headroom a GPU
needs on top (VAE decode tiles dominate; ``--vae-chunk`` shrinks them). Without CUDA it says so and exits 1.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GB = 1024**3


def _init_(module: torch.nn.Module) -> None:
    """Random weights in place, fast: slices of one N(0, 0.02) pool (norm weights 1), so activations stay finite.
    The values do not matter for memory and time, only the shapes and dtypes."""
    g = torch.Generator().manual_seed(0)
    pool = torch.randn(1 << 22, generator=g) * 0.02
    with torch.no_grad():
        for name, p in module.named_parameters():
            owner = name.rsplit(".", 1)[0].rsplit(".", 1)[-1]
            if "norm" in owner:
                p.fill_(1.0)
                continue
            flat = p.view(-1)
            offset = int(torch.randint(0, pool.numel() // 2, (1,), generator=g))
            src = pool[offset:]
            for start in range(0, flat.numel(), src.numel()):
                part = flat[start:start + src.numel()]
                part.copy_(src[:part.numel()])


def build_bundle(size: str):
    """A ModelBundle with random weights: ``turbo`` (released sizes, meta -> CPU) or ``tiny`` (the test model)."""
    from acestep_train import load_model
    from acestep_train import model_config
    from acestep_train.checkpoints.loading import ModelBundle, SamplingDefaults, arch_from_cfg
    from acestep_train.models.acestep import AceStepModel
    from acestep_train.models.audio_tokenizer import make_quantizer
    from acestep_train.models.text_encoder import RELEASED_QWEN3_CONFIG, TextEncoder
    from acestep_train.models.tiny_tokenizer import build_tiny_tokenizer
    from acestep_train.models.vae import RELEASED_VAE_CONFIG, AudioVAE
    from omegaconf import OmegaConf
    from transformers import Qwen3Config, Qwen3Model

    if size == "tiny":
        return load_model("tiny")
    cfg = OmegaConf.to_container(model_config(size), resolve=True)
    arch = arch_from_cfg(cfg["arch"])
    dtype = torch.bfloat16
    t0 = time.perf_counter()
    with torch.device("meta"):
        model = AceStepModel(arch)
    model = model.to(dtype).to_empty(device="cpu")
    _init_(model)
    model.tokenizer.quantizer = make_quantizer(arch)  # real FSQ buffers (to_empty left garbage)
    for p in model.tokenizer.quantizer.parameters():
        p.data = p.data.to(dtype)
    with torch.device("meta"):
        qwen = Qwen3Model(Qwen3Config(**RELEASED_QWEN3_CONFIG))
    qwen = qwen.to(dtype).to_empty(device="cpu")
    _init_(qwen)
    qwen.rotary_emb = type(qwen.rotary_emb)(config=qwen.config)  # inv_freq buffer computed for real
    te = TextEncoder(qwen.eval(), build_tiny_tokenizer(), max_caption_tokens=1024, max_lyric_tokens=8192)
    torch.manual_seed(0)
    vae = AudioVAE.from_config(dict(RELEASED_VAE_CONFIG), dtype=torch.float32)
    silence = torch.randn(1, 15000, arch.audio_acoustic_hidden_dim) * 0.5
    sampling = SamplingDefaults(**{k: (tuple(v) if k == "guidance_interval" else v)
                                   for k, v in cfg["sampling"].items()})
    print(f"built random {size} bundle on the CPU in {time.perf_counter() - t0:.1f} s: "
          f"model {sum(p.numel() for p in model.parameters()) / 1e9:.3f} B params (bf16), "
          f"VAE {sum(p.numel() for p in vae.parameters()) / 1e6:.1f} M (fp32), "
          f"text encoder {sum(p.numel() for p in qwen.parameters()) / 1e6:.1f} M (bf16)", flush=True)
    return ModelBundle(f"{size}-random", model.eval(), vae.eval(), te, silence, sampling)


def _move(bundle, device) -> None:
    for m in (bundle.model, bundle.vae, bundle.text_encoder):
        m.to(device)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--limits", nargs="+", default=["none", "8", "4", "2", "1"],
                    help="vram_limit values in GB; 'none' = no offload, everything on the GPU")
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--size", default="turbo", help="turbo (or another 2B/XL variant name) | tiny")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--vae-chunk", type=int, default=None, help="VAE decode tile in latent frames (default 512)")
    ap.add_argument("--vae-overlap", type=int, default=None, help="discarded context per side (default 64)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()

    device = torch.device(args.device)
    cuda = device.type == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("bench_low_vram.py needs a CUDA GPU (torch.cuda.is_available() is False here); "
                 "`--device cpu --size tiny` only checks that the script runs")

    from acestep_train.inference.offload import OffloadManager
    from acestep_train.inference import GenerationRequest, Sampler

    bundle = build_bundle(args.size)
    if args.vae_chunk:
        bundle.vae.decode_chunk_frames = args.vae_chunk
    if args.vae_overlap is not None:
        bundle.vae.decode_overlap_frames = args.vae_overlap
    request = GenerationRequest(prompt="lo-fi hip hop, mellow piano, vinyl crackle, 80 bpm",
                                lyrics="[verse]\n" + "walking down the empty street tonight\n" * 8,
                                duration=args.seconds, seed=0)
    sampler = Sampler(bundle, tiled_decode=True)

    def sync():
        if cuda:
            torch.cuda.synchronize(device)

    def generate():
        sync()
        if cuda:
            torch.cuda.reset_peak_memory_stats(device)
        t0 = time.perf_counter()
        out = sampler([request], progress=False)
        sync()
        return out, time.perf_counter() - t0

    limits = [None if s.lower() in ("none", "null", "off") else float(s) for s in args.limits]
    # Offloaded runs first (the full-GPU run moves the weights; the manager pins the CPU copies once).
    order = [lim for lim in limits if lim is not None] + [lim for lim in limits if lim is None]
    rows = []
    warmed = False
    for limit in order:
        row = {"vram_limit_gb": limit, "seconds_audio": args.seconds}
        try:
            if limit is None:
                _move(bundle, device)
                if not warmed:
                    generate()
                    warmed = True
                out, wall = generate()
                _move(bundle, "cpu")
                row.update(weights_peak_gb=None, moved_gb=None)
            else:
                mgr = OffloadManager(bundle, device, vram_limit_gb=limit)
                with mgr:
                    if not warmed:
                        generate()
                        warmed = True
                    mgr.peak_bytes = mgr.resident_bytes
                    moved0 = mgr.moved_bytes
                    out, wall = generate()
                    rep = mgr.report()
                row.update(weights_peak_gb=rep["peak_resident_bytes"] / GB, moved_gb=(rep["moved_bytes"] - moved0) / GB,
                           min_limit_gb=rep["min_limit_bytes"] / GB, overflows=rep["overflows"])
            row.update(wall_s=wall, finite=bool(torch.isfinite(out.audio).all()))
            if cuda:
                row.update(max_allocated_gb=torch.cuda.max_memory_allocated(device) / GB,
                           max_reserved_gb=torch.cuda.max_memory_reserved(device) / GB)
        except Exception as e:  # e.g. out of memory at a limit that is too small: report and go on
            row.update(error=f"{type(e).__name__}: {str(e).splitlines()[0][:200]}")
            if cuda:
                torch.cuda.empty_cache()
        rows.append(row)
        print(json.dumps(row), flush=True)
        if cuda:
            torch.cuda.empty_cache()

    print(f"\n{args.size}, {args.seconds:.0f} s text2music, 8 steps, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if cuda else ""))
    print(f"{'vram_limit':>10} {'max_alloc':>10} {'max_resv':>9} {'weights':>8} {'moved':>8} {'wall':>7}")
    for r in rows:
        lim = "none" if r["vram_limit_gb"] is None else f"{r['vram_limit_gb']:g} GB"
        if "error" in r:
            print(f"{lim:>10}  {r['error']}")
            continue
        f = lambda k, u="GB": f"{r[k]:.2f} {u}" if r.get(k) is not None else "-"  # noqa: E731
        print(f"{lim:>10} {f('max_allocated_gb'):>10} {f('max_reserved_gb'):>9} {f('weights_peak_gb'):>8} "
              f"{f('moved_gb'):>8} {r['wall_s']:6.2f}s")
    if args.json:
        args.json.write_text(json.dumps({"device": str(device), "size": args.size, "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
