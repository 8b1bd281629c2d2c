"""noise_step: training pure ternary weights from forward-mode directional derivatives, no gradient memory.

Will Brickner, "noise_step: Training in 1.58b With No Gradient Memory", preprint, December 2024
(no arXiv id: the author reports arXiv declined it; distributed as a PDF on GitHub; paper only, no
code). It builds on Baydin et al., "Gradients without Backpropagation", arXiv 2202.08587. The
weights θ ∈ {−1, 0, 1}^P carry no scale. One step on a batch:

    ν_i ~ Bernoulli(s) ⊙ U{−1, +1}                  i = 1..n, regenerated from (seed, step, i)
    α_i = J·ν_i = d/dε L(θ + ε ν_i)|ε=0              forward mode (jax.jvp), no backward pass
    α_τ,i = sgn(α_i) · 1[|α_i| ≥ median_j |α_j|]     one tern per perturbation
    ĝ = Σ_i ν_i α_τ,i ;   θ ← T(θ − T(ĝ))            T: ≤ −1/3 → −1, ≥ 1/3 → +1, else 0

J is the Jacobian of the batch-mean loss with respect to the weights read as real numbers, so α_i is
the directional derivative along ν_i (what reverse mode would give as ∇L·ν_i, here without ever
forming ∇L). No learning rate, no momentum, no optimizer state. The density s follows the loss: by
default 6e-5, then 1.5e-5 once the loss falls below 2, then 3.7e-6 below 1 (the paper's MNIST
schedule; ``densities`` / ``loss_thresholds``); the stage never goes back.

A model is its init seed plus the per-step terns α_τ (log2 3 bits each, packed 5 per byte by
:func:`pack_terns`) and the steps at which the density stage changed: :func:`replay` regenerates
every ν_i and re-applies every update, reconstructing the weights bit-exactly (integer arithmetic
only) without data or forward passes.

Implementation and memory model
-------------------------------
* Weights are a dict of int8 kernels ``(in, out)`` used as ``y = x @ W``. A perturbation is stored
  sparsely: ``capacity`` slots of (global flat position, value ±1 or 0 for unused). The number of
  non-zeros is drawn ~ Binomial(P, s), positions uniformly; a position drawn twice is kept once
  (probability ≈ k²/2P per perturbation, e.g. 6e-4 at k = 20, P = 3.3e5), so ν matches
  Bernoulli(s) ⊙ U{±1} up to these rare collisions. Counts beyond ``capacity`` (> 6σ) are cut.
* The loss is written against a hook ``perturb(name, x, y)`` that each linear calls on its output:
  under the jvp the hook adds the tangent ``x ν_name`` computed as a gather of the ≤ capacity
  touched input columns and a scatter-add into the output columns; its primal is ``y`` (the
  perturbation enters at ε = 0 only). So the tangent of the weights is never materialised: no
  P-sized float buffer exists, only the int8 weights themselves.
* Perturbations are evaluated ``chunk_size`` at a time with ``vmap`` (``lax.map`` over chunks):
  the primal forward is computed once per chunk and shared; each perturbation in the chunk carries
  its own tangent activations. Live memory ≈ primal activations of one layer + chunk_size × tangent
  activations of one layer (forward mode keeps nothing for a backward pass) + O(n·capacity) indices,
  versus backprop's stored activations of all layers + a P-sized gradient (+ optimizer moments).
* The update sorts the n·capacity touched positions, sums duplicates per position and scatters
  the new ternary values: O(n·capacity) memory again, in place on the donated weights.
* Measured (XLA memory_analysis, experiments/results/noise_step_mnist/table.md): the tangent
  activations make memory grow with chunk_size × batch, so forward mode wins over backprop + Adam
  only while chunk_size·batch·width is small next to the weights (LLM-like shapes; see the test
  with wide layers and batch 8) or with small chunks (MNIST MLP, batch 256: peak 4.9 MiB at
  chunk 1 vs 8.4 MiB for Adam+STE, but 18.9 MiB at chunk 16). With int8 storage XLA on CPU also
  materialises a float32 copy of each kernel for the dot (hoisted out of the chunk loop).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

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
        n, c = self.num_perturbations, self.chunk_size
        if isinstance(n, bool) or not isinstance(n, int) or n < 2:
            raise ValueError(f"num_perturbations: must be an integer >= 2, got {n!r}")
        if isinstance(c, bool) or not isinstance(c, int) or c < 1 or n % c:
            raise ValueError(f"chunk_size: must be a positive divisor of num_perturbations={n}, got {c!r}")
        d = tuple(self.densities)
        if not d or any(not (0.0 < float(x) <= 1.0) for x in d):
            raise ValueError(f"densities: need at least one density in (0, 1], got {self.densities!r}")
        t = tuple(self.loss_thresholds)
        if len(t) != len(d) - 1 or any(not math.isfinite(float(x)) for x in t):
            raise ValueError(f"loss_thresholds: need {len(d) - 1} finite values, got {self.loss_thresholds!r}")
        if any(b >= a for a, b in zip(t, t[1:], strict=False)):
            raise ValueError(f"loss_thresholds: must be strictly decreasing, got {self.loss_thresholds!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**32:
            raise ValueError(f"seed: must be an integer in [0, 2**32), got {self.seed!r}")
        if isinstance(self.capacity, bool) or not isinstance(self.capacity, int) or self.capacity < 0:
            raise ValueError(f"capacity: must be an integer >= 0 (0: automatic), got {self.capacity!r}")
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


# ----------------------------------------------------------------------------------------------
# Seed-only checkpoints


def pack_terns(terns: np.ndarray) -> np.ndarray:
    """Pack terns in {−1, 0, 1} five per byte (base 3, 3⁵ = 243 ≤ 256) along the last axis."""
    t = np.asarray(terns)
    if t.size and (t.min() < -1 or t.max() > 1):
        raise ValueError("terns: values must be in {-1, 0, 1}")
    n = t.shape[-1]
    pad = (-n) % 5
    d = np.pad(t.astype(np.int64) + 1, [(0, 0)] * (t.ndim - 1) + [(0, pad)], constant_values=1)
    d = d.reshape(*t.shape[:-1], -1, 5)
    return (d * (3 ** np.arange(5))).sum(-1).astype(np.uint8)


def unpack_terns(packed: np.ndarray, n: int) -> np.ndarray:
    """Inverse of :func:`pack_terns`: the first ``n`` terns (int8) of each row."""
    p = np.asarray(packed)
    if p.dtype != np.uint8:
        raise ValueError(f"packed: expected uint8, got {p.dtype}")
    if p.size and p.max() > 242:
        raise ValueError("packed: bytes above 242 are not 5-tern codes")
    if n < 0 or n > 5 * p.shape[-1]:
        raise ValueError(f"n: {n} terns do not fit {p.shape[-1]} bytes")
    d = (p[..., None].astype(np.int64) // (3 ** np.arange(5))) % 3
    return (d.reshape(*p.shape[:-1], -1)[..., :n] - 1).astype(np.int8)


@dataclass(frozen=True)
class SeedCheckpoint:
    """A whole noise_step model: config (seed included), kernel shapes, per-step terns and stage changes."""

    cfg: NoiseStepConfig
    shapes: tuple[tuple[str, tuple[int, int]], ...]
    terns_packed: np.ndarray  # (steps, ceil(n/5)) uint8
    stage_starts: tuple[int, ...]  # step at which stage k began (stage 0 at 0); len ≤ len(densities)

    @property
    def steps(self) -> int:
        return int(self.terns_packed.shape[0])

    def stages(self) -> np.ndarray:
        """The density stage of every step."""
        s = np.zeros(self.steps, np.int32)
        for k, start in enumerate(self.stage_starts[1:], 1):
            s[start:] = k
        return s

    def to_bytes(self) -> bytes:
        """``header length (u32) | JSON header | packed terns``."""
        import json  # noqa: PLC0415

        c = self.cfg
        header = json.dumps(
            {
                "n": c.num_perturbations,
                "chunk": c.chunk_size,
                "densities": c.densities,
                "thresholds": c.loss_thresholds,
                "seed": c.seed,
                "capacity": c.capacity,
                "shapes": [[n, list(s)] for n, s in self.shapes],
                "steps": self.steps,
                "stage_starts": list(self.stage_starts),
            },
            separators=(",", ":"),
        ).encode()
        return struct.pack("<I", len(header)) + header + np.ascontiguousarray(self.terns_packed).tobytes()

    @classmethod
    def from_bytes(cls, data: bytes) -> SeedCheckpoint:
        import json  # noqa: PLC0415

        (hlen,) = struct.unpack("<I", data[:4])
        h = json.loads(data[4 : 4 + hlen])
        cfg = NoiseStepConfig(
            num_perturbations=h["n"],
            chunk_size=h["chunk"],
            densities=tuple(h["densities"]),
            loss_thresholds=tuple(h["thresholds"]),
            seed=h["seed"],
            capacity=h["capacity"],
        )
        width = -(-cfg.num_perturbations // 5)
        terns = np.frombuffer(data[4 + hlen :], np.uint8).reshape(h["steps"], width)
        shapes = tuple((n, tuple(s)) for n, s in h["shapes"])
        return cls(cfg, shapes, terns.copy(), tuple(h["stage_starts"]))


def make_checkpoint(cfg: NoiseStepConfig, params: Params, terns: np.ndarray, stages: np.ndarray) -> SeedCheckpoint:
    """A :class:`SeedCheckpoint` from a run's logged terns ``(steps, n)`` and per-step stages ``(steps,)``."""
    t, s = np.asarray(terns), np.asarray(stages)
    if t.ndim != 2 or t.shape[1] != cfg.num_perturbations:
        raise ValueError(f"terns: expected (steps, {cfg.num_perturbations}), got {t.shape}")
    if s.shape != (t.shape[0],) or (s.size and (np.any(np.diff(s) < 0) or s[0] != 0)):
        raise ValueError("stages: expected one non-decreasing stage per step, starting at 0")
    starts = [0] + [int(np.argmax(s >= k)) for k in range(1, int(s.max(initial=0)) + 1)]
    shapes = tuple((n, tuple(int(d) for d in params[n].shape)) for n in sorted(params))
    return SeedCheckpoint(cfg, shapes, pack_terns(t), tuple(starts))


