"""The linear toy: gradient descent against a float64 NumPy reference, incremental learning in decreasing
order, the exact expected perturbed error, and the predicted inflection."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from lowrank_jax.analysis.linear_toy import linear_toy, target_matrix

SEED = int(np.random.SeedSequence().entropy % 2**31)


def test_gradient_descent_matches_float64_reference():
    s = np.sort(np.random.default_rng(SEED).uniform(0.5, 3.0, 3))[::-1] + np.array([0.2, 0.1, 0.0])
    key = jax.random.key(SEED % 10_000)
    kw = dict(d_in=5, d_out=4, hidden=3, init_scale=0.3, lr=0.05, steps=40, record_every=8, gammas=(0.1,), n_perturb=3)
    res = linear_toy(s, key=key, **kw)
    # Re-derive the documented inputs and run plain float64 gradient descent on ½‖W2 W1 − Y‖².
    k_target, k1, k2, kp = jax.random.split(key, 4)
    y, u, v = target_matrix(k_target, s, 4, 5)
    w1 = np.asarray(jax.random.normal(k1, (3, 5)), np.float64) * 0.3
    w2 = np.asarray(jax.random.normal(k2, (4, 3)), np.float64) * 0.3
    z1 = np.asarray(jax.random.normal(jax.random.fold_in(kp, 1), (3, 3, 5)), np.float64)
    z2 = np.asarray(jax.random.normal(jax.random.fold_in(kp, 2), (3, 4, 3)), np.float64)
    for i in range(len(res.steps)):
        if i:
            for _ in range(8):
                r = w2 @ w1 - y
                w1, w2 = w1 - 0.05 * w2.T @ r, w2 - 0.05 * r @ w1.T
        p = w2 @ w1
        np.testing.assert_allclose(res.learned[i], np.diag(u.T @ p @ v), rtol=1e-4, atol=1e-5, err_msg=str(SEED))
        assert res.clean_error[i] == pytest.approx(np.sum((p - y) ** 2), rel=1e-4)
        pert = [np.sum(((w2 + 0.1 * z2[n]) @ (w1 + 0.1 * z1[n]) - y) ** 2) for n in range(3)]
        assert res.perturbed_error[0.1][i] == pytest.approx(np.mean(pert), rel=1e-4)
        assert res.perturbed_error_std[0.1][i] == pytest.approx(np.std(pert), rel=1e-3, abs=1e-5)
    assert list(res.steps) == [0, 8, 16, 24, 32, 40]


def test_learns_singular_values_in_decreasing_order_and_inflects_where_predicted():
    res = linear_toy(key=jax.random.key(SEED % 1000), n_perturb=64)
    s = res.target_singular_values
    # Every mode is learned, largest first.
    assert np.all(res.half_steps > 0), res.half_steps
    assert np.all(np.diff(res.half_steps) > 0), (res.half_steps, SEED)
    np.testing.assert_allclose(res.learned[-1], s, rtol=1e-3)
    # The clean error keeps falling (non-increasing up to float32 noise) ...
    assert np.all(np.diff(res.clean_error) <= 1e-4 * res.clean_error[0])
    prev = None
    for inf in res.inflections:
        # ... while the perturbed error has an interior minimum and then rises clearly.
        curve = res.perturbed_error[inf.gamma]
        assert inf.mode is not None and 0 < inf.mode < len(s)
        assert s[inf.mode] < inf.threshold < s[inf.mode - 1]
        assert 0 < inf.observed_step < res.steps[-1]
        # (Z is fixed over time, so the rise is a paired difference; its exact expectation rises too.)
        expected = res.perturbed_expected[inf.gamma]
        assert inf.rise_after_min > 0.1 and expected[-1] - expected.min() > 0.1, (inf, SEED)
        assert curve[-1] < curve[0]  # still far better than the untrained model
        # The minimum lies where the theory puts it: after mode k*−1 is half learned, before mode k* is.
        lo, hi = inf.predicted_window
        step = res.settings["record_every"]
        assert lo - step <= inf.observed_step <= hi, (inf, SEED)
        assert abs(inf.observed_step_expected - inf.predicted_step) <= 3 * step, (inf, SEED)
        # Larger perturbations inflect earlier.
        if prev is not None:
            assert inf.gamma > prev.gamma and inf.observed_step < prev.observed_step
        prev = inf


def test_expected_perturbed_error_formula_matches_monte_carlo():
    res = linear_toy(
        (3.0, 1.0),
        d_in=4,
        d_out=3,
        hidden=5,
        init_scale=0.2,
        lr=0.05,
        steps=60,
        record_every=20,
        gammas=(0.3,),
        n_perturb=4000,
        key=jax.random.key(SEED % 777),
    )
    mc, sd, ex = res.perturbed_error[0.3], res.perturbed_error_std[0.3], res.perturbed_expected[0.3]
    assert np.all(np.abs(mc - ex) < 5 * sd / np.sqrt(4000)), (mc, ex, SEED)
    assert np.all(ex > res.clean_error)


def test_errors_name_the_argument():
    with pytest.raises(ValueError, match="singular_values"):
        linear_toy((1.0, 2.0))
    with pytest.raises(ValueError, match="singular_values"):
        linear_toy((1.0, -1.0))
    with pytest.raises(ValueError, match="singular_values"):
        linear_toy((4.0, 3.0, 2.0, 1.0), hidden=3)
    with pytest.raises(ValueError, match="gammas"):
        linear_toy(gammas=())
    with pytest.raises(ValueError, match="lr"):
        linear_toy(lr=0.1)
    with pytest.raises(ValueError, match="steps"):
        linear_toy(steps=0)
    with pytest.raises(ValueError, match="init_scale"):
        linear_toy(init_scale=-1.0)
    with pytest.raises(ValueError, match="n_perturb"):
        linear_toy(n_perturb=1.5)
