"""What a resumed run may change: its checkpoint stores the config it was trained with.

``resume=true`` continues a run exactly only with the same model, optimizer, data order and
schedule. :func:`check_resume_config` compares the checkpoint's config with the new one and
refuses a difference in anything but:

- where the run writes and reads from (``out_dir``, ``data.cache_dir``, ``data.shards``: the data
  itself is checked by its digest), and ``resume`` / ``init_from``;
- logging, evaluation and checkpoint cadence (``logging.*``, ``progress``, ``log_every``,
  ``eval_every``, ``eval_tokens``, ``eval_batch_size``, ``checkpoint_every``, ``keep_checkpoints``);
- ``steps``, which is announced with the schedule's old and new horizon: the warmup length
  (``optim.warmup_ratio · steps``) and the cosine's length are both fractions of ``steps``, so the
  learning rate from the resumed step on follows the new curve, not the old one.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from typing import Any

from lowrank_jax.config import Config, ConfigError, to_dict

RESUMABLE_CHANGES = (
    "out_dir",
    "resume",
    "init_from",
    "steps",
    "progress",
    "log_every",
    "eval_every",
    "eval_tokens",
    "eval_batch_size",
    "checkpoint_every",
    "keep_checkpoints",
    "logging.",
    "data.cache_dir",
    "data.shards",
)


def _as_json(d: Mapping[str, Any]) -> dict[str, Any]:
    """What the checkpoint's JSON metadata makes of a config dict (tuples become lists)."""
    return json.loads(json.dumps(d))


def _flat(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(_flat(v, key + "."))
        else:
            out[key] = v
    return out


def changed_fields(saved: Mapping[str, Any], cfg: Config) -> list[str]:
    """Dotted names of the settings that differ between the checkpoint's config and ``cfg`` (sorted)."""
    old, new = _flat(_as_json(saved)), _flat(_as_json(to_dict(cfg)))
    return sorted(k for k in old.keys() | new.keys() if old.get(k, "<unset>") != new.get(k, "<unset>"))


def check_resume_config(saved: Mapping[str, Any] | None, cfg: Config, start: int, log: Callable[[str], None]) -> None:
    """Refuse a resume that changes a setting outside :data:`RESUMABLE_CHANGES`; announce a changed ``steps``."""
    if not saved:  # a checkpoint that predates the stored config: nothing to compare
        return
    changed = changed_fields(saved, cfg)
    refused = [
        k for k in changed if not any(k == r or (r.endswith(".") and k.startswith(r)) for r in RESUMABLE_CHANGES)
    ]
    if refused:
        old, new = _flat(_as_json(saved)), _flat(_as_json(to_dict(cfg)))
        shown = ", ".join(f"{k} {old.get(k, '<unset>')!r} -> {new.get(k, '<unset>')!r}" for k in refused[:6])
        more = f" and {len(refused) - 6} more" if len(refused) > 6 else ""
        raise ConfigError(
            f"resume: the config differs from the checkpoint's in {shown}{more}; only steps, logging, evaluation "
            "and checkpoint cadence, and paths may change (use another out_dir for a new run)"
        )
    if "steps" in changed:
        ratio = cfg.optim.warmup_ratio
        old_steps, new_steps = int(saved["steps"]), cfg.steps
        log(
            f"resume: steps {old_steps} -> {new_steps}: the schedule's horizon moves from {old_steps} to {new_steps} "
            f"steps (warmup {int(ratio * old_steps)} -> {int(ratio * new_steps)}); from step {start} the learning "
            "rate follows the new curve"
        )
