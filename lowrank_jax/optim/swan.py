"""SWAN: stateless SGD whose matrix gradients are normalised row-wise and whitened.

Reference: Chao Ma, Wenbo Gong, Meyer Scetbon, Edward Meeds, "SWAN: SGD with Normalization and Whitening Enables
Stateless LLM Training", ICML 2025, arXiv:2412.13148 (Algorithms 1–3; no official code is public).

Algorithm, for every selected weight matrix with gradient ``G_t`` (PyTorch orientation ``m (out) × n (in)``)::

    G̃ = (G_t − ḡ 1ᵀ) / (s 1ᵀ)           GradNorm: each row standardised over its n entries
                                        (ḡ, s: row means and biased standard deviations)
    ΔW = (G̃ G̃ᵀ)^(-1/2) G̃                 GradWhitening, by coupled Newton–Schulz iterations:
         A = Gram of the smaller side,  Y₀ = A / ‖A‖_F,  Z₀ = I
         T = (3I − Z_k Y_k) / 2,  Y_{k+1} = Y_k T,  Z_{k+1} = T Z_k       (k = 0 … ns_steps − 1)
         ΔW ≈ Z G̃ / √‖A‖_F  (rows side) or  G̃ Z / √‖A‖_F  (columns side)
    W ← W − lr · scale · ΔW              (the learning rate outside this transform)

``Z_k → Y₀^(-1/2)``, so the result tends to the polar factor ``U Vᵀ`` of ``G̃``, which equals ``(G̃ G̃ᵀ)^(-1/2) G̃``
when ``m ≤ n`` and ``G̃ (G̃ᵀ G̃)^(-1/2)`` otherwise; the iteration runs on the smaller Gram matrix (the larger one
is singular). In Flax orientation (``in × out``) a PyTorch row is a column: GradNorm standardises every output
column over the input axis. GradNorm's statistics get ``norm_eps`` under the square root; whitening runs in float32
(the paper whitens in FP32 while weights and gradients are BF16) and the update is cast back to the gradient dtype.

No optimizer state for the selected matrices: the state is the step ``count`` and the ``base_optimizer``'s state on
the other leaves (default Adam, optax's ``scale_by_adam``, as the paper trains embeddings, norms and the output
head with Adam), which the selected leaves do not enter (``optax.MaskedNode``).

Options beyond the paper's defaults, for its ablations: ``normalize=False`` (whitening only), ``whiten='none'``
(GradNorm only) or ``whiten='exact'`` (the polar factor from an SVD instead of Newton–Schulz, over the singular
values above ``max(m, n) · 1.2e-7 · σ_max``); ``scale`` multiplies the update of the selected matrices.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from lowrank_jax.optim.checks import check_bool, check_choice, check_int, check_real
from lowrank_jax.optim.complete import check_learning_rate, complete_optimizer, guard_composition
from lowrank_jax.optim.masks import resolve_mask as complete_mask
from lowrank_jax.optim.projection import MaskOrFn, Plan, make_plans, resolve_dims, resolve_mask

WHITEN_MODES = ("newton_schulz", "exact", "none")
__all__ = ["WHITEN_MODES", "SwanState", "grad_norm", "grad_whitening", "scale_by_swan", "swan"]


class SwanState(NamedTuple):
    """State of :func:`scale_by_swan`: the step count and the base optimizer's state on the unselected leaves."""

    count: jax.Array  # int32 []
    base_state: optax.OptState  # on the params with the selected leaves replaced by optax.MaskedNode()


def grad_norm(g_bmn: jax.Array, eps: Any) -> jax.Array:
    """GradNorm of Flax matrices ``(B, in, out)``: every output column standardised over the input axis (float32)."""
    x = g_bmn.astype(jnp.float32)
    centred = x - jnp.mean(x, axis=1, keepdims=True)
    return centred / jnp.sqrt(jnp.mean(jnp.square(centred), axis=1, keepdims=True) + eps)


def exact_tolerance(sv: jax.Array, mn: tuple[int, int]) -> jax.Array:
    """Singular values at or below ``max(m, n) · 1.2e-7 · σ_max`` are null directions (GradNorm makes every
    normalised row sum to 0, so a tall matrix is rank-deficient): the exact polar factor leaves them out."""
    return (max(mn) * 1.2e-7 * jnp.max(sv, axis=-1))[..., None]


