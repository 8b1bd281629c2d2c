"""GoLore (scale_by_galore(projector='random')) against an independent float64 NumPy port of the official rule.

The reference follows pkumelon/Golore in PyTorch orientation (weights ``(out, in)``): GaLore's ``std`` side rule
and SVD projector while ``step < rand_epoch``, then a random projector ``Z (ZᵀZ)^(-1/2)`` with ``Z ~ N(0, 1)``
(projector.py, ``get_random_orthogonal_matrix``, computed as written there: through the SVD of ``ZᵀZ``); on every
refresh the first moment is rotated into the new basis and the second kept (GoLore.py ``merge_and_reinit``);
HF-style AdamW with the back-projection times ``scale``. The random ``Z`` are regenerated with ``jax.random`` from
the documented key derivation ``fold_in(fold_in(fold_in(key(seed), t), matrix), side)``; fresh SVD projectors
are sign-aligned to ours (checked equal up to column signs first), as in test_galore_reference.py.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_helpers import (
    BF16_SHAPES,
    Port,
    adam_moments,
    align_signs,
    assert_state_stable,
    matrices,
    max_rel_error,
    random_tree,
    run_beside_plain_adam,
    train_tiny,
    trajectory,
)

from lowrank_jax.optim import GaLoreState, scale_by_galore
from lowrank_jax.optim.projection import random_orthonormal

# Flax (in, out): in < out, in > out, square, a stacked leaf (2 layers of 5 × 8); a bias stays plain Adam.
SHAPES = {"a": (6, 10), "b": (10, 6), "bias": (10,), "c": (7, 7), "stack": (2, 5, 8)}
RANK, T, STEPS, SWITCH, LR, SCALE, SEED = 3, 3, 12, 6, 0.02, 1.0, 5


def _z(seed: int, t: int, matrix: int, side: int, shape: tuple[int, int]) -> np.ndarray:
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(jax.random.key(seed), t), matrix), side)
    return np.asarray(jax.random.normal(key, shape, jnp.float32), np.float64)


def _polar_official(z: np.ndarray) -> np.ndarray:
    """projector.py: ``U, S, Vh = svd(Zᵀ Z); Z @ U @ diag(1/sqrt(S)) @ Vh``."""
    u, s, vh = np.linalg.svd(z.T @ z)
    return z @ u @ np.diag(1 / np.sqrt(s)) @ vh


class RefGoLore(Port):
    """golore_torch AdamW + GoLore's moment rule, float64, PyTorch orientation, one entry per weight matrix."""

    def __init__(self, params: dict, *, rotate_first: bool = True, orthonormal: bool = True) -> None:
        super().__init__(params, LR)
        self.rotate_first, self.orthonormal = rotate_first, orthonormal
        self.proj: dict[str, Any] = dict.fromkeys(self.w)

    @staticmethod
    def side(g: np.ndarray) -> str:
        return "right" if g.shape[0] >= g.shape[1] else "left"  # std: m >= n -> right (r × n)

    def fresh(self, key: str, g: np.ndarray, matrix: int, ours: np.ndarray) -> np.ndarray:
        side = self.side(g)
        if self.t >= SWITCH:  # golore_torch/adamw.py: rand = state["step"] >= group["rand_epoch"]
            dim = g.shape[1] if side == "right" else g.shape[0]
            z = _z(SEED, self.t, matrix, 0 if side == "right" else 1, (dim, RANK))
            p = _polar_official(z) if self.orthonormal else z / np.sqrt(RANK)
            np.testing.assert_allclose(p, ours, atol=1e-5, err_msg="random projector differs from the port")
        else:
            u, _, vh = np.linalg.svd(g, full_matrices=False)
            p = align_signs(vh[:RANK].T if side == "right" else u[:, :RANK], ours)  # (dim, r) either way
        return p

    def matrix_step(self, key: str, g: np.ndarray, c: float, ours_proj: dict) -> np.ndarray:
        right = self.side(g) == "right"
        if self.t % T == 0:
            new = self.fresh(key, g, _MATRIX[key], ours_proj[key])
            old = self.proj[key]
            if old is not None and self.rotate_first:  # GoLore.py: exp_avg rotated, exp_avg_sq kept
                self.m[key] = self.m[key] @ old.T @ new if right else new.T @ (old @ self.m[key])
            self.proj[key] = new
        p = self.proj[key]
        low = g @ p if right else p.T @ g
        self.m[key], self.v[key], n = adam_moments(self.m[key], self.v[key], low)
        return LR * c * SCALE * (n @ p.T if right else p @ n)


# global matrix index of each projected matrix (leaves in flatten order: a, b, bias (not projected), c, stack)
_MATRIX = {"a": 0, "b": 1, "c": 2, "stack0": 3, "stack1": 4}


def projectors(st: GaLoreState) -> dict:
    """Our projector of each matrix, ``(dim, r)``: the input side for in <= out (torch right), else the output."""
    return {**matrices(dict(st.proj_in), torch=False), **matrices(dict(st.proj_out), torch=False)}


def _golore(**kw: Any) -> optax.GradientTransformation:
    opts = dict(update_proj_gap=T, scale=SCALE, projector="random", random_from=SWITCH, seed=SEED)
    return scale_by_galore(RANK, moments="reproject_first", **{**opts, **kw})


def _run(tx: optax.GradientTransformation, params: dict, grads: list) -> tuple[list, list]:
    return trajectory(tx, params, grads, LR, probe=projectors)


@pytest.fixture(scope="module")
def run() -> tuple[dict, list, list, list]:
    rng = np.random.default_rng(0)
    params, grads = random_tree(rng, SHAPES), [random_tree(rng, SHAPES) for _ in range(STEPS)]
    traj, projs = _run(_golore(), params, grads)
    return params, grads, traj, projs


