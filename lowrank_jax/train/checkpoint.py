"""Orbax checkpoints of the whole train state plus run metadata (data position, corpus digest).

The state pytree is saved as a flat ``{path: array}`` dict (stable string keys whatever the
optimizer's state structure) and restored into the abstract state with its shardings. Saves are
asynchronous; ``keep_checkpoints`` newest are kept. If the newest checkpoint cannot be read, the
next older one is tried and a message says so. In a multi-process run every process takes part in
each save and restore (orbax coordinates them); ``directory`` must be one that all processes see.
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from jax.experimental import multihost_utils

from lowrank_jax import storage

COMMIT_SUCCESS = "commit_success.txt"  # orbax's mark of a finished step on object storage


class CheckpointError(RuntimeError):
    """No readable checkpoint where one was required."""


def _flatten(tree: Any) -> tuple[dict[str, Any], Any]:
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    flat = {jax.tree_util.keystr(path, simple=True, separator="/"): leaf for path, leaf in leaves}
    if len(flat) != len(leaves):  # pragma: no cover - keys are unique for dict/NamedTuple trees
        raise ValueError("checkpoint: state paths are not unique")
    return flat, treedef


def _on_every_process(ok: bool) -> bool:
    """Whether ``ok`` holds in every process of the run (one tiny collective when there are several)."""
    if jax.process_count() == 1:
        return ok
    return bool(np.all(multihost_utils.process_allgather(np.asarray(ok, np.int32))))


def checkpoint_steps(directory: str | Path) -> list[int]:
    """Steps of finalised checkpoints under ``directory``, local or remote (empty if none or unreadable)."""
    d = storage.as_path(directory)
    if not d.is_dir():
        return []
    steps = [p for p in d.iterdir() if p.name.isdigit() and p.is_dir()]
    if storage.is_remote(directory):  # orbax writes a bucket's step in place and marks it complete last
        steps = [p for p in steps if (p / COMMIT_SUCCESS).exists()]
    return sorted(int(p.name) for p in steps)


class Checkpointer:
    """Save/restore ``TrainState`` + JSON metadata under ``directory``."""

    def __init__(self, directory: str | Path, keep: int, async_save: bool = True):
        d = storage.as_path(directory)
        self.directory = d if storage.is_remote(directory) else d.resolve()  # orbax writes gs:// itself
        options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=async_save)
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        flat, _ = _flatten(state)
        self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(flat), meta=ocp.args.JsonSave(meta)),
            force=True,
        )

    def restore_latest(self, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore the newest readable checkpoint; fall back to older ones with a message.

        ``abstract_state`` is the target pytree of ShapeDtypeStructs, or a function ``step -> pytree``
        where the state's layout depends on the step (a ReLoRA warm start switches layouts).
        """
        layout = abstract_state if callable(abstract_state) else (lambda _: abstract_state)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"resume: no checkpoint in {str(self.directory)!r}")
        errors = []
        primary = jax.process_index() == 0
        for step in steps:
            failure = None
            try:
                state, meta = self.restore(step, layout(step))
            except Exception as e:  # any read failure means "damaged"
                failure = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
            if not _on_every_process(failure is None):  # one process's unreadable shards fail them all
                if primary:
                    why = failure or "in another process"
                    print(
                        f"checkpoint {step} in {self.directory} is unreadable ({why}); trying an older one",
                        file=sys.stderr,
                    )
                errors.append(step)
                continue
            if errors:
                # set damaged newer checkpoints aside so the run can save those steps again: one process
                # moves them (every process sees the same directory), the others wait for it
                for bad in errors if primary else ():
                    target = self.directory / f"damaged_{bad}"
                    if storage.is_remote(str(self.directory)):
                        if target.exists():
                            target.rmtree()
                        (self.directory / str(bad)).rename(target)
                    else:
                        shutil.rmtree(target, ignore_errors=True)
                        os.replace(self.directory / str(bad), target)
                    print(f"moved unreadable checkpoint {bad} to {target}", file=sys.stderr)
                if jax.process_count() > 1:
                    multihost_utils.sync_global_devices("lowrank_jax: damaged checkpoints moved")
                self.manager.reload()
            return state, meta
        raise CheckpointError(f"resume: every checkpoint in {str(self.directory)!r} is unreadable (steps {errors})")

    def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict[str, Any]]:
        """Restore checkpoint ``step`` into the layout of ``abstract_state`` (no fallback)."""
        flat_abstract, treedef = _flatten(abstract_state)
        out = self.manager.restore(
            step, args=ocp.args.Composite(state=ocp.args.StandardRestore(flat_abstract), meta=ocp.args.JsonRestore())
        )
        state = jax.tree_util.tree_unflatten(treedef, [out["state"][k] for k in flat_abstract])
        return state, dict(out["meta"])

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
