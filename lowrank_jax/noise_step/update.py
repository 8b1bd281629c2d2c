"""The noise_step update: config, state, sparse perturbations, forward-mode directional derivatives, ternary step.

See :mod:`lowrank_jax.noise_step` for the algorithm, the reference and the memory model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from lowrank_jax.optim.checks import check_int

Params = dict[str, jax.Array]
# loss_fn(params, batch, perturb) -> scalar; every linear calls y = perturb(name, x, x @ params[name]).
Perturb = Callable[[str, jax.Array, jax.Array], jax.Array]
LossFn = Callable[[Params, Any, Perturb], jax.Array]


def no_perturb(name: str, x: jax.Array, y: jax.Array) -> jax.Array:
    """The hook for plain evaluation: returns ``y`` unchanged."""
    return y


@dataclass(frozen=True)
class NoiseStepConfig:
    """Hyperparameters of noise_step (validated on construction; errors name the field)."""

    num_perturbations: int = 128  # n
    chunk_size: int = 16  # perturbations evaluated together (vmap); must divide n
    densities: tuple[float, ...] = (6e-5, 1.5e-5, 3.7e-6)  # s per stage
    loss_thresholds: tuple[float, ...] = (2.0, 1.0)  # enter stage k+1 once loss < loss_thresholds[k]
    seed: int = 0  # init seed; perturbations use an independent stream of the same seed
    capacity: int = 0  # sparse slots per perturbation; 0: mean + 6σ + 8 at the largest density

    def __post_init__(self):
        n = check_int(self.num_perturbations, "num_perturbations", lo=2)
        c = check_int(self.chunk_size, "chunk_size", lo=1)
        if n % c:
            raise ValueError(f"chunk_size: must be a positive divisor of num_perturbations={n}, got {c!r}")
        d = tuple(self.densities)
        if not d or any(not (0.0 < float(x) <= 1.0) for x in d):
            raise ValueError(f"densities: need at least one density in (0, 1], got {self.densities!r}")
        t = tuple(self.loss_thresholds)
        if len(t) != len(d) - 1 or any(not math.isfinite(float(x)) for x in t):
            raise ValueError(f"loss_thresholds: need {len(d) - 1} finite values, got {self.loss_thresholds!r}")
        if any(b >= a for a, b in zip(t, t[1:], strict=False)):
            raise ValueError(f"loss_thresholds: must be strictly decreasing, got {self.loss_thresholds!r}")
        seed = check_int(self.seed, "seed", lo=0, hi=2**32 - 1)
        capacity = check_int(self.capacity, "capacity", lo=0)  # 0: automatic
        for name, value in (("num_perturbations", n), ("chunk_size", c), ("seed", seed), ("capacity", capacity)):
            object.__setattr__(self, name, value)  # Python ints (a NumPy integer would not serialise)
        object.__setattr__(self, "densities", tuple(float(x) for x in d))
        object.__setattr__(self, "loss_thresholds", tuple(float(x) for x in t))


@dataclass(frozen=True)
class Layout:
    """Where each kernel sits in the global flat index space ``[0, P)`` (names sorted)."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, int], ...]
    offsets: tuple[int, ...] = field(init=False)
    size: int = field(init=False)

    def __post_init__(self):
        offs, o = [], 0
        for s in self.shapes:
            offs.append(o)
            o += s[0] * s[1]
        object.__setattr__(self, "offsets", tuple(offs))
        object.__setattr__(self, "size", o)

    @classmethod
    def of(cls, params: Params) -> Layout:
        if not isinstance(params, dict) or not params:
            raise ValueError("params: expected a non-empty dict of 2-D (in, out) kernels")
        names = tuple(sorted(params))
        shapes = []
        for n in names:
            shp = tuple(params[n].shape)
            if len(shp) != 2:
                raise ValueError(f"params: kernel {n!r} must be 2-D (in, out), got shape {shp}")
            shapes.append(shp)
        return cls(names, tuple(shapes))


def capacity_for(cfg: NoiseStepConfig, size: int) -> int:
    """Sparse slots per perturbation: ``cfg.capacity`` or mean + 6σ + 8 of Binomial(P, max density)."""
    if cfg.capacity:
        return cfg.capacity
    mean = size * max(cfg.densities)
    return min(size, int(math.ceil(mean + 6.0 * math.sqrt(mean) + 8)))


class NoiseStepState(NamedTuple):
    count: jax.Array  # int32: steps taken
    params: Params  # kernels with values in {-1, 0, 1} (int8 storage, or float32/bf16 to skip the cast)
    stage: jax.Array  # int32: density stage used by the next step


def init_ternary(cfg: NoiseStepConfig, shapes: dict[str, tuple[int, int]]) -> Params:
    """Initial weights ~ U{−1, 0, 1} from ``cfg.seed`` (kernel k of the sorted names uses fold_in k)."""
    base = jax.random.fold_in(jax.random.key(cfg.seed), 0)
    return {
        n: jax.random.randint(jax.random.fold_in(base, i), tuple(shapes[n]), -1, 2, jnp.int32).astype(jnp.int8)
        for i, n in enumerate(sorted(shapes))
    }


