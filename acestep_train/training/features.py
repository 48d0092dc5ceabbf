"""Feature extraction for the training cache: VAE latents, caption hidden states, lyric embeddings.

The model side of ``datamodules.cache.Encoder``. Text goes through ``conditioning.text.encode_text_conditions``,
the function the sampler uses, so training conditions are built exactly like inference conditions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import torch

from acestep_train.conditioning import prompts
from acestep_train.conditioning.text import encode_text_conditions
from acestep_train.checkpoints.loading import ModelBundle

log = logging.getLogger(__name__)


class BundleEncoder:
    """Encodes audio and text of cache records with a bundle's VAE and text encoder.

    Args:
        bundle: the loaded model (only ``vae``, ``text_encoder`` and identity fields are used).
        device: where encoding runs; the encoders are moved there for the pass and back afterwards
            (``release()``), so training later holds only the DiT on the accelerator.
        sample: draw the VAE posterior sample (official preprocessing) or take its mean.
        seed: base of the per-item posterior-sampling RNG.
    """

    def __init__(self, bundle: ModelBundle, device: str | torch.device = "cpu", sample: bool = True, seed: int = 0):
        self.bundle = bundle
        self.device = torch.device(device)
        self.sample = sample
        self.seed = int(seed)
        self._home: dict[str, torch.device] = {}

    @property
    def latent_dim(self) -> int:
        return self.bundle.vae.latent_dim

    def compute_device(self) -> torch.device:
        """Inside a distributed run each rank encodes on its own GPU (Lightning has set the current device)."""
        if self.device.type == "cuda" and self.device.index is None:
            return torch.device("cuda", torch.cuda.current_device())
        return self.device

    @property
    def model_hash(self) -> str:
        """Identifies everything that changes the cached tensors (weights' identity, dtypes, templates)."""
        b = self.bundle
        ident = {
            "name": b.name, "source": b.source, "sample": self.sample, "seed": self.seed,
            "files": {k: _file_identity(Path(v)) for k, v in sorted(b.files.items())},
            "vae_dtype": str(next(b.vae.parameters()).dtype),
            "te_dtype": str(next(b.text_encoder.parameters()).dtype),
            "templates": [prompts.SFT_GEN_PROMPT, prompts.LYRIC_GEN_PROMPT],
        }
        if b.source is None:  # random weights: identified by their values
            h = hashlib.sha256()
            for mod in (b.vae, b.text_encoder):
                for k, v in mod.state_dict().items():
                    h.update(k.encode())
                    h.update(v.detach().float().cpu().numpy().tobytes())
            ident["weights"] = h.hexdigest()
        return hashlib.sha256(json.dumps(ident, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def _onload(self) -> None:
        for name in ("vae", "text_encoder"):
            mod = getattr(self.bundle, name)
            self._home.setdefault(name, next(mod.parameters()).device)
            mod.to(self.compute_device())

    def release(self) -> None:
        """Move the encoders back where they came from (CPU for training runs)."""
        for name, dev in self._home.items():
            getattr(self.bundle, name).to(dev)
        self._home.clear()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    @torch.no_grad()
    def encode(self, audio: torch.Tensor, records: list) -> list[dict[str, torch.Tensor]]:
        self._onload()
        vae, te = self.bundle.vae, self.bundle.text_encoder
        vae_dtype = next(vae.parameters()).dtype
        out = []
        for i, rec in enumerate(records):
            n = int(round(rec.duration * vae.sample_rate))
            device = self.compute_device()
            clip = audio[i: i + 1, :, :n].to(device, vae_dtype)
            g = torch.Generator(device=device)
            g.manual_seed(_item_seed(self.seed, rec))
            lat = vae.encode(clip, sample=self.sample, generator=g)[0]
            out.append({"latents": lat.float().cpu()})
        conds = encode_text_conditions(
            te, [r.prompt for r in records], [r.lyrics for r in records],
            bpm=[r.bpm for r in records], keyscale=[r.keyscale for r in records],
            timesignature=[r.timesignature for r in records], duration=[r.duration for r in records],
            vocal_language=[r.vocal_language for r in records],
            labels=[f"{r.where} ({r.audio})" for r in records])
        for i, item in enumerate(out):
            item["text_hidden"] = conds.text_hidden[i][conds.text_mask[i]].float().cpu()
            item["lyric_embeds"] = conds.lyric_embeds[i][conds.lyric_mask[i]].float().cpu()
        return out


def _item_seed(seed: int, rec) -> int:
    key = f"{seed}|{rec.id}|{rec.repeat}".encode()
    return int.from_bytes(hashlib.sha256(key).digest()[:8], "little") & (2**63 - 1)


def _file_identity(path: Path) -> list:
    """(name, size, mtime) of the weight files under a folder: cheap, and changes when the weights do."""
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    return [(str(p.relative_to(path.parent)), p.stat().st_size, int(p.stat().st_mtime)) for p in files
            if p.exists()]
