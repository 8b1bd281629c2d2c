"""A resume compares the checkpoint's config with the new one (lowrank_jax.train.resume)."""

from __future__ import annotations

import json

import pytest

from lowrank_jax.config import ConfigError, load_config, to_dict
from lowrank_jax.train.resume import changed_fields, check_resume_config


def _saved(*overrides: str) -> dict:
    """The config as the checkpoint's JSON metadata holds it."""
    return json.loads(json.dumps(to_dict(load_config("tiny", ["steps=20", *overrides]))))


def test_same_config_and_allowed_changes_pass_silently(tmp_path):
    saved = _saved()
    said: list[str] = []
    allowed = [f"out_dir={tmp_path}/x", "log_every=3", "checkpoint_every=7", "logging.tensorboard=false", "resume=true"]
    check_resume_config(saved, load_config("tiny", ["steps=20", *allowed]), 10, said.append)
    assert said == []
    check_resume_config(None, load_config("tiny", ["optim.lr=0.5"]), 10, said.append)  # nothing stored
    assert said == []


def test_changed_steps_is_announced_with_both_horizons():
    said: list[str] = []
    check_resume_config(_saved(), load_config("tiny", ["steps=30"]), 20, said.append)
    assert said == [
        "resume: steps 20 -> 30: the schedule's horizon moves from 20 to 30 steps (warmup 2 -> 3); from step 20 "
        "the learning rate follows the new curve"
    ]


def test_other_changes_are_refused_naming_each_field():
    cfg = load_config("tiny", ["steps=20", "optim.lr=0.5", "seed=7", "mesh=-1,1,1"])
    assert changed_fields(_saved(), cfg) == ["mesh", "optim.lr", "seed"]
    with pytest.raises(ConfigError) as e:
        check_resume_config(_saved(), cfg, 10, print)
    msg = str(e.value)
    assert msg.startswith("resume: the config differs from the checkpoint's in mesh [1, 1, 1] -> [-1, 1, 1], ")
    assert "optim.lr " in msg and "seed 0 -> 7" in msg and "\n" not in msg
