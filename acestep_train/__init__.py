"""acestep-train: fine-tune and run ACE-Step 1.5 music generation models."""

__version__ = "0.1.0"
