"""acestep-train: fine-tune and run ACE-Step 1.5 music generation models."""

__version__ = "0.1.0"

from acestep_train.checkpoints.variants import load_model, model_config, variant_names  # noqa: E402

__all__ = ["load_model", "model_config", "variant_names", "__version__"]
