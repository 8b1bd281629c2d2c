"""The training loss: value and both derivative modes against a float64 NumPy reference."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lowrank_jax.train.state import cross_entropy, nll_sum


def _reference(logits, targets):
    """Mean NLL and its gradient ``(softmax - onehot) / N`` in float64."""
    x = np.asarray(logits, np.float64)
    t = np.asarray(targets)
    m = x.max(-1, keepdims=True)
    lse = m + np.log(np.exp(x - m).sum(-1, keepdims=True))
    nll = lse[..., 0] - np.take_along_axis(x, t[..., None], -1)[..., 0]
    onehot = np.eye(x.shape[-1])[t]
    return nll.mean(), (np.exp(x - lse) - onehot) / t.size


@pytest.fixture
def batch():
    logits = 3.0 * jax.random.normal(jax.random.key(0), (3, 5, 11))
    targets = jax.random.randint(jax.random.key(1), (3, 5), 0, 11)
    return logits, targets


def test_value_and_gradient_match_float64(batch):
    logits, targets = batch
    want, dwant = _reference(logits, targets)
    loss, grad = jax.value_and_grad(cross_entropy)(logits, targets)
    assert loss.dtype == jnp.float32
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(grad, dwant, rtol=1e-5, atol=1e-8)
    # the cotangent scales the gradient (the rule is used inside larger losses, e.g. /grad_accum)
    g3 = jax.grad(lambda x: 3.0 * cross_entropy(x, targets) + jnp.sum(x))(logits)
    np.testing.assert_allclose(g3, 3.0 * dwant + 1.0, rtol=1e-5, atol=1e-7)


def test_forward_mode_equals_the_directional_derivative(batch):
    logits, targets = batch
    tangent = jax.random.normal(jax.random.key(2), logits.shape)
    _, dwant = _reference(logits, targets)
    _, jvp = jax.jvp(lambda x: cross_entropy(x, targets), (logits,), (tangent,))
    np.testing.assert_allclose(float(jvp), float(np.sum(dwant * np.asarray(tangent, np.float64))), rtol=1e-5)


def test_matches_eval_nll_and_bf16_logits(batch):
    logits, targets = batch
    total, n = nll_sum(logits, targets)
    np.testing.assert_allclose(float(cross_entropy(logits, targets)), float(total) / n, rtol=1e-6)
    low = logits.astype(jnp.bfloat16)
    want, dwant = _reference(low.astype(jnp.float32), targets)
    loss, grad = jax.value_and_grad(cross_entropy)(low, targets)
    assert loss.dtype == jnp.float32 and grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(float(loss), want, rtol=1e-6)
    np.testing.assert_allclose(np.asarray(grad, np.float64), dwant, rtol=2e-2, atol=1e-4)
