"""Lightning strategies configured for the ACE-Step DiT (selected by ``trainer=fsdp|deepspeed_zero2|...``)."""

from __future__ import annotations

import importlib.util

from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy

from .models.dit import DiTLayer


def fsdp(sharding_strategy: str = "FULL_SHARD", activation_checkpointing: bool = True, cpu_offload: bool = False,
         state_dict_type: str = "sharded") -> FSDPStrategy:
    """FSDP with one DiT layer per wrapped unit (the natural all-gather granularity), optional per-layer
    activation checkpointing, and sharded checkpoints."""
    return FSDPStrategy(
        auto_wrap_policy={DiTLayer},
        activation_checkpointing_policy={DiTLayer} if activation_checkpointing else None,
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        state_dict_type=state_dict_type,
        use_orig_params=True,  # LoRA: frozen and trainable parameters share FSDP units
    )


def deepspeed(stage: int = 2, offload_optimizer: bool = False, offload_parameters: bool = False) -> DeepSpeedStrategy:
    """DeepSpeed ZeRO ``stage`` (2 or 3); CPU offload of optimizer state (and parameters at stage 3)."""
    if importlib.util.find_spec("deepspeed") is None:
        raise RuntimeError("trainer=deepspeed_* needs DeepSpeed: pip install 'acestep-train[deepspeed]'")
    if stage not in (2, 3):
        raise ValueError(f"DeepSpeed stage {stage}: this project configures ZeRO stage 2 or 3")
    return DeepSpeedStrategy(stage=stage, offload_optimizer=offload_optimizer,
                             offload_parameters=offload_parameters and stage == 3)
