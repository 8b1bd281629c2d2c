"""8-bit Adam: Adam whose moments are stored block-wise quantized to 8 bits.

Reference: Tim Dettmers, Mike Lewis, Sam Shleifer, Luke Zettlemoyer, "8-bit Optimizers via
Block-wise Quantization", ICLR 2022, arXiv 2110.02861.

Algorithm, per step t and per leaf with gradient g (all arithmetic in float32)::

    m, v  ← dequantize(state.mu), dequantize(state.nu)
    m     ← b1·m + (1 − b1)·g
    v     ← b2·v + (1 − b2)·g²
    u     ← m̂ / (√v̂ + ε),  m̂ = m / (1 − b1ᵗ),  v̂ = v / (1 − b2ᵗ)      eps_placement='optax'
    u     ← m / (√v + ε) · √(1 − b2ᵗ) / (1 − b1ᵗ)                       eps_placement='hf'
    state ← quantize(m, signed), quantize(v, unsigned)

The direction ``u`` is computed from the freshly updated float32 moments; only what is carried to
the next step is quantized. ``'optax'`` matches ``optax.scale_by_adam``; ``'hf'`` is the
HuggingFace / galore-torch AdamW form (ε is effectively scaled by √(1 − b2ᵗ)).

Block-wise quantization: a moment leaf is flattened, zero-padded to a multiple of ``block_size``
and split into blocks of ``block_size`` values. Each block keeps one float32 scale, its absmax
``a``, and one 8-bit code per value: the index of the entry of a fixed quantization map ``Q``
(values in [−1, 1]) nearest to ``x / a`` (a search over the midpoints of the sorted map).
Dequantization is ``Q[code]·a``. Outliers only affect their own block, and the absmax element is
represented exactly (±1 is in both maps).

Quantization maps (dynamic tree quantization, Section 2 of the paper), built in NumPy at import:
a code reads, after an optional sign bit, ``e`` leading zero bits (the decimal exponent), then an
indicator bit 1, then ``f`` linear fraction bits. Its magnitude is
``10^(−e) · (0.1 + 0.9·k / 2^f)`` for ``k = 1 … 2^f``, so decade ``e`` tiles ``(10^(−e−1), 10^(−e)]``
with ``2^f`` evenly spaced levels whose top is exactly ``10^(−e)``; the all-zero pattern is 0.
Large magnitudes get many fraction bits, small ones a wide exponent range.

* Signed map (first moment, int8 codes): 1 sign bit + 7 bits → decades e = 0…6 with f = 6 − e
  fraction bits: 64 + 32 + … + 1 = 127 magnitudes per sign, plus 0. +0 and −0 coincide, so the
  map has 255 distinct sorted values; code ``c ∈ [−127, 127]`` means ``Q_s[c + 127]`` (code 0 is 0,
  ``−c`` is the negation of ``c``; int8 −128 is never produced). Smallest non-zero magnitude 1e-6.
* Unsigned map (second moment, uint8 codes): the second moment is non-negative, so the sign bit
  becomes a further tree bit: decades e = 0…7 with f = 7 − e fraction bits, 255 magnitudes plus
  0 = 256 values, code = index. Smallest non-zero magnitude 1e-7 (relative to the block absmax).

Worst-case rounding error relative to the block absmax is half the top decade's spacing:
0.9/2^7 ≈ 7.0e-3 (signed) and 0.9/2^8 ≈ 3.5e-3 (unsigned); values below half the smallest
level (5e-7 signed, 5e-8 unsigned, relative) round to 0. A linear absmax int8 code (127 levels)
would flush every value below 1/254 ≈ 3.9e-3 of the absmax to 0, which for a second moment —
the square of gradients spanning a few decades — is most of the block.

Small leaves: like bitsandbytes (``min_8bit_size=4096``), leaves with fewer than ``min_size``
elements keep plain float32 moments; quantizing them saves little and biases, norms and scalars
are the most sensitive to error. Elements whose second moment is below 5e-8 of their block's
absmax while their first moment is not are stepped with √v from the current gradient only; this
is inherent to the method (use smaller blocks if it matters).

State: ``ScaleByAdam8bitState(count, mu, nu)``; ``mu``/``nu`` mirror the updates and their leaves
are float32 arrays (small leaves) or :class:`QuantizedArray` pytree nodes whose children are the
``codes`` (..., block_size) and ``scales`` (...) arrays and whose static metadata
holds the original shape, dtype and signedness; so the state flattens to arrays only (orbax, jit,
``eval_shape``) and each moment's shape is known statically. Memory for an n-element quantized
leaf: 2·⌈n/B⌉·B bytes of codes + 8·⌈n/B⌉ bytes of scales (≈ 2.03 bytes/param at B = 256) vs
8 bytes/param for float32 Adam. :func:`get_moments` / :func:`set_moments` expose the moments as
float32 trees (used by GaLore to re-project them); the update needs no params, so the transform
can be GaLore's ``inner``.

Error vs fp32 Adam (tests/optim/test_adam_8bit.py, CPU, block_size 256, defaults otherwise):
* Step 1 is exact (moments start at 0 and the direction uses unquantized moments); a NumPy
  float64 re-implementation of the quantized algorithm agrees to ~1e-7 relative L2 over 12 steps.
* Ill-conditioned quadratic, X ∈ R^(64×64), loss ½·tr((X − X*)ᵀ A (X − X*))/64 with A's eigenvalues
  log-spaced over 1e-2…1e2, 300 steps from 0, constant lr: relative difference of the final loss /
  relative L2 distance of the parameters: lr 3e-2 (the test): 2.8% / 5.1%; lr 1e-2: 8.8% / 10.6%;
  lr 1e-1: 0.4% / 2.3%. Most of the parameter gap lies in the slow eigendirections, and it is
  systematic, not noise (fp32 Adam with 1% multiplicative gradient noise moves the parameters by
  only 0.1%); at lr 1e-2 quantizing only m gives a 6% loss gap, only v 4%. This is what
  deterministic round-to-nearest predicts: a moment whose per-step change is below half a level
  (relative to its block absmax) is rounded back, and with b2 = 0.999 that is most of v once
  warmed up. For scale, fp32 Adam with a bfloat16 first moment: 1.7% / 0.5% at lr 1e-2.
* Tiny LLaMA (vocab 97, hidden 32, ffn 48, 2 layers; every matrix quantized via min_size 256),
  100 steps of lr 3e-3 memorising 8 random sequences (loss 4.59 → 0.065 nats): largest loss
  difference 0.011 nats, 1.4% relative (at the last step, where the loss is smallest).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.optim.checks import check_choice, check_int, check_real, is_traced, static_int
from lowrank_jax.optim.complete import check_learning_rate, complete_optimizer, guard_composition

__all__ = [
    "EPS_PLACEMENTS",
    "QuantizedArray",
    "ScaleByAdam8bitState",
    "SIGNED_MAP",
    "UNSIGNED_MAP",
    "dequantize",
    "get_moments",
    "quantize",
    "scale_by_adam_8bit",
    "set_moments",
]


# ----------------------------------------------------------------------------- quantization maps


def dynamic_tree_magnitudes(bits: int) -> np.ndarray:
    """Positive values of a dynamic tree code with ``bits`` non-sign bits, ascending (float64).

    ``e`` leading zeros (e = 0 … bits − 1), an indicator bit, then ``f = bits − 1 − e`` linear
    fraction bits: ``10^(−e) · (0.1 + 0.9·k/2^f)``, k = 1 … 2^f. ``2^bits − 1`` values in (0, 1].
    """
    decades = []
    for e in range(bits):
        f = bits - 1 - e
        k = np.arange(1, 2**f + 1, dtype=np.float64)
        decades.append(10.0**-e * (0.1 + 0.9 * k / 2**f))
    return np.sort(np.concatenate(decades))


_SIGNED_MAGS = dynamic_tree_magnitudes(7)
SIGNED_MAP: np.ndarray = np.concatenate([-_SIGNED_MAGS[::-1], [0.0], _SIGNED_MAGS]).astype(np.float32)
UNSIGNED_MAP: np.ndarray = np.concatenate([[0.0], dynamic_tree_magnitudes(8)]).astype(np.float32)
_SIGNED_OFFSET = 127  # int8 code c ↔ SIGNED_MAP[c + 127]; code 0 is exactly 0


def _padded_midpoints(table: np.ndarray) -> np.ndarray:
    """Decision boundaries between neighbouring levels, padded with +inf to 256 entries."""
    t = table.astype(np.float64)
    mid = (t[:-1] + t[1:]) / 2
    return np.concatenate([mid, np.full(256 - len(mid), np.inf)]).astype(np.float32)


_SIGNED_MID = _padded_midpoints(SIGNED_MAP)
_UNSIGNED_MID = _padded_midpoints(UNSIGNED_MAP)


def _nearest_level(y: jax.Array, mid_256: np.ndarray) -> jax.Array:
    """Index of the level nearest to ``y``: the number of boundaries below ``y`` (ties round down).

    ``jnp.searchsorted(mid, y)`` as a branch-free binary search, 8 gathers from a 256-entry
    table; unrolled so that it fuses into one elementwise kernel (no while loop to compile).
    """
    mid = jnp.asarray(mid_256)
    idx = jnp.zeros(y.shape, jnp.int32)
    for step in (128, 64, 32, 16, 8, 4, 2, 1):
        idx = jnp.where(jnp.take(mid, idx + (step - 1)) < y, idx + step, idx)
    return idx


# ------------------------------------------------------------------------------ quantized arrays


@functools.partial(
    jax.tree_util.register_dataclass, data_fields=["codes", "scales"], meta_fields=["shape", "dtype", "signed"]
)
@dataclasses.dataclass(frozen=True)
class QuantizedArray:
    """A block-wise quantized array: a pytree node with array children only.

    ``codes``: int8 (signed map) or uint8 (unsigned map), the blocks of the flattened array: shape
    ``(*shape[:-1], shape[-1] // B, B)`` when the last dim is a multiple of the block size ``B``
    (the array's leading dims are kept, so codes shard like the array), else ``(⌈n / B⌉, B)`` of
    the zero-padded flattened array. ``scales``: float32 ``codes.shape[:-1]``, absmax per block.
    Static: ``shape``/``dtype`` of the original array (what :func:`dequantize` returns), ``signed``.
    """

    codes: jax.Array
    scales: jax.Array
    shape: tuple[int, ...]
    dtype: np.dtype
    signed: bool

    @property
    def block_size(self) -> int:
        return self.codes.shape[-1]

    @property
    def size(self) -> int:
        return math.prod(self.shape)


def _is_quantized(x: Any) -> bool:
    return isinstance(x, QuantizedArray)


def _is_codes_mapping(x: Any) -> bool:
    """A quantized moment whose node type a container rebuilt as a mapping (``nnx.Optimizer`` stores its state as
    ``nnx.State``, which keeps the children ``codes`` and ``scales`` but not the static fields)."""
    keys = getattr(x, "keys", None)
    return callable(keys) and set(keys()) == {"codes", "scales"}


def _is_moment(x: Any) -> bool:
    return _is_quantized(x) or _is_codes_mapping(x)


def _as_quantized(x: Any, g: jax.Array, *, signed: bool) -> Any:
    """``x`` as a :class:`QuantizedArray` again if a container rebuilt it as a mapping: the moments of ``g`` are
    float32 arrays of ``g``'s shape, the first moment signed, the second not."""
    if not _is_codes_mapping(x):
        return x
    codes, scales = jnp.asarray(x["codes"]), jnp.asarray(x["scales"])
    return QuantizedArray(codes, scales, tuple(g.shape), np.dtype(np.float32), signed)


def _check_block_size(block_size: Any) -> int:
    """A positive power of 2, as an int (it sets the codes' shape, so it must be static)."""
    size = static_int(block_size, "block_size", "it sets the quantization layout", lo=1)
    if size & (size - 1):
        raise ValueError(f"block_size: must be a power of 2, got {size}")
    return size


def _blocked_shape(shape: tuple[int, ...], block_size: int) -> tuple[int, ...]:
    """Shape of the codes of an array of ``shape``: ``(*shape[:-1], shape[-1] // B, B)`` when the
    last dim is a multiple of ``B`` (the blocks of the flattened array, kept in the array's own
    leading dims so a sharded array needs no reshuffle), else ``(⌈n / B⌉, B)`` of the zero-padded
    flattened array."""
    if len(shape) >= 2 and shape[-1] % block_size == 0:
        return (*shape[:-1], shape[-1] // block_size, block_size)
    return (-(-math.prod(shape) // block_size), block_size)


def _to_blocks(x: jax.Array, blocked: tuple[int, ...]) -> jax.Array:
    """``x`` viewed as its blocks (zero padding appended in the flattened layout)."""
    if len(blocked) > 2:
        return x.reshape(blocked)
    return jnp.pad(x.reshape(-1), (0, math.prod(blocked) - x.size)).reshape(blocked)


def _from_blocks(x: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """Inverse of :func:`_to_blocks`."""
    return x.reshape(shape) if x.ndim > 2 else x.reshape(-1)[: math.prod(shape)].reshape(shape)


def quantize(x: jax.typing.ArrayLike, signed: bool = True, block_size: int = 256) -> QuantizedArray:
    """Block-wise quantize ``x`` with the signed (int8) or unsigned (uint8) dynamic tree map.

    Round to nearest map entry of ``x / absmax(block)``. With ``signed=False`` negative values round
    to 0 (the map has no negative entries).
    """
    block_size = _check_block_size(block_size)
    x = jnp.asarray(x)
    shape = tuple(x.shape)
    blocks = _to_blocks(x.astype(jnp.float32), _blocked_shape(shape, block_size))
    codes, absmax = _quantize_blocks(blocks, signed)
    return QuantizedArray(codes, absmax, shape, np.dtype(x.dtype), bool(signed))


def _quantize_blocks(x_KB: jax.Array, signed: bool) -> tuple[jax.Array, jax.Array]:
    """``(codes (..., B), absmax (...))`` of float32 blocks ``x_KB`` (blocks on the last axis)."""
    absmax_K = jnp.max(jnp.abs(x_KB), axis=-1)
    y_KB = x_KB / jnp.where(absmax_K > 0, absmax_K, 1.0)[..., None]
    idx_KB = _nearest_level(y_KB, _SIGNED_MID if signed else _UNSIGNED_MID)
    if signed:
        return (idx_KB - _SIGNED_OFFSET).astype(jnp.int8), absmax_K
    return idx_KB.astype(jnp.uint8), absmax_K


def _dequantize_blocks(codes_KB: jax.Array, scales_K: jax.Array, signed: bool) -> jax.Array:
    """Float32 blocks ``map[code] · scale``."""
    if signed:
        idx = codes_KB.astype(jnp.int32) + _SIGNED_OFFSET
        table = jnp.asarray(SIGNED_MAP)
    else:
        idx = codes_KB.astype(jnp.int32)
        table = jnp.asarray(UNSIGNED_MAP)
    return jnp.take(table, idx, mode="clip") * scales_K[..., None]


def dequantize(q: QuantizedArray) -> jax.Array:
    """``map[code] · scale`` reshaped to ``q.shape`` in ``q.dtype``."""
    return _from_blocks(_dequantize_blocks(q.codes, q.scales, q.signed), q.shape).astype(q.dtype)


# Quantized leaves are updated in chunks of at most this many blocks (2^20 values at B = 256; along
# the codes' block axis, so a row-blocked leaf's chunk is at least one block column), so
# the float32 / int32 temporaries of dequantize → Adam → requantize are chunk-sized, not leaf-sized,
# whatever the backend fuses. Blocks are independent: the result is one pass's up to float rounding.
CHUNK_BLOCKS = 4096


def _chunk_count(codes_shape: tuple[int, ...], chunk_blocks: int) -> int:
    """The fewest equal chunks along the codes' block axis (``-2``) of at most ``chunk_blocks``
    blocks each, or one block column per chunk when even that is larger."""
    dim, blocks = codes_shape[-2], math.prod(codes_shape[:-1])
    for n in range(-(-blocks // chunk_blocks), dim + 1):
        if dim % n == 0:
            return n
    return dim


def _quantized_zeros(shape: tuple[int, ...], signed: bool, block_size: int) -> QuantizedArray:
    blocked = _blocked_shape(shape, block_size)
    codes = jnp.zeros(blocked, jnp.int8 if signed else jnp.uint8)  # code 0 ↔ 0.0 in both maps
    return QuantizedArray(codes, jnp.zeros(blocked[:-1], jnp.float32), shape, np.dtype(np.float32), signed)


# ------------------------------------------------------------------------------------- optimizer


EPS_PLACEMENTS = ("optax", "hf")  # m̂/(√v̂+ε) as optax.scale_by_adam, or the HF / galore-torch AdamW form


class ScaleByAdam8bitState(NamedTuple):
    """State of :func:`scale_by_adam_8bit`; mu/nu leaves are float32 arrays or QuantizedArray."""

    count: jax.Array  # int32 scalar
    mu: optax.Updates
    nu: optax.Updates


def _load(m: Any) -> jax.Array:
    return dequantize(m) if _is_quantized(m) else m


def _store(x: jax.Array, like: Any) -> Any:
    """Float32 ``x`` stored the way ``like`` is (requantized with its map and block size, or f32)."""
    x = jnp.asarray(x, jnp.float32)
    if _is_quantized(like):
        return quantize(x, like.signed, like.block_size)
    return x


def get_moments(state: ScaleByAdam8bitState) -> tuple[Any, Any]:
    """``(mu, nu)`` as float32 trees with the updates' shapes (dequantized where quantized)."""
    mu = jax.tree.map(_load, state.mu, is_leaf=_is_quantized)
    nu = jax.tree.map(_load, state.nu, is_leaf=_is_quantized)
    return mu, nu


def set_moments(state: ScaleByAdam8bitState, mu: Any | None, nu: Any | None) -> ScaleByAdam8bitState:
    """Replace the moments by float trees ``mu``/``nu`` (None keeps that moment), requantizing.

    Each new leaf is stored like the leaf it replaces: quantized with the same map and block size,
    or as float32. With :func:`get_moments` this is the pair GaLore's ``register_moments`` expects.
    """

    def store(old_tree: Any, new_tree: Any | None) -> Any:
        if new_tree is None:
            return old_tree
        return jax.tree.map(lambda old, new: _store(new, old), old_tree, new_tree, is_leaf=_is_quantized)

    return state._replace(mu=store(state.mu, mu), nu=store(state.nu, nu))


def _bias_correction(decay: Any, count: jax.Array) -> jax.Array:
    """``1 − decayᵗ`` as ``−expm1(t·log decay)``: no cancellation (``1 − 0.999ᵗ`` in float32 loses ~5e-5)."""
    if isinstance(decay, int | float):  # log in float64 on the host
        log_decay = math.log(decay) if decay > 0 else -math.inf
    else:
        log_decay = jnp.log(jnp.asarray(decay, jnp.float32))
    return -jnp.expm1(count.astype(jnp.float32) * log_decay)


def scale_by_adam_8bit(
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    *,
    block_size: int = 256,
    eps_placement: str = "optax",
    min_size: int = 4096,
) -> optax.GradientTransformation:
    """Adam scaling with block-wise 8-bit quantized moments (Dettmers et al. 2022).

    Args:
      b1, b2: moment decay rates in [0, 1).
      eps: denominator term, > 0.
      block_size: values per quantization block (a positive power of 2).
      eps_placement: ``'optax'`` (m̂/(√v̂+ε), as ``optax.scale_by_adam``) or ``'hf'``
        ((m/(√v+ε))·√(1−b2ᵗ)/(1−b1ᵗ), as HuggingFace / galore-torch AdamW).
      min_size: leaves with fewer elements keep float32 moments (bitsandbytes uses 4096).

    Returns:
      A GradientTransformation whose update returns the Adam direction (to be scaled by −lr)
      in each gradient's dtype; ``params`` are not used. Only ``init`` reads ``block_size`` and
      ``min_size`` (``update`` takes the layout from the state); pass them in
      ``optax.inject_hyperparams(..., static_args=("block_size", "min_size"))``.
    """
    check_real(b1, "b1", lo=0.0, hi=1.0, hi_open=True)
    check_real(b2, "b2", lo=0.0, hi=1.0, hi_open=True)
    check_real(eps, "eps", lo=0.0, lo_open=True)
    check_choice(eps_placement, "eps_placement", EPS_PLACEMENTS)
    if not is_traced(block_size):  # a traced one is reported by init_fn
        _check_block_size(block_size)
    check_int(min_size, "min_size", lo=0)

    tx = optax.GradientTransformation(
        functools.partial(_init_8bit, block_size=block_size, min_size=min_size),
        functools.partial(_update_8bit, b1=b1, b2=b2, eps=eps, eps_placement=eps_placement),
    )
    return guard_composition(tx, "adamw_8bit", complete=False)


def adamw_8bit(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 1e-4,
    mask: Any = None,
    block_size: int = 256,
    eps_placement: str = "optax",
    min_size: int = 4096,
) -> optax.GradientTransformationExtraArgs:
    """AdamW with 8-bit block-wise quantized moments, complete like ``optax.adamw`` (same defaults, same ``mask``:
    the leaves weight decay applies to, default every leaf with ndim >= 2).

    ``chain(scale_by_adam_8bit(b1, b2, eps, …), add_decayed_weights(weight_decay, mask), lr)``; 8-bit optimizers
    after Dettmers, Lewis, Shleifer, Zettlemoyer, "8-bit Optimizers via Block-wise Quantization", ICLR 2022,
    arXiv:2110.02861 (bitsandbytes: blocks of 256 with dynamic-tree codes; leaves under 4096 elements stay float32).
    """
    check_learning_rate(learning_rate, "adamw_8bit")
    scaling = scale_by_adam_8bit(b1, b2, eps, block_size=block_size, eps_placement=eps_placement, min_size=min_size)
    return complete_optimizer("adamw_8bit", scaling, learning_rate, weight_decay, mask)


def _init_8bit(params: optax.Params, *, block_size: Any, min_size: Any) -> ScaleByAdam8bitState:
    """Zero moments: quantized for leaves of at least ``min_size`` elements, float32 for the others."""
    block_size_ = _check_block_size(block_size)
    min_size_ = static_int(min_size, "min_size", "it decides which leaves are quantized")

    def zeros(p: Any, signed: bool) -> Any:
        shape = tuple(p.shape)
        if math.prod(shape) < max(min_size_, 1):
            return jnp.zeros(shape, jnp.float32)
        return _quantized_zeros(shape, signed, block_size_)

    mu = jax.tree.map(lambda p: zeros(p, True), params)
    nu = jax.tree.map(lambda p: zeros(p, False), params)
    return ScaleByAdam8bitState(count=jnp.zeros([], jnp.int32), mu=mu, nu=nu)


AdamFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, jax.Array, jax.Array]]


def _adam(
    g32: jax.Array, m: jax.Array, v: jax.Array, *, b1: Any, b2: Any, eps: Any, bc1: Any, bc2: Any, eps_placement: str
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """``(direction, m, v)`` of one Adam step in float32 (the module doc's two eps placements)."""
    m = (1 - b1) * g32 + b1 * m
    v = (1 - b2) * jnp.square(g32) + b2 * v
    if eps_placement == "optax":
        return (m / bc1) / (jnp.sqrt(v / bc2) + eps), m, v
    return m / (jnp.sqrt(v) + eps) * (jnp.sqrt(bc2) / bc1), m, v


def _quantized_leaf(
    g: jax.Array, mu_q: QuantizedArray, nu_q: QuantizedArray, adam: AdamFn
) -> tuple[jax.Array, QuantizedArray, QuantizedArray]:
    """Adam on one quantized leaf, block chunk by block chunk (zero padding stays zero).

    A loop whose carry is updated in place: the gradient buffer becomes the update and the
    codes and scales are rewritten chunk by chunk, so the only leaf-sized temporaries are
    the (padded) gradient in its own dtype and the new codes; float32 exists per chunk.
    """
    axis = mu_q.codes.ndim - 2  # the block axis; the leading dims are the array's own
    per = mu_q.codes.shape[axis] // _chunk_count(mu_q.codes.shape, CHUNK_BLOCKS)
    g_KB = _to_blocks(g, mu_q.codes.shape)

    def chunk(i: jax.Array, carry: tuple) -> tuple:
        start = i * per
        part = lambda x: jax.lax.dynamic_slice_in_dim(x, start, per, axis)
        put = lambda full, x: jax.lax.dynamic_update_slice_in_dim(full, x, start, axis)
        u_KB, mc, ms, nc, ns = carry
        u, m, v = adam(
            part(u_KB).astype(jnp.float32),
            _dequantize_blocks(part(mc), part(ms), True),
            _dequantize_blocks(part(nc), part(ns), False),
        )
        new = (u.astype(g.dtype), *_quantize_blocks(m, True), *_quantize_blocks(v, False))
        return tuple(put(full, x) for full, x in zip(carry, new, strict=True))

    init = (g_KB, mu_q.codes, mu_q.scales, nu_q.codes, nu_q.scales)
    u, mc, ms, nc, ns = jax.lax.fori_loop(0, mu_q.codes.shape[axis] // per, chunk, init)
    u = _from_blocks(u, g.shape)
    mu_new = QuantizedArray(mc, ms, mu_q.shape, mu_q.dtype, True)
    nu_new = QuantizedArray(nc, ns, nu_q.shape, nu_q.dtype, False)
    return u, mu_new, nu_new


def _update_8bit(
    updates: optax.Updates,
    state: ScaleByAdam8bitState,
    params: optax.Params | None = None,
    *,
    b1: Any,
    b2: Any,
    eps: Any,
    eps_placement: str,
) -> tuple[optax.Updates, ScaleByAdam8bitState]:
    """One Adam step on every leaf: chunked on the quantized moments, at once on the float32 ones."""
    del params
    count_inc = optax.safe_increment(state.count)
    bc1, bc2 = _bias_correction(b1, count_inc), _bias_correction(b2, count_inc)
    adam = functools.partial(_adam, b1=b1, b2=b2, eps=eps, bc1=bc1, bc2=bc2, eps_placement=eps_placement)

    g_leaves, treedef = jax.tree.flatten(updates)
    # the moments keep their own structure (it may wrap leaves, as nnx.Variable does); leaf order matches the updates
    mu_leaves, mu_def = jax.tree.flatten(state.mu, is_leaf=_is_moment)
    nu_leaves, nu_def = jax.tree.flatten(state.nu, is_leaf=_is_moment)
    u_leaves, new_mu, new_nu = [], [], []
    for g, mu_s, nu_s in zip(g_leaves, mu_leaves, nu_leaves, strict=True):
        mu_s, nu_s = _as_quantized(mu_s, g, signed=True), _as_quantized(nu_s, g, signed=False)
        if _is_quantized(mu_s) and _is_quantized(nu_s) and mu_s.signed and not nu_s.signed:
            u, mu_q, nu_q = _quantized_leaf(g, mu_s, nu_s, adam)
            u_leaves.append(u)
            new_mu.append(mu_q)
            new_nu.append(nu_q)
            continue
        u, m, v = adam(g.astype(jnp.float32), _load(mu_s), _load(nu_s))
        u_leaves.append(u.astype(g.dtype))
        new_mu.append(_store(m, mu_s))
        new_nu.append(_store(v, nu_s))
    new_state = ScaleByAdam8bitState(count=count_inc, mu=mu_def.unflatten(new_mu), nu=nu_def.unflatten(new_nu))
    return treedef.unflatten(u_leaves), new_state
