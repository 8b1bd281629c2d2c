"""Argument validators shared by the optimizers (and noise_step): one clear ValueError naming the argument.

Every message starts with ``"<name>: "``. Under ``optax.inject_hyperparams`` a numeric hyperparameter reaches the
factory as a 0-d array, traced inside ``jit``: :func:`check_real` / :func:`check_int` accept concrete 0-d arrays and
skip traced values (they return None); where a value must be known when tracing (it sets a shape), the caller reads
it with :func:`static_int`, whose error says to pass it in ``static_args``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp


def is_traced(x: Any) -> bool:
    """True for a JAX tracer (a value only known when the traced function runs)."""
    return isinstance(x, jax.core.Tracer)


def check_real(
    value: Any,
    name: str,
    *,
    lo: float | None = None,
    hi: float | None = None,
    lo_open: bool = False,
    hi_open: bool = False,
) -> float | None:
    """A finite real number (Python/NumPy scalar or 0-d array, not a bool) within the bounds, as a float.

    ``lo``/``hi`` are inclusive unless ``lo_open``/``hi_open``. A traced value is not checked: returns None.
    """
    if isinstance(value, bool) or not (isinstance(value, Real) or getattr(value, "shape", None) == ()):
        raise ValueError(f"{name}: must be a real number, got {value!r}")
    if is_traced(value):
        return None
    v = float(value)
    if not math.isfinite(v):
        raise ValueError(f"{name}: must be finite, got {value!r}")
    if lo is not None and (v < lo or (lo_open and v == lo)):
        raise ValueError(f"{name}: must be {'>' if lo_open else '>='} {lo}, got {value!r}")
    if hi is not None and (v > hi or (hi_open and v == hi)):
        raise ValueError(f"{name}: must be {'<' if hi_open else '<='} {hi}, got {value!r}")
    return v


def _is_integral(value: Any) -> bool:
    """A Python int (not a bool) or a 0-d array of an integer dtype (NumPy integer scalars included)."""
    if isinstance(value, bool):
        return False
    if isinstance(value, int):
        return True
    dtype = getattr(value, "dtype", None)
    return dtype is not None and jnp.issubdtype(dtype, jnp.integer) and getattr(value, "ndim", 1) == 0


def check_int(value: Any, name: str, *, lo: int, hi: int | None = None) -> int | None:
    """An integer in ``[lo, hi]`` (``hi`` inclusive, unbounded when None), as an int; None when traced."""
    if is_traced(value):
        return None
    if not _is_integral(value):
        raise ValueError(f"{name}: must be an integer, got {value!r}")
    v = int(value)
    if v < lo:
        raise ValueError(f"{name}: must be >= {lo}, got {v}")
    if hi is not None and v > hi:
        raise ValueError(f"{name}: must be <= {hi}, got {v}")
    return v


def static_int(value: Any, name: str, why: str, *, lo: int | None = None) -> int:
    """An integer that must be concrete here (``why``: what it sets); with ``lo`` it is checked like check_int."""
    if is_traced(value):
        raise ValueError(
            f"{name}: must be static here ({why}); with optax.inject_hyperparams pass static_args=({name!r},)"
        )
    if lo is not None:
        check_int(value, name, lo=lo)
    return int(value)


def check_choice(value: Any, name: str, choices: Sequence[str], *, hints: Mapping[str, str] | None = None) -> None:
    """``value`` is one of ``choices``; ``hints`` maps a known wrong value to an explanation added to the error."""
    if value in choices:
        return
    hint = (hints or {}).get(value) if isinstance(value, str) else None
    raise ValueError(
        f"{name}: unknown value {value!r}; expected one of {', '.join(map(repr, choices))}"
        + (f" ({hint})" if hint else "")
    )


def check_bool(value: Any, name: str) -> None:
    """A Python bool (a flag that selects code paths, so never traced)."""
    if not isinstance(value, bool):
        raise ValueError(f"{name}: must be a bool, got {value!r}")