def _newton_schulz_inv_sqrt(a_bkk: jax.Array, ns_steps: Any) -> jax.Array:
    """``(a / ‖a‖_F)^(-1/2)`` of symmetric PSD ``(B, k, k)`` by ``ns_steps`` coupled Newton–Schulz iterations."""
    eye = jnp.eye(a_bkk.shape[-1], dtype=a_bkk.dtype)
    y = a_bkk / jnp.linalg.norm(a_bkk, axis=(1, 2), keepdims=True)
    z = jnp.broadcast_to(eye, a_bkk.shape)

    def body(_: Any, yz: tuple) -> tuple:
        y, z = yz
        t = (3.0 * eye - z @ y) / 2.0
        return y @ t, t @ z

    return jax.lax.fori_loop(0, ns_steps, body, (y, z))[1]


def grad_whitening(x_bmn: jax.Array, whiten: str, ns_steps: Any) -> jax.Array:
    """GradWhitening of float32 ``(B, m, n)``: the polar factor, by Newton–Schulz on the smaller Gram or by SVD."""
    if whiten == "none":
        return x_bmn
    if whiten == "exact":
        u, sv, vh = jnp.linalg.svd(x_bmn, full_matrices=False)
        return (u * (sv > exact_tolerance(sv, x_bmn.shape[1:]))[:, None, :]) @ vh
    m, n = x_bmn.shape[1:]
    hi = jax.lax.Precision.HIGHEST
    if m <= n:
        gram = jnp.einsum("bmn,bkn->bmk", x_bmn, x_bmn, precision=hi)
        z = _newton_schulz_inv_sqrt(gram, ns_steps)
        out = jnp.einsum("bmk,bkn->bmn", z, x_bmn, precision=hi)
    else:
        gram = jnp.einsum("bmn,bmk->bnk", x_bmn, x_bmn, precision=hi)
        z = _newton_schulz_inv_sqrt(gram, ns_steps)
        out = jnp.einsum("bmn,bnk->bmk", x_bmn, z, precision=hi)
    return out / jnp.sqrt(jnp.linalg.norm(gram, axis=(1, 2)))[:, None, None]


@dataclasses.dataclass(frozen=True)
class _SwanSettings:
    normalize: bool
    whiten: str
    ns_steps: Any
    norm_eps: Any
    scale: Any
    mask: MaskOrFn
    dimension_numbers: Any
    base: optax.GradientTransformation


def _plans(tree: Any, s: _SwanSettings) -> tuple[list, Any, list[Plan | None]]:
    """``(leaves, treedef, plans)``: one matrix-batch plan per selected leaf (the side flags are unused)."""
    leaves, treedef = jax.tree.flatten(tree)
    selected = resolve_mask(s.mask, tree, leaves)
    dims = resolve_dims(s.dimension_numbers, tree, leaves)
    return leaves, treedef, make_plans(leaves, selected, dims, lambda *_: (False, False), lambda *_: 1)


def _rest(leaves: list, treedef: Any, plans: list) -> Any:
    """The tree the base optimizer sees: the selected leaves replaced by ``optax.MaskedNode()``."""
    return treedef.unflatten([x if p is None else optax.MaskedNode() for x, p in zip(leaves, plans, strict=True)])


def _init(params: optax.Params, *, s: _SwanSettings) -> SwanState:
    leaves, treedef, plans = _plans(params, s)
    return SwanState(jnp.zeros([], jnp.int32), s.base.init(_rest(leaves, treedef, plans)))


def swan_direction(g: jax.Array, p: Plan, s: _SwanSettings) -> jax.Array:
    """One selected leaf's SWAN update (``scale`` included), in the leaf's shape and the gradient dtype."""
    x = grad_norm(p.to_mats(g), s.norm_eps) if s.normalize else p.to_mats(g).astype(jnp.float32)
    # PyTorch's m (out) × n (in) is the transpose of the Flax (in, out) matrix
    w = jnp.swapaxes(grad_whitening(jnp.swapaxes(x, 1, 2), s.whiten, s.ns_steps), 1, 2)
    return (p.from_mats(w) * s.scale).astype(g.dtype)


