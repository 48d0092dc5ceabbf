"""Plain ``nn.Module`` implementations of the ACE-Step 1.5 parts (no Lightning)."""

from .acestep import AceStepModel
from .config import AceStepConfig

__all__ = ["AceStepModel", "AceStepConfig"]
