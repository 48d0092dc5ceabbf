"""Fault tier, kill -9: a training run SIGKILLed at six seeded random points — during startup, after random
steps, and inside checkpoint writes — and resumed from ``last.ckpt`` each time (or started over when there is
none) ends with the trained weights, the optimizer state and the exports of an uninterrupted run, bit for bit.

Configs: the embedded default (``python -m acestep_train``: demo data, 40 steps) and ``data=audio`` with
``data.fields`` (a CSV whose audio and caption columns are named ``file`` and ``caption``), both with a checkpoint
after every step (``callbacks.model_checkpoint.every_n_train_steps=1``) so that most kills have something to resume
from; and, as the control that works today, ``data=audio`` with standard column names.
"""

from __future__ import annotations

import os

import pytest
import torch

from kill_chain import (assert_same_tree, ckpt_step, describe_difference, export_files, kill_plan, last_ckpt, run_chain,
                        run_segment)

pytestmark = pytest.mark.slow

EVERY_STEP = "callbacks.model_checkpoint.every_n_train_steps=1"
SEED = int(os.environ.get("ACESTEP_KILL_SEED", "8"))


@pytest.fixture(scope="module")
def songs(tmp_path_factory):
    from datamodules.demo import make_demo_dataset
    from user_env import renamed_columns_csv

    metadata = make_demo_dataset(tmp_path_factory.mktemp("kill-data") / "songs", n=4, seconds=3.0, seed=0)
    renamed = renamed_columns_csv(metadata)
    return {"plain": metadata, "renamed": renamed}


def config(name: str, songs) -> list[str]:
    if name == "default":
        return [EVERY_STEP]
    if name == "fields":
        return ["data=audio", f"data.metadata={songs['renamed']}", "data.fields={audio: file, prompt: caption}",
                "data.max_duration=3.0", EVERY_STEP]
    raise ValueError(name)


CONFIGS = ["default", "fields"]


@pytest.mark.parametrize("name", CONFIGS)
def test_kill_nine_and_resume_is_bit_identical(name, songs, tmp_path):
    overrides = config(name, songs)
    reference = run_segment(overrides, tmp_path / "reference", tmp_path, None, timeout=900)
    assert reference.returncode == 0, reference.log[-4000:]
    total = ckpt_step(last_ckpt(tmp_path / "reference"))
    assert total and total >= 10, f"the reference run trained {total} steps; the plan needs room"

    chain = run_chain(overrides, tmp_path / "killed", tmp_path, kill_plan(SEED, total))
    final = chain.segments[-1]
    assert final.returncode == 0, f"{chain.describe()}\n{final.log[-4000:]}"
    kills = [s for s in chain.segments if s.killed]
    assert len(kills) >= 5, f"only {len(kills)} kills happened:\n{chain.describe()}"
    assert any(s.event[0] == "write" and s.killed for s in chain.segments), "no kill inside a checkpoint write"
    assert any(s.resumed_from is not None for s in chain.segments), "nothing was ever resumed"

    a = torch.load(last_ckpt(tmp_path / "reference"), map_location="cpu", weights_only=True)
    b = torch.load(last_ckpt(tmp_path / "killed"), map_location="cpu", weights_only=True)
    assert b["global_step"] == a["global_step"], chain.describe()
    assert_same_tree(a["state_dict"], b["state_dict"], "state_dict")
    assert_same_tree(a["optimizer_states"], b["optimizer_states"], "optimizer_states")
    assert_same_tree(a.get("lr_schedulers"), b.get("lr_schedulers"), "lr_schedulers")
    exports_a, exports_b = export_files(tmp_path / "reference"), export_files(tmp_path / "killed")
    assert exports_a and exports_a.keys() == exports_b.keys()
    differ = [k for k in exports_a if not _same(exports_a[k], exports_b[k])]
    details = "\n".join(describe_difference(tmp_path / "reference" / "exports" / k, tmp_path / "killed" / "exports" / k)
                        for k in differ)
    assert not differ, f"exports differ: {differ}\n{details}\n{chain.describe()}"


def _same(a, b) -> bool:
    try:
        assert_same_tree(a, b)
    except AssertionError:
        return False
    return True


def test_kill_plan_is_seeded_and_covers_every_kind():
    plan = kill_plan(SEED, 40)
    assert plan == kill_plan(SEED, 40)
    assert len(plan) >= 5 and {e[0] for e in plan} == {"time", "step", "write"}
    steps = [e[1] for e in plan if e[0] == "step"]
    assert steps == sorted(steps) and all(0 < s < 40 for s in steps)
