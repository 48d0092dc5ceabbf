"""DiffSynth's ``AceStepPipeline`` built on our tiny weights, and the latents/audio comparison the sampler parity
tests share (``test_sampling_parity.py``, ``test_sampling_reference.py``)."""

from __future__ import annotations

import torch
from torch import nn

import peers
from acestep_train.inference import GenerationRequest
from numerics import rel_err

TOL = 1e-4
META = dict(bpm=120, keyscale="C major", timesignature="4", vocal_language="en")
PROMPT = dict(prompt="lofi piano with warm pads", lyrics="[verse]\nla la la\nna na")


def ds_pipeline(bundle):
    """DiffSynth's ``AceStepPipeline`` wired by hand the way ``from_pretrained`` wires it, with our tiny weights."""
    from diffsynth.models.ace_step_text_encoder import AceStepTextEncoder
    from diffsynth.models.ace_step_vae import AceStepVAE
    from diffsynth.pipelines.ace_step import AceStepPipeline
    from transformers import Qwen3Model

    cfg, sd = bundle.config, bundle.model.state_dict()
    pipe = AceStepPipeline(device="cpu", torch_dtype=torch.float32)
    pipe.dit = peers.ds_dit(cfg, sd)
    pipe.conditioner = peers.ds_conditioner(cfg, sd)
    pipe.tokenizer_model = peers.ds_tokenizer(cfg, sd)
    vc = bundle.vae.model.config
    vae = AceStepVAE(encoder_hidden_size=vc.encoder_hidden_size, downsampling_ratios=list(vc.downsampling_ratios),
                     channel_multiples=list(vc.channel_multiples), decoder_channels=vc.decoder_channels,
                     decoder_input_channels=vc.decoder_input_channels, audio_channels=vc.audio_channels,
                     sampling_rate=vc.sampling_rate)
    peers.load_strict(vae, bundle.vae.model.state_dict(), "diffsynth VAE")
    vae.remove_weight_norm()  # as AceStepPipeline.from_pretrained does
    pipe.vae = vae.eval()
    # AceStepTextEncoder.__init__ hard-codes the 0.6B Qwen3 config; give it the tiny Qwen3 instead.
    te = AceStepTextEncoder.__new__(AceStepTextEncoder)
    nn.Module.__init__(te)
    te.model = Qwen3Model(bundle.text_encoder.model.config)
    peers.load_strict(te.model, bundle.text_encoder.model.state_dict(), "diffsynth text encoder")
    pipe.text_encoder = te.eval()
    pipe.tokenizer = bundle.text_encoder.tokenizer
    pipe.silence_latent = bundle.silence_latent.clone()
    pipe.vram_management_enabled = pipe.check_vram_management_state()
    # Capture the latents handed to the VAE decoder.
    pipe.captured = {}
    decode = pipe.vae.decode

    def capture(z, **kw):
        pipe.captured["latents"] = z.transpose(1, 2).clone()
        return decode(z, **kw)

    pipe.vae.decode = capture
    return pipe


def compare(setup, ds_kwargs: dict, ours_kwargs: dict, label: str, seed: int = 7):
    bundle, sampler, pipe = setup
    cfg = ds_kwargs.get("cfg_scale", 1.0)
    with peers.torch_attention():
        ref_audio = pipe(**PROMPT, **META, seed=seed, num_inference_steps=8, shift=3.0,
                         progress_bar_cmd=lambda x: x, **ds_kwargs)
    ref_lat = pipe.captured["latents"][0]
    # guidance="cfg" because the tiny model is a turbo variant (official default: no guidance at all).
    req = GenerationRequest(**PROMPT, **META, seed=seed, cfg_scale=cfg, guidance="cfg" if cfg != 1.0 else None,
                            **ours_kwargs)
    out = sampler(req, progress=False)
    assert out.latents.shape[1:] == ref_lat.shape and out.audio.shape[1:] == ref_audio.shape, label
    e_lat, e_audio = rel_err(out.latents[0], ref_lat), rel_err(out.audio[0], ref_audio)
    print(f"\n[{label}] rel err vs diffsynth AceStepPipeline: latents {e_lat:.2e}  audio {e_audio:.2e}")
    assert e_lat <= TOL and e_audio <= TOL, label
    return out


def tiny_with_peer():
    """(bundle, our sampler, DiffSynth's pipeline) on the same tiny random weights."""
    from acestep_train import load_model
    from acestep_train.inference import Sampler

    torch.manual_seed(0)
    bundle = load_model("tiny")
    return bundle, Sampler(bundle), ds_pipeline(bundle)
