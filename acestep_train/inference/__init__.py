"""Sampling: one pure-PyTorch sampler for the ``generate`` command and the training validation callback.

``Sampler(bundle)(requests) -> GenerationResult``; ``build_conditions(bundle, requests)`` is the conditioning path
training reuses. See ``request.py`` for parameters and the official/DiffSynth differences.
"""

from acestep_train.inference.conditions import build_conditions, encode_conditions
from acestep_train.inference.guidance import Guidance, MomentumBuffer, apg
from acestep_train.inference.request import GenerationRequest, Plan, RequestError, plan_request
from acestep_train.inference.sampler import GenerationResult, Sampler
from acestep_train.inference.schedules import SHIFT_TIMESTEPS, VALID_TIMESTEPS, Schedule, resolve_schedule

__all__ = ["Sampler", "GenerationRequest", "GenerationResult", "RequestError", "build_conditions",
           "encode_conditions", "Plan", "plan_request", "Guidance", "MomentumBuffer", "apg", "Schedule",
           "resolve_schedule", "SHIFT_TIMESTEPS", "VALID_TIMESTEPS"]
