"""What the APOLLO, Fira and GoLore tests share: PyTorch-orientation views, the plain-Adam reference step,
trajectories, the relative error against a port, and a short run of the trainer."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.config import load_config
from lowrank_jax.optim import scale_by_adam_hf
from lowrank_jax.train.step import make_trainer

B1, B2, EPS = 0.9, 0.999, 1e-6  # the official defaults of every method here


def random_tree(rng: np.random.Generator, shapes: dict) -> dict:
    return {k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()}


def matrices(tree: dict, torch: bool = True) -> dict:
    """One float64 entry per matrix (a stacked leaf ``k`` of shape (L, ·, ·) as ``k0`` … ``k{L-1}``);
    ``torch``: matrices transposed to PyTorch's (out, in). MaskedNode leaves are dropped."""
    out = {}
    for k, v in tree.items():
        if isinstance(v, optax.MaskedNode):
            continue
        v = np.asarray(v, np.float64)
        t = (lambda x: x.T) if torch else (lambda x: x)
        if v.ndim == 3:
            out.update({f"{k}{i}": t(v[i]) for i in range(v.shape[0])})
        else:
            out[k] = t(v) if v.ndim == 2 else v
    return out


def bias_correction(t: int) -> float:
    """HF AdamW's step-size factor √(1 − b2ᵗ) / (1 − b1ᵗ) at step ``t`` (counted from 1)."""
    return math.sqrt(1 - B2**t) / (1 - B1**t)


