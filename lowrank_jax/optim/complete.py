"""What every complete optimizer shares: learning rate and weight decay around a ``scale_by_<method>`` transform,
and the check that keeps the card's ``optax.chain(galore(rank), adamw(lr))`` from training silently wrong.

optax's convention, followed by every method here: ``scale_by_<method>(…)`` is a params-free transform without a
learning rate that composes in ``optax.chain``; ``<method>(learning_rate, …, weight_decay=…, mask=…)`` is a complete
optimizer like ``optax.adamw``: ``chain(scale_by_<method>(…), add_decayed_weights(weight_decay), lr)``
(:func:`complete_optimizer`).

Why ``optax.chain(<method>(…), optax.adamw(lr))`` stops instead of training: ``optax.chain`` initialises every member
on the full parameters, so the AdamW after a low-rank method keeps full-size moments (more state than AdamW alone)
and normalises the method's update a second time (a sign-like step that drops GaLore's ``scale``). No placement of
the low-rank state can fix that from inside the method, so its ``init`` looks at the combinator it is initialised in
(``optax.chain``, ``optax.named_chain``: the enclosing frames that belong to optax) and raises, before the first
update, when a later member keeps state of a parameter matrix's shape (:func:`guard_composition`). Transforms
without such state (weight decay, a learning-rate scale, clipping) may follow a ``scale_by_<method>``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import jax
import optax

from lowrank_jax.optim.checks import check_real

_FRAMES = 16  # how far up the stack init looks for the optax combinator that called it
_SCALE_BY = {"adamw_8bit": "scale_by_adam_8bit"}  # scale-by names that are not scale_by_<method>


def _scale_by(method: str) -> str:
    return _SCALE_BY.get(method, f"scale_by_{method}")


def matrices(params: optax.Params) -> Any:
    """True for leaves with ``ndim >= 2``: the default weight-decay mask (norm scales and biases are not decayed)."""
    return jax.tree.map(lambda x: x.ndim >= 2, params)


def check_learning_rate(learning_rate: Any, method: str) -> None:
    """A learning rate was given, and it is not the rank passed in its place (``galore(8)`` for ``galore(rank=8)``)."""
    form = f"lrj.{method}(learning_rate, ...)"
    if learning_rate is None:
        raise TypeError(
            f"{method}() is a complete optimizer like optax.adamw and needs learning_rate: write {form} on its "
            f"own, not inside optax.chain(..., optax.adamw(...)); to compose, use lrj.{_scale_by(method)}(...)"
        )
    if isinstance(learning_rate, int) and not isinstance(learning_rate, bool) and learning_rate >= 1:
        raise ValueError(
            f"learning_rate: got the integer {learning_rate}; the first argument of {method}() is the learning "
            f"rate and the rank a keyword: {form}"
        )
    if not callable(learning_rate):  # a schedule is checked by optax; a traced value is skipped by check_real
        check_real(learning_rate, "learning_rate", lo=0.0)


def complete_optimizer(
    method: str,
    scaling: optax.GradientTransformation,
    learning_rate: optax.ScalarOrSchedule,
    weight_decay: Any,
    weight_decay_mask: Any,
) -> optax.GradientTransformationExtraArgs:
    """``chain(scaling, add_decayed_weights(weight_decay, weight_decay_mask or matrices), lr)``, guarded."""
    check_learning_rate(learning_rate, method)
    check_real(weight_decay, "weight_decay", lo=0.0)
    tx = optax.chain(
        scaling,
        optax.add_decayed_weights(weight_decay, mask=matrices if weight_decay_mask is None else weight_decay_mask),
        optax.scale_by_learning_rate(learning_rate),
    )
    return guard_composition(tx, method, complete=True)


def guard_composition(
    tx: optax.GradientTransformation, method: str, *, complete: bool
) -> optax.GradientTransformationExtraArgs:
    """``tx`` whose ``init`` raises when an enclosing optax combinator runs a full-size optimizer after it."""
    tx = optax.with_extra_args_support(tx)

    def init_fn(params: optax.Params) -> optax.OptState:
        later = _later_members(init_fn)
        if later:
            _check_later(later, params, method, complete)
        return tx.init(params)

    return optax.GradientTransformationExtraArgs(init_fn, tx.update)


def _init_of(member: Any) -> Callable | None:
    """The init function of a combinator's member: a function, a transform, or a ``(name, transform)`` pair."""
    if isinstance(member, tuple) and len(member) == 2 and hasattr(member[1], "init"):
        member = member[1]
    if hasattr(member, "init") and hasattr(member, "update"):
        return member.init
    return member if callable(member) else None


def _later_members(own_init: Callable) -> list[Callable]:
    """The init functions after ``own_init`` in the optax combinator (chain) whose ``init`` is running, if any."""
    frame = sys._getframe(2)
    for _ in range(_FRAMES):
        if frame is None:
            break
        if str(frame.f_globals.get("__name__", "")).startswith("optax"):
            for value in frame.f_locals.values():
                if type(value) in (tuple, list) and len(value) > 1:  # not a NamedTuple (a transform is one)
                    inits = [_init_of(v) for v in value]
                    for i, f in enumerate(inits):
                        if f is own_init:
                            return [g for g in inits[i + 1 :] if g is not None]
        frame = frame.f_back
    return []


def _check_later(later: list[Callable], params: optax.Params, method: str, complete: bool) -> None:
    """Raise if a later member keeps per-parameter state of a matrix's shape (a second optimizer)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shapes = {tuple(x.shape) for x in jax.tree.leaves(abstract) if len(x.shape) >= 2}
    for init in later:
        try:
            state = jax.eval_shape(init, abstract)
        except Exception:  # a member that cannot initialise on these params fails on its own, with its own error
            continue
        if any(tuple(x.shape) in shapes for x in jax.tree.leaves(state) if hasattr(x, "shape")):
            raise ValueError(_misuse_message(method, complete))


def _misuse_message(method: str, complete: bool) -> str:
    given = f"lrj.{method}(...)" if complete else f"lrj.{_scale_by(method)}(...)"
    return (
        f"optax.chain({given}, <an optimizer with full-size state, e.g. optax.adamw>) would run a second optimizer "
        f"after {method}, which already includes its own (full-size moments, more state than AdamW, sign-like "
        f"updates): use lrj.{method}(learning_rate, ...) on its own (clipping may come before it), or "
        f"lrj.{_scale_by(method)}(...) followed by params-free transforms such as optax.add_decayed_weights and "
        "optax.scale_by_learning_rate"
    )
