"""Plain ``nn.Module`` implementations of the ACE-Step 1.5 parts (no Lightning)."""

from acestep_train.models.acestep import AceStepModel
from acestep_train.models.config import AceStepConfig

__all__ = ["AceStepModel", "AceStepConfig"]
