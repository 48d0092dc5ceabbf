"""The CLI tier's rules themselves (no subprocess): parsing, exclusion, console-script mapping, substitution."""

import sys
from pathlib import Path

import pytest

import readme_commands as rc

README = """
Intro.

```bash
python3 -m venv .venv && .venv/bin/pip install -e . && .venv/bin/python -m acestep_train
```

```python
print("not a shell block")
```

```bash
# a comment
acestep-train model=xl-sft data=audio data.metadata=/data/songs/metadata.csv \\
    trainer=gpu
python -m acestep_train <same overrides> ckpt_path=outputs/.../checkpoints/last.ckpt
acestep-export outputs/.../checkpoints/last.ckpt --formats peft
python -m acestep_train.inference.generate model=tiny out=t.wav adapters='[{path: exports/lora.safetensors, strength: 0.8}]'
python -m acestep_train.launch.submit model=xl-sft data=audio data.metadata=... trainer.devices=8
bash .ci/slurm-setup.sh && ACESTEP_REQUIRE_SLURM=1 .venv/bin/python -m pytest -q
```
"""


@pytest.fixture
def parsed(tmp_path):
    path = tmp_path / "README.md"
    path.write_text(README)
    return rc.readme_commands(path)


def test_lines_blocks_and_exclusions(parsed):
    commands, excluded = parsed
    assert [c.kind for c in commands] == ["train", "train", "train", "export", "generate", "submit"]
    assert [line for line, _ in excluded] == ["python3 -m venv .venv", ".venv/bin/pip install -e .",
                                              "bash .ci/slurm-setup.sh",
                                              "ACESTEP_REQUIRE_SLURM=1 .venv/bin/python -m pytest -q"]
    assert rc.is_embedded_default(commands[0]) and not rc.is_embedded_default(commands[1])
    assert commands[1].args[-1] == "trainer=gpu", "a \\-continued line is one command"


def test_unknown_program_fails_loudly(tmp_path):
    path = tmp_path / "README.md"
    path.write_text("```bash\nacestep-frobnicate x=1\n```\n")
    with pytest.raises(ValueError, match="no rule"):
        rc.readme_commands(path)


def test_substitutions(parsed, monkeypatch):
    monkeypatch.setattr(rc, "has_cuda", lambda: False)
    commands, _ = parsed
    flavour = rc.Flavour("fields", Path("/t/m.csv"), [rc.FIELDS_OVERRIDE], ["data=audio", "x=1"])
    train = rc.substitute(commands[1], flavour)
    assert train[:4] == ["model=tiny", "data=audio", "data.metadata=/t/m.csv", rc.FIELDS_OVERRIDE]
    assert "trainer=gpu" in train and train[-4:] == [*rc.CPU_TRAINER, "trainer.max_steps=2"]
    resume = rc.substitute(commands[2], flavour, ckpt=Path("/r/last.ckpt"))
    assert resume == ["data=audio", "x=1", "ckpt_path=/r/last.ckpt"]
    assert rc.substitute(commands[3], flavour, ckpt=Path("/r/last.ckpt")) == ["/r/last.ckpt", "--formats", "peft"]
    gen = rc.substitute(commands[4], flavour, adapter=Path("/e/peft"))
    assert gen[-1] == "adapters=[{path: /e/peft, strength: 0.8}]"
    submit = rc.substitute(commands[5], flavour)
    assert "model=xl-sft" in submit and "trainer.devices=8" in submit, "submit only composes: nothing to download"


def test_console_scripts_fall_back_to_python_m(parsed, monkeypatch):
    monkeypatch.setattr(rc.shutil, "which", lambda name: None)
    monkeypatch.setattr(rc.sys, "executable", "/nowhere/bin/python")
    commands, _ = parsed
    assert rc.argv(commands[1], ["a=1"]) == ["/nowhere/bin/python", "-m", "acestep_train", "a=1"]
    assert rc.argv(commands[3], [])[:3] == ["/nowhere/bin/python", "-m", "acestep_train.training.export"]
    assert sys.executable  # untouched outside the monkeypatch
