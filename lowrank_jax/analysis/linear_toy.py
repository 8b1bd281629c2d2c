"""The linear toy model of catastrophic overtraining: incremental learning meets a fixed perturbation.

Springer, Goyal, Wen, Kumar, Yue, Malladi, Neubig, Raghunathan, "Overtrained Language Models Are
Harder to Fine-Tune", ICML 2025, arXiv 2503.19206, §4 (theory): a two-layer linear network
``f(x) = W2 W1 x`` trained by gradient descent from a small initialisation learns the singular values
of its target one by one, largest first (Saxe et al. 2014; Gidel et al. 2019). A perturbation of
size ``γ`` costs more the more modes have been learned, so once the mode being learned is smaller
than the perturbation's price the *perturbed* error rises although the clean error keeps falling.

Setting (whitened inputs, so the population loss is a matrix norm)::

    Y = U diag(s) Vᵀ (d_out × d_in),  s_1 > s_2 > … decaying;   W1 (h × d_in), W2 (d_out × h) ~ N(0, ε²)
    E(W1, W2)  = ‖W2 W1 − Y‖²_F                          clean error
    GD on ½E:    W1 ← W1 − η W2ᵀ R,   W2 ← W2 − η R W1ᵀ,    R = W2 W1 − Y
    learned singular value k at step t:  σ_k(t) = u_kᵀ W2 W1 v_k
    perturbed error: E(W1 + γ Z1, W2 + γ Z2) with Z1, Z2 ~ N(0, I) fixed for the whole run, averaged over
    ``n_perturb`` draws; its expectation is exact:
        E_Z = E + γ² (d_out ‖W1‖²_F + d_in ‖W2‖²_F) + γ⁴ d_out h d_in.

With small init the factors stay balanced (``W1 W1ᵀ − W2ᵀ W2`` is conserved by gradient flow), so a
learned mode ``k`` adds ``s_k`` to both ``‖W1‖²`` and ``‖W2‖²``. Learning it lowers the clean error by
``s_k²`` and raises the perturbation term by ``γ² (d_in + d_out) s_k``: it pays off only while
``s_k > τ(γ) = γ² (d_in + d_out)``. The predicted inflection is therefore the learning of the first
mode ``k*`` with ``s_k* < τ``: the perturbed error is minimal between the steps at which modes
``k* − 1`` and ``k*`` reach half their value — precisely, where mode ``k* − 1`` reaches its own
optimum under the perturbation, ``σ = s_{k*−1} − τ/2`` (the minimiser of ``(s − σ)² + τσ``) — and
rises after. Larger ``γ`` gives a larger ``τ``, an
earlier ``k*``, and an earlier inflection — the paper's "larger λ moves the inflection to smaller
budgets". Runs in float32 under ``jax.lax.scan``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

HI = jax.lax.Precision.HIGHEST


@dataclass(frozen=True)
class Inflection:
    gamma: float
    threshold: float  # τ = γ² (d_in + d_out)
    mode: int | None  # k*: first mode (0-based) with s_k < τ; None if every mode pays off
    predicted_window: tuple[int, int] | None  # (half-time of mode k*−1, half-time of mode k*) in steps
    predicted_step: int | None  # first step with σ_{k*−1} ≥ s_{k*−1} − τ/2 (that mode's optimum under noise)
    observed_step: int  # argmin of the Monte-Carlo perturbed error
    observed_step_expected: int  # argmin of its exact expectation
    rise_after_min: float  # perturbed error at the end minus its minimum (> 0: it rose)


@dataclass(frozen=True)
class LinearToyResult:
    steps: np.ndarray  # (T,) recorded steps (0 = initialisation)
    target_singular_values: np.ndarray  # (r,)
    learned: np.ndarray  # (T, r) σ_k(t)
    clean_error: np.ndarray  # (T,)
    perturbed_error: dict[float, np.ndarray]  # γ -> (T,) mean over perturbation draws
    perturbed_error_std: dict[float, np.ndarray]  # γ -> (T,) std over draws
    perturbed_expected: dict[float, np.ndarray]  # γ -> (T,) exact expectation over Z
    half_steps: np.ndarray  # (r,) first recorded step with σ_k ≥ s_k / 2 (-1 if never)
    inflections: tuple[Inflection, ...]
    settings: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "steps": self.steps.tolist(),
            "target_singular_values": self.target_singular_values.tolist(),
            "learned": self.learned.tolist(),
            "clean_error": self.clean_error.tolist(),
            "perturbed_error": {str(g): v.tolist() for g, v in self.perturbed_error.items()},
            "perturbed_error_std": {str(g): v.tolist() for g, v in self.perturbed_error_std.items()},
            "perturbed_expected": {str(g): v.tolist() for g, v in self.perturbed_expected.items()},
            "half_steps": self.half_steps.tolist(),
            "inflections": [
                {
                    "gamma": i.gamma,
                    "threshold": i.threshold,
                    "mode": i.mode,
                    "predicted_window": list(i.predicted_window) if i.predicted_window else None,
                    "predicted_step": i.predicted_step,
                    "observed_step": i.observed_step,
                    "observed_step_expected": i.observed_step_expected,
                    "rise_after_min": i.rise_after_min,
                }
                for i in self.inflections
            ],
        }


def _positive(name: str, v: Any, integer: bool = False) -> None:
    ok = not isinstance(v, bool) and (isinstance(v, int) if integer else isinstance(v, (int, float)))
    if not ok or not math.isfinite(v) or v <= 0:
        kind = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{name}: must be {kind}, got {v!r}")


def target_matrix(key: jax.Array, singular_values: np.ndarray, d_out: int, d_in: int) -> tuple[np.ndarray, ...]:
    """``(Y, U, V)`` with ``Y = U diag(s) Vᵀ`` and random orthonormal ``U`` (d_out × r), ``V`` (d_in × r)."""
    r = len(singular_values)
    ku, kv = jax.random.split(key)
    u, _ = np.linalg.qr(np.asarray(jax.random.normal(ku, (d_out, r)), np.float64))
    v, _ = np.linalg.qr(np.asarray(jax.random.normal(kv, (d_in, r)), np.float64))
    return (u * singular_values) @ v.T, u, v


def _check(s: np.ndarray, singular_values, gammas, lr: float, **positive: Any) -> list[float]:
    """Validate the arguments of :func:`linear_toy` (ValueError naming the argument); the gammas as floats."""
    if s.ndim != 1 or s.size == 0 or not np.all(np.isfinite(s)) or np.any(s <= 0):
        raise ValueError(f"singular_values: must be a non-empty sequence of positive numbers, got {singular_values!r}")
    if np.any(np.diff(s) >= 0):
        raise ValueError(f"singular_values: must be strictly decreasing, got {list(s)}")
    for name in ("d_in", "d_out", "hidden", "steps", "record_every", "n_perturb"):
        _positive(name, positive[name], integer=True)
    _positive("init_scale", positive["init_scale"])
    _positive("lr", lr)
    d_min = min(positive["d_in"], positive["d_out"], positive["hidden"])
    if s.size > d_min:
        raise ValueError(f"singular_values: {s.size} modes exceed min(d_in, d_out, hidden) = {d_min}")
    gams = [float(g) for g in gammas]
    if not gams or any(not math.isfinite(g) or g <= 0 for g in gams):
        raise ValueError(f"gammas: must be a non-empty sequence of positive numbers, got {gammas!r}")
    if lr * s[0] >= 0.5:
        raise ValueError(f"lr: lr * s_1 = {lr * s[0]:.3g} must stay below 0.5 for stable gradient descent")
    return gams


@dataclass(frozen=True)
class _Problem:
    """The float32 arrays of one run: target ``Y = U diag(s) Vᵀ``, initial factors, perturbations ``Z``."""

    y: jax.Array  # (d_out, d_in)
    u: jax.Array  # (d_out, r)
    v: jax.Array  # (d_in, r)
    w1: jax.Array  # (hidden, d_in)
    w2: jax.Array  # (d_out, hidden)
    z1: jax.Array  # (n_perturb, hidden, d_in)
    z2: jax.Array  # (n_perturb, d_out, hidden)
    gam: jax.Array  # (G,)


def _problem(key, s, d_in, d_out, hidden, init_scale, n_perturb, gams) -> _Problem:
    k_target, k_init1, k_init2, k_pert = jax.random.split(key, 4)
    y, u, v = target_matrix(k_target, s, d_out, d_in)
    w1 = jax.random.normal(k_init1, (hidden, d_in), jnp.float32) * init_scale
    w2 = jax.random.normal(k_init2, (d_out, hidden), jnp.float32) * init_scale
    z1 = jax.random.normal(jax.random.fold_in(k_pert, 1), (n_perturb, hidden, d_in), jnp.float32)
    z2 = jax.random.normal(jax.random.fold_in(k_pert, 2), (n_perturb, d_out, hidden), jnp.float32)
    y32, u32, v32 = (jnp.asarray(a, jnp.float32) for a in (y, u, v))
    return _Problem(y32, u32, v32, w1, w2, z1, z2, jnp.asarray(gams, jnp.float32))


def _record(pb: _Problem, w1, w2):
    """``(σ_k, E, perturbed mean, perturbed std, E_Z)`` at ``(W1, W2)``; the last three per γ."""
    d_out, hidden, d_in = pb.w2.shape[0], pb.w1.shape[0], pb.w1.shape[1]
    p = jnp.dot(w2, w1, precision=HI)
    learned = jnp.einsum("ok,oi,ik->k", pb.u, p, pb.v, precision=HI)
    clean = jnp.sum((p - pb.y) ** 2)

    def pert(g):
        pp = jnp.einsum("noh,nhi->noi", w2[None] + g * pb.z2, w1[None] + g * pb.z1, precision=HI)
        e = jnp.sum((pp - pb.y[None]) ** 2, axis=(1, 2))
        return jnp.mean(e), jnp.std(e)

    pm, ps = jax.vmap(pert)(pb.gam)
    n1, n2 = jnp.sum(w1 * w1), jnp.sum(w2 * w2)
    expected = clean + pb.gam**2 * (d_out * n1 + d_in * n2) + pb.gam**4 * (d_out * hidden * d_in)
    return learned, clean, pm, ps, expected


def _train(pb: _Problem, lr: float, record_every: int, n_rec: int) -> tuple[np.ndarray, ...]:
    """GD on ½E for ``n_rec · record_every`` steps, recording :func:`_record` every ``record_every`` (float64)."""

    def gd(carry, _):
        w1, w2 = carry
        r = jnp.dot(w2, w1, precision=HI) - pb.y
        g1, g2 = jnp.dot(w2.T, r, precision=HI), jnp.dot(r, w1.T, precision=HI)
        return (w1 - lr * g1, w2 - lr * g2), None

    @jax.jit
    def run(w1, w2):
        def chunk(carry, _):
            carry, _ = jax.lax.scan(gd, carry, None, length=record_every)
            return carry, _record(pb, *carry)

        first = _record(pb, w1, w2)
        _, rest = jax.lax.scan(chunk, (w1, w2), None, length=n_rec)
        return jax.tree.map(lambda a, b: jnp.concatenate([a[None], b]), first, rest)

    return tuple(np.asarray(a, np.float64) for a in run(pb.w1, pb.w2))


def _half_steps(learned: np.ndarray, s: np.ndarray, rec_steps: np.ndarray) -> np.ndarray:
    """First recorded step with ``σ_k ≥ s_k / 2`` per mode (-1 if never)."""
    return np.array(
        [
            int(rec_steps[np.argmax(learned[:, k] >= s[k] / 2)]) if np.any(learned[:, k] >= s[k] / 2) else -1
            for k in range(s.size)
        ]
    )


def _inflection(g, j, s, dims, half, learned, pm, expected, rec_steps) -> Inflection:
    """The predicted and observed inflection of the perturbed error for ``γ = g`` (column ``j``)."""
    tau = g * g * dims
    below = np.nonzero(s < tau)[0]
    mode = int(below[0]) if below.size else None
    window, predicted = None, None
    if mode is not None and mode > 0 and half[mode] >= 0:
        window = (int(half[mode - 1]), int(half[mode]))
        reached = learned[:, mode - 1] >= s[mode - 1] - tau / 2
        predicted = int(rec_steps[np.argmax(reached)]) if np.any(reached) else None
    i_min = int(np.argmin(pm[:, j]))
    return Inflection(
        gamma=g,
        threshold=float(tau),
        mode=mode,
        predicted_window=window,
        predicted_step=predicted,
        observed_step=int(rec_steps[i_min]),
        observed_step_expected=int(rec_steps[int(np.argmin(expected[:, j]))]),
        rise_after_min=float(pm[-1, j] - pm[i_min, j]),
    )


def linear_toy(
    singular_values: Sequence[float] = (10.0, 5.0, 2.5, 1.25, 0.625, 0.3125),
    *,
    d_in: int = 8,
    d_out: int = 8,
    hidden: int = 8,
    init_scale: float = 1e-3,
    lr: float = 0.02,
    steps: int = 3000,
    record_every: int = 5,
    gammas: Sequence[float] = (0.25, 0.35, 0.5),
    n_perturb: int = 32,
    key: jax.Array | None = None,
) -> LinearToyResult:
    """Train ``W2 W1`` on ``Y = U diag(s) Vᵀ`` by gradient descent and record the quantities of the module docstring."""
    s = np.asarray(list(singular_values), np.float64)
    dims = dict(d_in=d_in, d_out=d_out, hidden=hidden, steps=steps, record_every=record_every, n_perturb=n_perturb)
    gams = _check(s, singular_values, gammas, lr, init_scale=init_scale, **dims)
    pb = _problem(jax.random.key(0) if key is None else key, s, d_in, d_out, hidden, init_scale, n_perturb, gams)
    n_rec = steps // record_every
    learned, clean, pm, ps, expected = _train(pb, lr, record_every, n_rec)
    rec_steps = np.arange(n_rec + 1) * record_every
    half = _half_steps(learned, s, rec_steps)
    inflections = tuple(
        _inflection(g, j, s, d_in + d_out, half, learned, pm, expected, rec_steps) for j, g in enumerate(gams)
    )
    return LinearToyResult(
        steps=rec_steps,
        target_singular_values=s,
        learned=learned,
        clean_error=clean,
        perturbed_error={g: pm[:, j] for j, g in enumerate(gams)},
        perturbed_error_std={g: ps[:, j] for j, g in enumerate(gams)},
        perturbed_expected={g: expected[:, j] for j, g in enumerate(gams)},
        half_steps=half,
        inflections=inflections,
        settings=dict(
            singular_values=s.tolist(),
            d_in=d_in,
            d_out=d_out,
            hidden=hidden,
            init_scale=init_scale,
            lr=lr,
            steps=steps,
            record_every=record_every,
            gammas=gams,
            n_perturb=n_perturb,
        ),
    )