def adam_moments(m: Any, v: Any, g: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """``(m, v, m / (√v + eps))`` after one HF AdamW moment update (``None`` moments start at zero)."""
    m = B1 * (np.zeros_like(g) if m is None else m) + (1 - B1) * g
    v = B2 * (np.zeros_like(g) if v is None else v) + (1 - B2) * g * g
    return m, v, m / (np.sqrt(v) + EPS)


class Port:
    """Skeleton of a float64 port in PyTorch orientation: weights ``w``, HF AdamW moments ``m`` / ``v`` per
    matrix, step ``t`` (from 0). Vectors (biases) take plain AdamW, as the official param groups without
    ``rank``; subclasses implement :meth:`matrix_step`, which returns the update to subtract (lr included)."""

    def __init__(self, params: dict, lr: float) -> None:
        self.w = matrices(params)
        self.lr = lr
        self.m: dict[str, Any] = dict.fromkeys(self.w)
        self.v: dict[str, Any] = dict.fromkeys(self.w)
        self.kept_norm: dict[str, float] = {}
        self.t = 0

    def limit(self, key: str, x: np.ndarray, gamma: float = 1.01) -> np.ndarray:
        """Fira's norm-growth limiter as fira_adamw.py writes it (``state["scaling_grad"]``; nothing at step 0)."""
        norm = np.linalg.norm(x)
        if key not in self.kept_norm:
            self.kept_norm[key] = norm
            return x
        limiter = max(norm / (self.kept_norm[key] + 1e-8), gamma) / gamma
        self.kept_norm[key] = norm / limiter
        return x / limiter

    def matrix_step(self, key: str, g: np.ndarray, c: float, probe: Any) -> np.ndarray:
        raise NotImplementedError

    def step(self, grads: dict, probe: Any = None) -> None:
        c = bias_correction(self.t + 1)
        for key, g in matrices(grads).items():
            if g.ndim < 2:
                self.m[key], self.v[key], n = adam_moments(self.m[key], self.v[key], g)
                self.w[key] = self.w[key] - self.lr * c * n
            else:
                self.w[key] = self.w[key] - self.matrix_step(key, g, c, probe)
        self.t += 1


def trajectory(
    tx: optax.GradientTransformation, params: dict, grads: list, lr: float, probe: Callable[[Any], Any] | None = None
) -> tuple[list, list]:
    """Params after each step of ``chain(tx, lr)`` (jitted), and ``probe(tx's state)`` after each step."""
    tx = optax.chain(tx, optax.scale_by_learning_rate(lr))
    state, update = tx.init(params), jax.jit(tx.update)
    traj, probes = [], []
    for g in grads:
        u, state = update(g, state)
        params = optax.apply_updates(params, u)
        traj.append(params)
        probes.append(None if probe is None else probe(state[0]))
    return traj, probes


def max_rel_error(traj: list, ref: Any, grads: list, probes: list) -> float:
    """Step the port (``ref.step(grads, probe)``, weights ``ref.w`` in PyTorch orientation) along our trajectory;
    the largest ``max|ours − ref| / max|ref|`` over steps and matrices."""
    worst = 0.0
    for t, g in enumerate(grads):
        ref.step(g, probes[t])
        for k, ours in matrices(traj[t]).items():
            worst = max(worst, float(np.max(np.abs(ours - ref.w[k])) / np.max(np.abs(ref.w[k]))))
    return worst


def align_signs(p: np.ndarray, ours: np.ndarray) -> np.ndarray:
    """The port's fresh SVD projector with its column signs flipped to ours, after checking they agree."""
    np.testing.assert_equal(p.shape, ours.shape)
    sign = np.sign(np.sum(p * ours, axis=0))
    p = p * np.where(sign == 0, 1, sign)
    np.testing.assert_allclose(p, ours, atol=5e-5, err_msg="SVD projector differs beyond column signs")
    return p


def run_beside_plain_adam(tx: optax.GradientTransformation, grads: list, plain: tuple[str, ...]) -> tuple[list, Any]:
    """Run ``tx`` (jitted) over ``grads`` and check that the leaves ``plain`` move exactly as HF AdamW at full
    size; returns ``tx``'s updates of every step and its final state."""
    adam = scale_by_adam_hf()
    pick = lambda g: {k: g[k] for k in plain}
    st, st_adam = tx.init(grads[0]), adam.init(pick(grads[0]))
    update, update_adam = jax.jit(tx.update), jax.jit(adam.update)
    updates = []
    for g in grads:
        u, st = update(g, st)
        u_adam, st_adam = update_adam(pick(g), st_adam)
        for k in plain:
            np.testing.assert_allclose(u[k], u_adam[k], rtol=1e-6, atol=1e-8, err_msg=f"leaf {k}")
        updates.append(u)
    return updates, st


def assert_state_stable(tx: optax.GradientTransformation, shapes: dict) -> Any:
    """On bf16 params, an update keeps the state's structure, shapes and dtypes and returns bf16 updates."""
    params = {k: jax.ShapeDtypeStruct(s, jnp.bfloat16) for k, s in shapes.items()}
    state = jax.eval_shape(tx.init, params)
    updates, new_state = jax.eval_shape(tx.update, params, state)
    sig = lambda t: (jax.tree.structure(t), [(x.shape, x.dtype) for x in jax.tree.leaves(t)])
    assert sig(new_state) == sig(state)
    assert sig(updates) == sig(params)
    return state


def growing_gradient_norms(tx: optax.GradientTransformation, g: dict, norm_of: Callable, steps: int) -> list:
    """``norm_of(state)`` after each of ``steps`` updates with the gradient ``g`` grown 10x per step."""
    state, update, norms = tx.init(g), jax.jit(tx.update), []
    for k in range(steps):
        _, state = update(jax.tree.map(lambda x: x * 10.0**k, g), state)  # noqa: B023
        norms.append(float(norm_of(state)))
    return norms


def train_tiny(tmp_path: Any, overrides: list[str], state_type: type, steps: int = 7) -> tuple[Any, list]:
    """``steps`` train steps of the one-layer ``tiny`` model on one random batch; checks that the loss falls and
    returns the optimizer state of ``state_type`` found in the run's state, and the losses."""
    base = ["model.layers=1", "batch_size=2", "seq_len=32", "model.vocab_size=512", "optim.lr=3e-3",
            "optim.warmup_ratio=0", f"out_dir={tmp_path}"]  # fmt: skip
    trainer = make_trainer(load_config("tiny", [*base, *overrides]))
    state = trainer.init_state()
    batch = trainer.put_batch(np.random.default_rng(0).integers(0, 512, (2, 33)))
    losses = []
    for _ in range(steps):
        state, m = trainer.train_step(state, batch)
        losses.append(float(m["loss"]))
    assert np.all(np.isfinite(losses)) and losses[-1] < losses[0] - 0.5, losses
    assert int(state.skipped) == 0
    is_state = lambda x: isinstance(x, state_type)
    return next(x for x in jax.tree.leaves(state.opt_state, is_leaf=is_state) if is_state(x)), losses


# Flax (in, out) leaves the method tests share: in < out, in > out, square, rank > in, a stacked leaf;
# the bias stays plain Adam.
SHAPES = {"a": (6, 10), "b": (10, 6), "bias": (10,), "c": (7, 7), "small": (3, 8), "stack": (2, 5, 8)}
BF16_SHAPES = {"w": (6, 10), "stack": (3, 4, 7), "b": (10,)}  # bf16 state-stability runs
