"""Learning-rate schedules as partials: ``scheduler(optimizer, total_steps=...)`` -> LR scheduler."""

from __future__ import annotations

import math

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR


def warmup_cosine(optimizer: Optimizer, total_steps: int, warmup_steps: int = 100, min_lr_ratio: float = 0.01,
                  warmup_fraction_cap: float = 0.1) -> LambdaLR:
    """Linear warmup from ``lr/10`` then cosine decay to ``min_lr_ratio * lr``.

    Warmup is capped at ``warmup_fraction_cap`` of the run (as the official trainer does), so a short run still
    spends most of its steps at a useful rate.
    """
    warm = max(1, min(int(warmup_steps), int(total_steps * warmup_fraction_cap))) if total_steps > 1 else 0

    def factor(step: int) -> float:
        if step < warm:
            return 0.1 + 0.9 * step / warm
        span = max(1, total_steps - warm)
        progress = min(1.0, (step - warm) / span)
        return min_lr_ratio + (1 - min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return LambdaLR(optimizer, factor)