def test_matches_the_official_rule_over_svd_and_random_refreshes(run) -> None:
    params, grads, traj, projs = run  # refreshes at 0, 3 (SVD), 6, 9 (random)
    err = max_rel_error(traj, RefGoLore(params), grads, projs)
    assert err < 2e-5, f"max relative error {err:.2e}"


@pytest.mark.parametrize("broken", [dict(rotate_first=False), dict(orthonormal=False)])
def test_a_broken_rule_is_caught(run, broken: dict) -> None:
    """The comparison is sensitive: without GoLore's first-moment rotation, or with a Gaussian instead of an
    orthonormal projector, the port no longer agrees."""
    params, grads, traj, projs = run
    if "orthonormal" in broken:
        with pytest.raises(AssertionError, match="random projector differs"):
            max_rel_error(traj, RefGoLore(params, **broken), grads, projs)
    else:
        assert max_rel_error(traj, RefGoLore(params, **broken), grads, projs) > 1e-3


def test_random_projector_is_orthonormal_and_seeded() -> None:
    key = jax.random.key(3)
    p = np.asarray(random_orthonormal(key, 40, 6), np.float64)
    np.testing.assert_allclose(p.T @ p, np.eye(6), atol=1e-5)
    np.testing.assert_array_equal(p, np.asarray(random_orthonormal(jax.random.key(3), 40, 6)))
    assert not np.allclose(p, np.asarray(random_orthonormal(jax.random.key(4), 40, 6)), atol=1e-2)
    z = np.asarray(jax.random.normal(key, (40, 6), jnp.float32), np.float64)
    np.testing.assert_allclose(p, _polar_official(z), atol=1e-5)
    # uniform on the Stiefel manifold: E[P Pᵀ] = (r / dim) I
    mean = np.mean([np.asarray(random_orthonormal(k, 12, 3)) @ np.asarray(random_orthonormal(k, 12, 3)).T
                    for k in jax.random.split(jax.random.key(0), 400)], axis=0)  # fmt: skip
    np.testing.assert_allclose(mean, np.eye(12) * 3 / 12, atol=0.04)


def test_switch_step_svd_before_random_after_and_seed_determinism(run) -> None:
    params, grads, _, projs = run
    g0 = np.asarray(grads[0]["a"], np.float64)  # (6, 10): std projects the input side, P = top left singular vectors
    u = np.linalg.svd(g0, full_matrices=False)[0][:, :RANK]
    np.testing.assert_allclose(np.abs(projs[0]["a"]), np.abs(u), atol=5e-5)
    for t in (6, 9):  # random refreshes: orthonormal, not the gradient's singular vectors
        p = projs[t]["a"]
        np.testing.assert_allclose(p.T @ p, np.eye(RANK), atol=1e-5)
        u_t = np.linalg.svd(np.asarray(grads[t]["a"], np.float64), full_matrices=False)[0][:, :RANK]
        assert np.linalg.norm(u_t.T @ p) < 0.95 * np.sqrt(RANK)
    np.testing.assert_array_equal(projs[7]["a"], projs[6]["a"])  # kept between refreshes
    again = _run(_golore(), params, grads[:7])[1]
    np.testing.assert_array_equal(again[6]["a"], projs[6]["a"])
    other = _run(_golore(seed=SEED + 1), params, grads[:7])[1]
    assert not np.allclose(other[6]["a"], projs[6]["a"], atol=1e-2)
    np.testing.assert_array_equal(other[3]["a"], projs[3]["a"])  # the seed does not touch the SVD phase


def test_mask_leaves_other_leaves_plain_adam() -> None:
    rng = np.random.default_rng(1)
    grads = [random_tree(rng, {"w": (6, 10), "v": (8, 5), "b": (10,)}) for _ in range(4)]
    mask = {"w": True, "v": False, "b": False}
    _, st = run_beside_plain_adam(
        scale_by_galore(2, update_proj_gap=2, projector="random", mask=mask), grads, ("v", "b")
    )
    assert isinstance(st.proj_in["v"], optax.MaskedNode) and st.inner_state.mu["v"].shape == (8, 5)
    assert st.inner_state.mu["w"].shape == (2, 10) and int(st.svd_failures) == 0


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(projector="qr"), "projector"),
        (dict(projector="random", random_from=-1), "random_from"),
        (dict(projector="random", random_from=2.5), "random_from"),
        (dict(random_from=4), "random_from"),  # with the default projector='svd'
        (dict(moments="rotate_first"), "moments"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}: "):
        scale_by_galore(2, **kwargs)


def test_golore_trains_through_the_trainer(tmp_path) -> None:
    golore = ["galore.projector=random", "galore.random_from=3", "galore.moments=reproject_first"]
    overrides = ["optim.name=galore_adamw", "galore.rank=8", "galore.update_proj_gap=3", *golore]
    gs, _ = train_tiny(tmp_path, overrides, GaLoreState)  # 7 steps: SVD at 0, random at 3 and 6
    q = np.asarray(gs.proj_in["blocks"]["attn"]["q"]["kernel"], np.float64)
    assert q.shape == (1, 128, 8) and int(gs.last_refresh["blocks"]["attn"]["q"]["kernel"][0]) == 6
    np.testing.assert_allclose(q[0].T @ q[0], np.eye(8), atol=1e-5)


def test_update_keeps_state_structure_shapes_and_dtypes_in_bf16() -> None:
    tx = scale_by_galore(3, update_proj_gap=2, projector="random", random_from=2, moments="reproject_first")
    st = assert_state_stable(tx, BF16_SHAPES)
    assert st.proj_in["w"].dtype == jnp.bfloat16