def replay(ckpt: SeedCheckpoint) -> Params:
    """Reconstruct the trained weights from a seed checkpoint (bit-exact; no data, no forward pass)."""
    cfg = ckpt.cfg
    shapes = dict(ckpt.shapes)
    params = init_ternary(cfg, shapes)
    layout = Layout.of(params)
    terns = jnp.asarray(unpack_terns(ckpt.terns_packed, cfg.num_perturbations))
    stages = jnp.asarray(ckpt.stages())

    def body(p, xs):
        step, t, stage = xs
        pos, val = perturbations(cfg, layout, step, stage)
        return apply_update(p, layout, pos, val, t), None

    run = jax.jit(lambda p: jax.lax.scan(body, p, (jnp.arange(ckpt.steps, dtype=jnp.int32), terns, stages))[0])
    return run(params)


def checkpoint_sizes(ckpt: SeedCheckpoint) -> dict[str, int]:
    """Bytes of the seed checkpoint vs the same weights stored dense at 2 bits and in float32."""
    p = sum(a * b for _, (a, b) in ckpt.shapes)
    return {
        "params": p,
        "seed_checkpoint_bytes": len(ckpt.to_bytes()),
        "dense_ternary_2bit_bytes": -(-p // 4),
        "float32_bytes": 4 * p,
    }
