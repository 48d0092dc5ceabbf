"""How the tests compare tensors to a reference."""

import torch


def rel_err(ours: torch.Tensor, ref: torch.Tensor) -> float:
    """Max abs error / max abs reference, computed in float64 (the issues' "relative" tolerance)."""
    return ((ours.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
