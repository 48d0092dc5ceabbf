"""Every variant's DiT checkpoint module has exactly the released keys and shapes."""

import json

import pytest
import torch
from omegaconf import OmegaConf

from acestep_train import model_config
from acestep_train import variant_names
from acestep_train.checkpoints.loading import arch_from_cfg
from acestep_train.models import AceStepModel
from manifest_helpers import ds_hash

RELEASED = [n for n in variant_names() if n != "tiny"]
MD5 = {"acestep-v15-2B.keys.json": "ba29d8bddbb6ace65675f6a757a13c00",
       "acestep-v15-XL.keys.json": "3a28a410c2246f125153ef792d8bc828"}


def test_every_released_variant_has_a_config():
    assert sorted(RELEASED) == sorted(["turbo", "turbo-shift1", "turbo-shift3", "turbo-continuous", "base", "sft",
                                       "xl-base", "xl-sft", "xl-turbo"])


@pytest.mark.parametrize("name", RELEASED)
def test_meta_model_matches_released_manifest(name, manifests):
    cfg = OmegaConf.to_container(model_config(name), resolve=True)
    manifest_file = "acestep-v15-XL.keys.json" if name.startswith("xl-") else "acestep-v15-2B.keys.json"
    ref = json.loads((manifests / manifest_file).read_text())
    assert ds_hash(ref) == MD5[manifest_file]
    with torch.device("meta"):
        model = AceStepModel(arch_from_cfg(cfg["arch"]))
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(set(ref) - set(ours))
    extra = sorted(set(ours) - set(ref))
    wrong = sorted(k for k in set(ref) & set(ours) if ref[k] != ours[k])
    assert (missing, extra, wrong) == ([], [], [])
    assert ds_hash(ours) == MD5[manifest_file]


def test_parameter_counts_match_reference(manifests):
    """docs/architecture.md §2.3 totals: 2,393,872,518 (2B) and 4,987,310,726 (XL)."""
    for name, total in (("turbo", 2_393_872_518), ("xl-turbo", 4_987_310_726)):
        cfg = OmegaConf.to_container(model_config(name), resolve=True)
        with torch.device("meta"):
            model = AceStepModel(arch_from_cfg(cfg["arch"]))
        assert sum(p.numel() for p in model.parameters()) == total