def init_state(cfg: NoiseStepConfig, params: Params) -> NoiseStepState:
    """State at step 0 for int8 ternary ``params`` (e.g. from :func:`init_ternary`)."""
    Layout.of(params)
    for n, w in params.items():
        if w.dtype not in (jnp.int8, jnp.float32, jnp.bfloat16):
            raise ValueError(
                f"params: kernel {n!r} must hold ternary values as int8, float32 or bfloat16, got {w.dtype}"
            )
    return NoiseStepState(jnp.zeros((), jnp.int32), dict(params), jnp.zeros((), jnp.int32))


def perturbations(
    cfg: NoiseStepConfig, layout: Layout, step: jax.Array, stage: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """The step's n sparse perturbations ``(pos (n, cap) int32, val (n, cap) int8)`` from (seed, step, i).

    Unused slots have ``val = 0`` (and ``pos = 0``); used positions within a perturbation are distinct.
    """
    cap = capacity_for(cfg, layout.size)
    densities = jnp.asarray(cfg.densities, jnp.float32)
    s = densities[stage]
    base = jax.random.fold_in(jax.random.fold_in(jax.random.key(cfg.seed), 1), step)

    def one(i):
        kc, kp, ks = jax.random.split(jax.random.fold_in(base, i), 3)
        count = jax.random.binomial(kc, float(layout.size), s).astype(jnp.int32)
        pos = jax.random.randint(kp, (cap,), 0, layout.size, jnp.int32)
        sign = jnp.where(jax.random.bernoulli(ks, 0.5, (cap,)), 1, -1).astype(jnp.int8)
        pos = jnp.sort(jnp.where(jnp.arange(cap) < count, pos, layout.size))  # unused slots last
        first = jnp.concatenate([jnp.ones((1,), bool), pos[1:] != pos[:-1]])
        used = first & (pos < layout.size)
        return jnp.where(used, pos, 0), jnp.where(used, sign, 0).astype(jnp.int8)

    return jax.vmap(one)(jnp.arange(cfg.num_perturbations))


def _entries(layout: Layout, pos: jax.Array, val: jax.Array, k: int):
    """Rows, columns and values of a perturbation's slots that fall into kernel ``k`` (others: value 0)."""
    off, (_, n_out) = layout.offsets[k], layout.shapes[k]
    local = pos - off
    inside = (local >= 0) & (local < layout.shapes[k][0] * n_out) & (val != 0)
    rows = jnp.where(inside, local // n_out, 0)
    cols = jnp.where(inside, local % n_out, 0)
    return rows, cols, jnp.where(inside, val, 0)


def _sparse_apply(x: jax.Array, rows: jax.Array, cols: jax.Array, vals: jax.Array, n_out: int) -> jax.Array:
    """``x @ ν`` for a sparse ν given by (rows, cols, vals): gather ≤ cap columns, scatter-add into n_out."""
    contrib = x[..., rows] * vals.astype(x.dtype)
    return jnp.zeros((*x.shape[:-1], n_out), x.dtype).at[..., cols].add(contrib)


@jax.custom_jvp
def _inject(y, x, t, rows, cols, vals):
    """``y + t · (x ν)``, used at ``t = 0`` only: the primal is ``y``, the t-tangent is ``x ν``."""
    return y + t * _sparse_apply(x, rows, cols, vals, y.shape[-1])


@_inject.defjvp
def _inject_jvp(primals, tangents):
    y, x, t, rows, cols, vals = primals
    dy, _, dt = tangents[:3]
    # At t = 0: ∂/∂y = I, ∂/∂t = x ν, and ∂/∂x = t ν = 0; the primal is y (shared by the whole chunk).
    contrib = (x[..., rows] * vals.astype(x.dtype) * dt).astype(dy.dtype)
    return y, dy.at[..., cols].add(contrib)


def directional_derivatives(
    loss_fn: LossFn,
    params: Params,
    batch: Any,
    pos: jax.Array,
    val: jax.Array,
    *,
    chunk_size: int,
    layout: Layout | None = None,
) -> tuple[jax.Array, jax.Array]:
    """``(loss, α)`` with ``α_i = ∇L(params)·ν_i`` for the sparse perturbations (pos, val) ``(n, cap)``.

    Forward mode only: ``jax.jvp`` along a scalar ε that scales each sparse ν_i inside
    :func:`_inject`; ``chunk_size`` perturbations share one primal forward (vmap), chunks run
    sequentially (``lax.map``). ``params`` may be any float or int dtype the loss accepts.
    """
    layout = layout or Layout.of(params)
    n = pos.shape[0]
    if n % chunk_size:
        raise ValueError(f"chunk_size: {chunk_size} does not divide the {n} perturbations")
    index = {name: k for k, name in enumerate(layout.names)}

    def one(p, v):
        entries = {name: _entries(layout, p, v, k) for name, k in index.items()}

        def f(t):
            def perturb(name, x, y):
                rows, cols, vals = entries[name]
                return _inject(y, x, t, rows, cols, vals)

            return loss_fn(params, batch, perturb)

        return jax.jvp(f, (jnp.zeros((), jnp.float32),), (jnp.ones((), jnp.float32),))

    def chunk(pv):
        losses, alphas = jax.vmap(one)(*pv)
        return losses[0], alphas

    shape = (n // chunk_size, chunk_size, pos.shape[1])
    losses, alphas = jax.lax.map(chunk, (pos.reshape(shape), val.reshape(shape)))
    return losses[0], alphas.reshape(n)


def median_threshold(alpha: jax.Array) -> jax.Array:
    """``α_τ = sgn(α) · 1[|α| ≥ median |α|]`` as int8 terns."""
    a = jnp.abs(alpha)
    return (jnp.sign(alpha) * (a >= jnp.median(a))).astype(jnp.int8)


def ternarize(z: jax.Array) -> jax.Array:
    """T: ≤ −1/3 → −1, ≥ 1/3 → +1, else 0."""
    return jnp.where(z >= 1 / 3, 1, jnp.where(z <= -1 / 3, -1, 0)).astype(jnp.int8)


def apply_update(params: Params, layout: Layout, pos: jax.Array, val: jax.Array, terns: jax.Array) -> Params:
    """Alias of :func:`apply_update_counted` without the count of changed weights."""
    return apply_update_counted(params, layout, pos, val, terns)[0]


def apply_update_counted(
    params: Params, layout: Layout, pos: jax.Array, val: jax.Array, terns: jax.Array
) -> tuple[Params, jax.Array]:
    """``θ ← T(θ − T(ĝ))`` with ``ĝ = Σ_i ν_i α_τ,i``, touching only coordinates where ĝ ≠ 0.

    ``ĝ`` is formed sparsely: the n·cap contributions ``ν_i α_τ,i`` are sorted by position and
    summed per position (segment sum), so no P-sized buffer is created. Also returns how many
    weights changed (counted on the touched positions, so the old weights need not be kept).
    """
    flat_pos = pos.reshape(-1)
    contrib = (val.astype(jnp.int32) * terns.astype(jnp.int32)[:, None]).reshape(-1)
    order = jnp.argsort(flat_pos)
    ps, cs = flat_pos[order], contrib[order]
    m = ps.shape[0]
    first = jnp.concatenate([jnp.ones((1,), bool), ps[1:] != ps[:-1]])
    seg = jnp.cumsum(first.astype(jnp.int32)) - 1
    g = jax.ops.segment_sum(cs, seg, num_segments=m)  # ĝ at each distinct position
    seg_pos = jax.ops.segment_max(ps, seg, num_segments=m)
    live = (jnp.arange(m) < seg[-1] + 1) & (g != 0)
    step = ternarize(g.astype(jnp.float32)).astype(jnp.int32)  # T(ĝ) = sgn(ĝ) for integer ĝ
    out, flips = {}, jnp.zeros((), jnp.int32)
    for k, name in enumerate(layout.names):
        w = params[name]
        size = w.size
        local = seg_pos - layout.offsets[k]
        hit = live & (local >= 0) & (local < size)
        idx = jnp.where(hit, local, size)  # out of range: dropped
        flat = w.reshape(-1)
        old = flat.astype(jnp.int32)[jnp.where(hit, local, 0)]
        new = ternarize((old - step).astype(jnp.float32))
        flips = flips + jnp.sum(hit & (new != old))
        out[name] = flat.at[idx].set(new.astype(w.dtype), mode="drop").reshape(w.shape)
    return out, flips


def next_stage(cfg: NoiseStepConfig, stage: jax.Array, loss: jax.Array) -> jax.Array:
    """The density stage after seeing ``loss``: the deepest threshold crossed, never going back."""
    crossed = jnp.sum(loss < jnp.asarray(cfg.loss_thresholds, jnp.float32)) if cfg.loss_thresholds else 0
    return jnp.maximum(stage, jnp.asarray(crossed, jnp.int32))


def noise_step_update(
    cfg: NoiseStepConfig, loss_fn: LossFn, state: NoiseStepState, batch: Any
) -> tuple[NoiseStepState, jax.Array, dict[str, jax.Array]]:
    """One noise_step on ``batch``: ``(new_state, terns (n,) int8, metrics)``. Jit it with the state donated.

    ``terns`` (and the stage in ``metrics['stage']``) are what a seed checkpoint records.
    """
    layout = Layout.of(state.params)
    pos, val = perturbations(cfg, layout, state.count, state.stage)
    loss, alpha = directional_derivatives(
        loss_fn, state.params, batch, pos, val, chunk_size=cfg.chunk_size, layout=layout
    )
    terns = median_threshold(alpha)
    params, flips = apply_update_counted(state.params, layout, pos, val, terns)
    metrics = {
        "loss": loss,
        "stage": state.stage,
        "density": jnp.asarray(cfg.densities, jnp.float32)[state.stage],
        "flips": flips,
        "nnz_per_perturbation": jnp.mean(jnp.sum(val != 0, axis=1).astype(jnp.float32)),
    }
    new = NoiseStepState(state.count + 1, params, next_stage(cfg, state.stage, loss))
    return new, terns, metrics
