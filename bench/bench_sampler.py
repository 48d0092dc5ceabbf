"""Wall time of our Sampler against DiffSynth's ``AceStepPipeline`` on identical weights and settings.

    OMP_NUM_THREADS=1 .venv/bin/python bench/bench_sampler.py                 # CPU, 1 thread
    .venv/bin/python bench/bench_sampler.py --device cuda --dtype bfloat16    # on a GPU

A mid-size random model (DiT hidden 512, 8 layers, 8 heads of 64, window 128; the tiny text encoder and VAE) so the
DiT dominates; text2music, 30 s, 8 steps, shift 3, once without guidance and once with plain CFG 2.0 (the only
guidance DiffSynth has). Both run the whole call (text encoding, condition encoder, denoising, VAE decode,
normalisation). Prints the median of ``--repeats`` interleaved timed runs after one warm-up each, and
ours / theirs (goal <= 1).
A benchmark, not a test: nothing is asserted except that the two outputs agree.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # peers.py and the DiffSynth pipeline builder of the parity test

MID = ["arch.hidden_size=512", "arch.intermediate_size=1536", "arch.num_hidden_layers=8",
       "arch.num_attention_heads=8", "arch.num_key_value_heads=4", "arch.head_dim=64", "arch.sliding_window=128"]


def timed_pair(first, second, repeats: int, sync) -> tuple[float, float, object, object]:
    """Median wall times of two callables, runs interleaved (first, second, first, ...) after one warm-up each,
    so that load from other processes hits both alike."""
    a, b = first(), second()
    sync()
    times = ([], [])
    for _ in range(repeats):
        for k, fn in enumerate((first, second)):
            t0 = time.perf_counter()
            out = fn()
            sync()
            times[k].append(time.perf_counter() - t0)
            a, b = (out, b) if k == 0 else (a, out)
    return statistics.median(times[0]), statistics.median(times[1]), a, b


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seconds", type=float, default=30.0)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's own)")
    args = ap.parse_args()
    warnings.filterwarnings("ignore")
    if args.threads:
        torch.set_num_threads(args.threads)

    import peers
    from test_sampling_parity import ds_pipeline

    from acestep_train import load_model
    from acestep_train.inference import GenerationRequest, Sampler

    dtype = getattr(torch, args.dtype)
    bundle = load_model("tiny", overrides=MID + [f"dtype={args.dtype}"])
    pipe = ds_pipeline(bundle)  # built from the fp32 CPU weights, then moved like ours
    bundle.model.to(args.device)
    bundle.vae.to(args.device)
    bundle.text_encoder.to(args.device)
    bundle.silence_latent = bundle.silence_latent.to(args.device)
    pipe.device, pipe.torch_dtype = args.device, dtype
    for name in ("dit", "conditioner", "tokenizer_model", "text_encoder"):
        getattr(pipe, name).to(device=args.device, dtype=dtype)
    pipe.vae.to(args.device)  # DiffSynth keeps the VAE in the pipeline dtype too; fp32 here for both
    pipe.silence_latent = pipe.silence_latent.to(device=args.device, dtype=dtype)
    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)
    sampler = Sampler(bundle)
    n_dit = sum(p.numel() for p in bundle.model.decoder.parameters())
    print(f"device {args.device} dtype {args.dtype} threads {torch.get_num_threads()}  DiT {n_dit / 1e6:.1f} M params, "
          f"{args.seconds:g} s = {round(args.seconds * 25)} frames, {args.steps} steps, shift 3")
    meta = dict(bpm=120, keyscale="C major", timesignature="4", vocal_language="en")
    text = dict(prompt="cinematic orchestral build with taiko drums", lyrics="[verse]\n" + "la " * 40)
    for cfg in (1.0, 2.0):
        req = GenerationRequest(**text, **meta, duration=args.seconds, seed=1, cfg_scale=cfg, semantics="diffsynth",
                                num_inference_steps=args.steps, shift=3.0)

        def ours():
            return sampler(req, progress=False).audio[0]

        def theirs():
            with peers.torch_attention():
                return pipe(**text, **meta, duration=args.seconds, seed=1, cfg_scale=cfg,
                            num_inference_steps=args.steps, shift=3.0, progress_bar_cmd=lambda x: x)

        t_ours, t_ds, a_ours, a_ds = timed_pair(ours, theirs, args.repeats, sync)
        err = ((a_ours.float().cpu() - a_ds.float().cpu()).abs().max() / a_ds.float().abs().max()).item()
        label = "no guidance" if cfg == 1.0 else f"CFG {cfg}"
        print(f"{label:12s} ours {t_ours:7.3f} s   diffsynth {t_ds:7.3f} s   ours/theirs {t_ours / t_ds:5.2f}   "
              f"(audio rel diff {err:.1e})")


if __name__ == "__main__":
    main()
