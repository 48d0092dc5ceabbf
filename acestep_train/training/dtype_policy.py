"""One answer to "which dtype?" for every part of the model, in training and in validation rendering.

* Trained parameters (LoRA/DoRA/LoKr adapters; the whole DiT under full fine-tuning) are float32 master weights:
  an update of 1e-4 of a weight's size is below bf16's resolution (8 mantissa bits) and would round away.
* Frozen parameters stay in the dtype the model was loaded in (bf16 for the released variants): they never change,
  so upcasting them only costs memory. (``frozen_fp8`` stores frozen linears in FP8 on top of this; inputs still
  reach those layers in the frozen dtype and the layer dequantises to it.)
* Compute precision in training is the trainer's (``trainer.precision``, autocast); inputs reach each part in the
  dtype its weights are held in.
* The sampler (validation audio) runs each component in the dtype its weights are held in, without autocast: the
  DiT as it trains (float32 masters under full fine-tuning, the loaded dtype under adapters), everything frozen
  as loaded. A validation render therefore hears the weights being trained, not a bf16 rounding of them.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn


@dataclass(frozen=True)
class DtypePolicy:
    """Args:
        released: the dtype the DiT and condition encoder were loaded in (every frozen weight keeps it).
        dit_trained: full fine-tuning (the DiT's own weights train) rather than adapters on a frozen DiT.
        trained: the dtype of every trained parameter.
    """

    released: torch.dtype
    dit_trained: bool = False
    trained: torch.dtype = torch.float32

    @classmethod
    def for_model(cls, model: nn.Module, dit_trained: bool) -> DtypePolicy:
        """The policy for a freshly loaded model (one dtype for all of its floating parameters)."""
        dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
        if len(dtypes) != 1:
            raise ValueError(f"the model to train holds parameters in {sorted(map(str, dtypes))}; expected one "
                             "dtype (the one it was loaded in) before adapters or casts are applied")
        return cls(released=dtypes.pop(), dit_trained=dit_trained)

    @property
    def frozen(self) -> torch.dtype:
        """Frozen weights (base DiT under adapters, condition encoder, null condition) and their inputs."""
        return self.released

    @property
    def dit(self) -> torch.dtype:
        """The DiT's weights, and the dtype its inputs are cast to."""
        return self.trained if self.dit_trained else self.frozen

    @property
    def condition_encoder(self) -> torch.dtype:
        """The condition encoder is never trained: its inputs reach it in the frozen dtype."""
        return self.frozen

    def hold_trained(self, module: nn.Module) -> nn.Module:
        """Cast the floating tensors of a module that will train to the trained dtype (in place, like ``.float()``;
        integer and complex tensors are left alone)."""
        return module._apply(lambda t: t.to(self.trained) if t.is_floating_point() else t)

    def check_trained(self, params: Iterable[nn.Parameter]) -> None:
        """Fail loudly if a trainable parameter is not held in the trained dtype."""
        wrong = sorted({str(p.dtype) for p in params if p.dtype != self.trained})
        if wrong:
            raise TypeError(f"trainable parameters held in {wrong}; the dtype policy trains in {self.trained}")

    def sampler_dtypes(self) -> dict[str, torch.dtype]:
        """What the sampler runs each model part in during validation rendering."""
        return {"dit": self.dit, "condition_encoder": self.condition_encoder}

    def describe(self) -> str:
        return (f"trained parameters {_name(self.trained)}, frozen {_name(self.frozen)}; "
                f"DiT runs in {_name(self.dit)}, condition encoder in {_name(self.condition_encoder)}")


def _name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")
