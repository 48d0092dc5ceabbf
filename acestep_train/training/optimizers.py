"""Optimizers that the ``conf/mode/optimizer/`` presets name and torch does not ship.

``adamw8bit`` is bitsandbytes' AdamW with 8-bit block-wise quantised moments (bitsandbytes >= 0.50 runs it on the CPU
too). bitsandbytes is an optional dependency (``pip install '.[lean]'``): :func:`check_available` runs among the
startup checks, so a missing package stops the run with one line before any model is loaded.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import torch


class OptimizerUnavailable(RuntimeError):
    """The selected optimizer preset needs a package that is not installed."""


ADAMW8BIT_HINT = ("mode/optimizer=adamw8bit needs bitsandbytes: pip install 'acestep-train[lean]' "
                  "(or choose mode/optimizer=adafactor, which torch ships)")


def _bitsandbytes():
    try:
        import bitsandbytes
    except ImportError:
        raise OptimizerUnavailable(ADAMW8BIT_HINT) from None
    return bitsandbytes


def adamw8bit(params: Iterable[torch.nn.Parameter], **kwargs: Any) -> torch.optim.Optimizer:
    return _bitsandbytes().optim.AdamW8bit(params, **kwargs)


def check_available(optimizer_cfg: Mapping | None) -> None:
    """Raise :class:`OptimizerUnavailable` now if the preset's package is missing (not at the first step)."""
    target = (optimizer_cfg or {}).get("_target_")
    if target == f"{__name__}.{adamw8bit.__name__}":
        _bitsandbytes()
