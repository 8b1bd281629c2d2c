"""What the ordinary and the per-layer train steps share: the state, the loss and the step's end.

The state is a pytree ``TrainState(step, params, opt_state, rng, skipped)`` with params as a pure
dict. A step whose loss or gradient norm is not finite leaves params and optimizer state unchanged
and increments ``skipped`` (:func:`finish_step`).
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp


class TrainState(NamedTuple):
    step: jax.Array  # int32 scalar: number of steps taken (the data position)
    params: Any  # pure dict of arrays
    opt_state: Any
    rng: jax.Array  # uint32[2] key data; methods fold in the step
    skipped: jax.Array  # int32 scalar: steps skipped for non-finite loss/grads


def _is_float(x: Any) -> bool:
    return jnp.issubdtype(x.dtype, jnp.inexact)


def float_grads(grads: Any, params: Any) -> Any:
    """Integer params (SLTrain's support) get float0 cotangents under ``allow_int``: replace them by
    float32 zeros, which global-norm clipping and optax accept (the frozen partition gives them no state)."""
    return jax.tree.map(lambda g, p: g if _is_float(p) else jnp.zeros(p.shape, jnp.float32), grads, params)


def keep_int_params(new: Any, old: Any) -> Any:
    """Integer params are constants of the model and never change (int32 + a float update would round)."""
    return jax.tree.map(lambda n, o: n if _is_float(o) else o, new, old)


def target_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """``log p(target)`` of every position, ``(B, T, 1)`` float32 (the log-softmax is taken in float32)."""
    logp = jax.nn.log_softmax(logits_BTV.astype(jnp.float32), axis=-1)
    return jnp.take_along_axis(logp, targets_BT[..., None], axis=-1)


@jax.custom_jvp
def cross_entropy(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
    """Mean next-token negative log-likelihood in nats (float32): the training loss.

    ``mean(logsumexp(logits) - logits[target])``, with the derivative written out:
    ``∂/∂logits = (softmax(logits) - onehot(target)) / N``, one elementwise pass over the logits.
    Autodiff of ``log_softmax`` + ``take_along_axis`` instead builds a zero-filled ``(B, T, vocab)``
    buffer for the gather's transpose (a scatter); on XLA:CPU that cost about a fifth of ``tiny``'s
    step (README, "CPU performance"). A JVP rule, so forward mode works too and reverse mode is its
    transpose. The value equals ``-mean(target_log_probs(...))`` to float32 rounding.
    """
    return _mean_nll(logits_BTV, targets_BT)[0]


def _mean_nll(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The loss, the float32 logits and their ``logsumexp`` over the vocabulary (kept dims)."""
    logits = logits_BTV.astype(jnp.float32)
    lse = jax.nn.logsumexp(logits, axis=-1, keepdims=True)
    return jnp.mean(lse - jnp.take_along_axis(logits, targets_BT[..., None], axis=-1)), logits, lse


@cross_entropy.defjvp
def _cross_entropy_jvp(primals: tuple, tangents: tuple) -> tuple[jax.Array, jax.Array]:
    logits_BTV, targets_BT = primals
    loss, logits, lse = _mean_nll(logits_BTV, targets_BT)
    vocab = jax.lax.broadcasted_iota(targets_BT.dtype, logits.shape, logits.ndim - 1)
    dloss_dlogits = (jnp.exp(logits - lse) - (vocab == targets_BT[..., None])) / targets_BT.size
    return loss, jnp.sum(dloss_dlogits * tangents[0].astype(jnp.float32))


def nll_sum(logits_BTV: jax.Array, targets_BT: jax.Array) -> tuple[jax.Array, int]:
    """``(Σ negative log-likelihood, number of tokens)``: evaluation sums over batches, then divides."""
    nll = -target_log_probs(logits_BTV, targets_BT)
    return jnp.sum(nll), nll.size


def finish_step(
    state: TrainState, params: Any, opt_state: Any, ok: jax.Array, loss: jax.Array, grad_norm: jax.Array, schedule
) -> tuple[TrainState, dict[str, jax.Array]]:
    """The next state (``params``/``opt_state`` already left unchanged where ``ok`` is false) and the step metrics."""
    skipped = (~ok).astype(jnp.int32)
    new_state = TrainState(state.step + 1, params, opt_state, state.rng, state.skipped + skipped)
    metrics = {"loss": loss, "grad_norm": grad_norm, "lr": schedule(state.step - state.skipped), "skipped": skipped}
    return new_state, metrics
