"""Shared fixtures of the inference tests: the tiny model (random weights, no download) and its sampler, built once
per test module (a module that needs a modified bundle defines its own ``bundle`` fixture)."""

import pytest

from acestep_train import load_model
from acestep_train.inference import Sampler


@pytest.fixture(scope="module")
def bundle():
    return load_model("tiny")


@pytest.fixture(scope="module")
def sampler(bundle):
    return Sampler(bundle)
