"""Canaries: the first training losses of one run per recipe, the evidence that its records still hold.

A recipe's runs on record stay valid while the library still computes what it computed for them. The
harness (``experiments/sweep.py``) checks that by evidence instead of by which files changed: each recipe
keeps a canary, the first ``canary_steps`` training losses of one of its recorded runs (the seed-0 run at
the chosen learning rate of the recipe's first stage), with the commit and the machine they came from.
``sweep.py --check`` trains those steps again with the library as it is and compares:

* on the machine the canary was recorded on (the same :func:`fingerprint`) the losses must be equal bit
  for bit: the computation is deterministic there;
* on another machine XLA:CPU emits other code (vector widths, FMA contraction, the thread count), so float32
  rounding differs within the first steps and grows through training; the losses must agree within
  :data:`TOLERANCE` nats at every step.

:class:`Runner` trains those steps in-process through the training loop's own pieces (the same
:class:`lowrank_jax.train.step.Phases` and ``train_batches``) without evaluation, checkpoints or files,
and opens the token shards once for every canary of a process.
"""

from __future__ import annotations

import hashlib
import math
import os
import platform
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import jax
import jaxlib
from _report import cpu_info

from lowrank_jax import config as config_lib
from lowrank_jax.data import load_shards
from lowrank_jax.train.loop import train_batches
from lowrank_jax.train.step import Phases

# Nats of training loss, at every one of the canary's steps, between two machines. On one machine a canary
# repeats bit for bit. Measured on the tiny preset over 50 steps: XLA:CPU code for AVX2 instead of AVX-512 moves
# AdamW's and ReLoRA's losses by at most 1e-6 but 8-bit GaLore's by 1.8e-3 (a rounding difference flips a
# quantisation bucket), and 8-bit GaLore's run made on another CPU differs from this one's by 8.4e-4; a 1%
# change of the learning rate (of the blocks or the embeddings) or eps 1e-6 -> 1e-7 moves them by 0.04-0.06.
# The tolerance sits between: 5x the largest drift between machines, 4x below a 1% change of one setting.
TOLERANCE = 1e-2


def fingerprint() -> dict[str, Any]:
    """What the compiled code of a canary depends on besides the library: the CPU model, a short hash of its
    feature flags, the platform, the CPU count (XLA:CPU's thread pool) and the jax / jaxlib versions."""
    model, flags = cpu_info()
    return {
        "cpu": model,
        "cpu_flags": hashlib.sha256(flags.encode()).hexdigest()[:12],
        "cpu_count": os.cpu_count(),
        "platform": f"{platform.system()}-{platform.machine()}",
        "jax": jax.__version__,
        "jaxlib": jaxlib.__version__,
    }


def describe(machine: dict[str, Any]) -> str:
    cpu = f"{machine.get('cpu')} (flags {machine.get('cpu_flags')}, {machine.get('cpu_count')} CPUs)"
    return f"{cpu}, jax {machine.get('jax')}"


@dataclass(frozen=True)
class Verdict:
    """How a canary's losses compare with the recorded ones."""

    same_machine: bool
    max_abs_diff: float
    first_differing_step: int | None  # 1-based; None when every loss is bitwise equal
    passed: bool

    @property
    def kind(self) -> str:
        if self.first_differing_step is None:
            return "bitwise"
        return "within tolerance" if self.passed else "differs"

    def to_dict(self) -> dict[str, Any]:
        return {
            "same_machine": self.same_machine,
            "max_abs_diff": self.max_abs_diff,
            "first_differing_step": self.first_differing_step,
            "verdict": self.kind,
            "tolerance": 0.0 if self.same_machine else TOLERANCE,
        }


def compare(recorded: list[float], losses: list[float], same_machine: bool) -> Verdict:
    """``losses`` against ``recorded``: bitwise on the same machine, within :data:`TOLERANCE` on another.

    A different number of losses, or a non-finite loss where the record has a finite one, never passes.
    """
    first = next((i + 1 for i, (a, b) in enumerate(zip(recorded, losses, strict=False)) if a != b), None)
    if first is None and len(recorded) != len(losses):
        first = min(len(recorded), len(losses)) + 1
    diffs = [abs(a - b) for a, b in zip(recorded, losses, strict=False) if a != b]
    diff = max(diffs, default=0.0)
    if len(recorded) != len(losses) or (diffs and not math.isfinite(diff)):
        return Verdict(same_machine, math.inf, first, False)
    passed = first is None or (not same_machine and diff <= TOLERANCE)
    return Verdict(same_machine, diff, first, passed)


class Runner:
    """Trains the first steps of runs in this process, opening each data config's token shards once."""

    def __init__(self, log: Callable[[str], None] = lambda message: None) -> None:
        self.log = log
        self._data: dict[str, Any] = {}

    def data(self, cfg: config_lib.Config) -> Any:
        key = repr(cfg.data)
        if key not in self._data:
            self._data[key] = load_shards(cfg.data, self.log)
        return self._data[key]

    def losses(self, cfg: config_lib.Config, steps: int) -> list[float]:
        """The training losses of ``cfg``'s first ``steps`` steps, as ``train`` would log them."""
        data = self.data(cfg)
        if cfg.model.vocab_size == 0:
            cfg = config_lib.replace(cfg, model__vocab_size=data.vocab_size)
        phases = Phases.compile(cfg, *Phases.trainers(cfg))
        batches = train_batches(cfg, phases.trainer, data)
        state = phases.init_state()
        out = []
        for step, rows in zip(range(steps), batches.iterate(0, steps), strict=False):
            state, m = phases.advance(state, step, rows, cfg.batch_size)
            out.append(float(m["loss"]))
        return out