def _update(
    updates: optax.Updates, state: SwanState, params: optax.Params | None = None, *, s: _SwanSettings
) -> tuple[optax.Updates, SwanState]:
    leaves, treedef, plans = _plans(updates, s)
    base_updates, base_state = s.base.update(_rest(leaves, treedef, plans), state.base_state, params)
    base_list = treedef.flatten_up_to(base_updates)
    out = [u if p is None else swan_direction(g, p, s) for g, p, u in zip(leaves, plans, base_list, strict=True)]
    return treedef.unflatten(out), SwanState(optax.safe_int32_increment(state.count), base_state)


def scale_by_swan(
    *,
    normalize: bool = True,
    whiten: str = "newton_schulz",
    ns_steps: int = 10,
    norm_eps: float = 1e-8,
    scale: float = 1.0,
    mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    base_optimizer: optax.GradientTransformation | None = None,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
) -> optax.GradientTransformationExtraArgs:
    """SWAN's update direction for the selected matrices, the base optimizer's for the rest (module doc).

    Args:
      normalize: GradNorm (row-wise standardisation) before whitening.
      whiten: ``'newton_schulz'`` (the paper), ``'exact'`` (SVD polar factor) or ``'none'``.
      ns_steps: Newton–Schulz iterations (may be traced under ``inject_hyperparams``).
      norm_eps: added to GradNorm's variance.
      scale: multiplies the selected matrices' update.
      mask: bool pytree (prefix) or ``params -> pytree`` of the whitened leaves; default every leaf with ndim >= 2.
      dimension_numbers: :class:`~lowrank_jax.optim.projection.GaLoreDims` per leaf for ndim > 2 (default:
        leading axes are a batch of matrices).
      base_optimizer: params-free transform for the other leaves; default ``optax.scale_by_adam(b1, b2, eps)``.
      b1, b2, eps: the default base Adam's.
    """
    check_bool(normalize, "normalize")
    check_choice(whiten, "whiten", WHITEN_MODES)
    check_int(ns_steps, "ns_steps", lo=1)
    check_real(norm_eps, "norm_eps", lo=0.0)
    check_real(eps, "eps", lo=0.0)
    check_real(scale, "scale", lo=0.0, lo_open=True)
    base_optimizer = checked_base(base_optimizer, lambda: optax.scale_by_adam(b1, b2, eps))
    s = _SwanSettings(normalize, whiten, ns_steps, norm_eps, scale, mask, dimension_numbers, base_optimizer)
    tx = optax.GradientTransformation(functools.partial(_init, s=s), functools.partial(_update, s=s))
    return guard_composition(tx, "swan", complete=False)


def checked_base(
    base_optimizer: Any, default: Callable[[], optax.GradientTransformation]
) -> optax.GradientTransformationExtraArgs:
    """``base_optimizer``, or ``default()`` when None; anything without ``init`` / ``update`` is a ValueError."""
    if base_optimizer is None:
        return default()
    if not (hasattr(base_optimizer, "init") and hasattr(base_optimizer, "update")):
        raise ValueError(
            f"base_optimizer: must be an optax GradientTransformation, got {type(base_optimizer).__name__}"
        )
    return base_optimizer


def swan(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    normalize: bool = True,
    whiten: str = "newton_schulz",
    ns_steps: int = 10,
    norm_eps: float = 1e-8,
    scale: float = 1.0,
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
    dimension_numbers: Any = None,
) -> optax.GradientTransformationExtraArgs:
    """The complete SWAN optimizer: :func:`scale_by_swan` (Adam on the unselected leaves), weight decay, lr.

    ``mask`` None selects :func:`lowrank_jax.optim.masks.default_mask` (attention and MLP matrices).
    """
    check_learning_rate(learning_rate, "swan")
    scaling = scale_by_swan(
        normalize=normalize,
        whiten=whiten,
        ns_steps=ns_steps,
        norm_eps=norm_eps,
        scale=scale,
        mask=complete_mask(mask),
        dimension_numbers=dimension_numbers,
        b1=b1,
        b2=b2,
        eps=eps,
    )
    return complete_optimizer("swan", scaling, learning_rate, weight_decay, weight_decay_mask)
