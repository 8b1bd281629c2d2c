"""SLTrain's sparse plus low-rank linear, built through the dense factory as kind ``sl``.

SLTrain (Han, Li, Lin, Mishra, Zhu, "SLTrain: a sparse plus low-rank approach for parameter and
memory efficient pretraining", NeurIPS 2024, arXiv 2406.02214; official code andyjm3/SLTrain)
pretrains every attention and MLP linear as

    W = A B · s + S          A (in, r),  B (r, out),  s = alpha / r,  S sparse on a fixed support

(Flax orientation ``(in, out)``; the paper's PyTorch ``(out, in)`` weight is ``W_pt = B_pt A_pt s + S_pt``
with ``A_pt (r, in)``, ``B_pt (out, r)``; here ``A = A_ptᵀ``, ``B = B_ptᵀ``, ``S = S_ptᵀ``). The support
of ``S`` is drawn once, uniformly without replacement over all ``in·out`` entries, and never
changes; only ``A``, ``B`` and the ``nnz = round(δ·in·out)`` values are trained. Parameters:
``r·(in + out) + nnz`` instead of ``in·out``.

Initialisation (paper / official code, translated to ``(in, out)``):

* ``A`` Kaiming-uniform as ``torch.nn.init.kaiming_uniform_(a=√5)`` on ``A_pt (r, in)``:
  ``U(−1/√in, 1/√in)`` (fan_in = in) — :func:`lowrank_jax.layers.lora.kaiming_uniform`.
* ``B = 0``, so at initialisation ``W = S``: the network starts from a sparse random weight.
* values ``U(−1/√in, 1/√in)`` (the bound of PyTorch's default ``nn.Linear(in, out)`` init).
* support: :func:`sl_support` — ``jax.random.choice(replace=False)`` of ``nnz`` flat row-major
  indices ``i·out + j`` from a key split off the model's ``rngs`` (so identical on every host for
  the same seed), sorted ascending, stored as int32 (4 bytes per non-zero).

Variables: ``sl_a`` / ``sl_b`` :class:`SLFactor`, ``sl_values`` :class:`SparseValues` with logical
axes ``('nnz',)``, ``sl_support`` :class:`SLSupport` — an ``nnx.Variable`` that is not an
``nnx.Param``: integer, read through ``stop_gradient``, no gradient and no optimizer state when
the optimizer is partitioned by Variable type (as for ReLoRA's ``FrozenWeight``). With
``scan_layers`` every leaf gets a leading ``layers`` axis and each layer has its own support.
Being integer, the support requires a train step that differentiates the params with
``allow_int=True`` (its cotangent is ``float0``), hands the optimizer zeros for it and never
applies an update to it (an int32 + float32 update would round indices above 2²⁴).

The product goes through :func:`pallas_kernels.sl_matmul.sl_matmul` (``model.sl_implementation``:
``xla`` materialises W with the paper's recompute-in-backward custom VJP; ``pallas`` builds W tiles
on chip; ``auto`` picks pallas on GPU/TPU where its kernels compile for the layer's shapes, else xla).
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.layers.dense import Axes, dtypes, register_dense, register_effective_weight
from lowrank_jax.layers.lora import kaiming_uniform
from pallas_kernels.sl_matmul.api import IMPLEMENTATIONS, sl_matmul
from pallas_kernels.sl_matmul.reference import materialize_w

SL_A, SL_B, SL_VALUES, SL_SUPPORT = "sl_a", "sl_b", "sl_values", "sl_support"


class SLFactor(nnx.Param):
    """A trainable SLTrain low-rank factor (``A`` or ``B``)."""


class SparseValues(nnx.Param):
    """The trainable values of SLTrain's sparse part ``S`` (one per support entry)."""


class SLSupport(nnx.Variable):
    """SLTrain's fixed sparse support: int32 flat indices; no gradient, no optimizer state."""


def sl_nnz(in_features: int, out_features: int, density: float) -> int:
    """``round(δ·in·out)`` support entries (at least 1)."""
    return max(1, round(density * in_features * out_features))


def check_sl_args(in_features: Any, out_features: Any, rank: Any, alpha: Any, density: Any) -> None:
    """Validate the SLTrain hyperparameters; each error names the argument."""
    for name, v in (("in_features", in_features), ("out_features", out_features)):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"{name}: must be a positive integer, got {v!r}")
    if isinstance(rank, bool) or not isinstance(rank, int) or not 1 <= rank <= min(in_features, out_features):
        raise ValueError(
            f"rank: must be an integer in [1, min(in, out) = {min(in_features, out_features)}], got {rank!r}"
        )
    if isinstance(alpha, bool) or not isinstance(alpha, Real) or not math.isfinite(alpha):
        raise ValueError(f"alpha: must be a finite real number, got {alpha!r}")
    if isinstance(density, bool) or not isinstance(density, Real) or not 0.0 < density <= 1.0:
        raise ValueError(f"density: must be in (0, 1], got {density!r}")
    if in_features * out_features >= 2**31:
        raise ValueError(f"in_features: in*out = {in_features * out_features} does not fit int32 flat indices")


def sl_support(key: jax.Array, in_features: int, out_features: int, density: float) -> jax.Array:
    """The fixed support: ``round(δ·in·out)`` distinct flat indices, uniform without replacement, sorted, int32.

    A pure function of ``key`` (jittable, vmappable over keys): the same key gives the same support
    on every host and process.
    """
    check_sl_args(in_features, out_features, 1, 1.0, density)
    n = in_features * out_features
    nnz = sl_nnz(in_features, out_features, density)
    idx = jax.random.choice(key, n, (nnz,), replace=False)
    return jnp.sort(idx.astype(jnp.int32))


class SLDense(nnx.Module):
    """``y = x (A B · s + S)``; see the module docstring for parameters and init.

    ``dtype`` is the compute dtype (``x`` is cast to it; W is assembled in float32 and cast to it).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        *,
        rank: int,
        alpha: float = 32.0,
        density: float = 0.03,
        axes: Axes,
        rngs: nnx.Rngs,
        dtype: jnp.dtype = jnp.float32,
        param_dtype: jnp.dtype = jnp.float32,
        implementation: str = "auto",
    ):
        check_sl_args(in_features, out_features, rank, alpha, density)
        if len(axes) != 2:
            raise ValueError(f"axes: an SL kernel needs two logical axis names, got {axes!r}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation: must be one of {', '.join(IMPLEMENTATIONS)}, got {implementation!r}")
        ax_in, ax_out = axes
        self.in_features, self.out_features, self.rank = in_features, out_features, rank
        self.alpha, self.density = float(alpha), float(density)
        self.scaling = float(alpha) / rank
        self.dtype = dtype
        self.implementation = implementation
        bound = 1.0 / math.sqrt(in_features)
        nnz = sl_nnz(in_features, out_features, density)
        a = kaiming_uniform(rngs.params(), (in_features, rank), param_dtype)
        support = sl_support(rngs.params(), in_features, out_features, density)
        vals = jax.random.uniform(rngs.params(), (nnz,), jnp.float32, -bound, bound)
        self.sl_a = SLFactor(a, axes=(ax_in, "rank"))
        self.sl_b = SLFactor(jnp.zeros((rank, out_features), param_dtype), axes=("rank", ax_out))
        self.sl_values = SparseValues(vals.astype(param_dtype), axes=("nnz",))
        self.sl_support = SLSupport(support, axes=("nnz",))

    def materialize(self) -> jax.Array:
        """The dense ``(in, out)`` weight ``A B s + S`` in float32 (for inspection and tests)."""
        return materialize_w(self.sl_a[...], self.sl_b[...], self.sl_values[...], self.sl_support[...], self.scaling)

    def __call__(self, x: jax.Array) -> jax.Array:
        idx = jax.lax.stop_gradient(self.sl_support[...])
        return sl_matmul(
            x.astype(self.dtype),
            self.sl_a[...],
            self.sl_b[...],
            self.sl_values[...],
            idx,
            self.scaling,
            implementation=self.implementation,
        )


@register_dense("sl")
def _build_sl(in_features: int, out_features: int, *, axes: Axes, rngs: nnx.Rngs, config: Any) -> SLDense:
    return SLDense(
        in_features,
        out_features,
        rank=config.sl_rank,
        alpha=config.sl_alpha,
        density=config.sl_density,
        implementation=config.sl_implementation,
        axes=axes,
        rngs=rngs,
        **dtypes(config),
    )


def sl_effective_weight(layer: Any, config: Any) -> jax.Array:
    """``A B · s + S`` in float32 from an SL layer's param dict; stacked leading dims are mapped over."""
    a, b, values, idx = layer["sl_a"], layer["sl_b"], layer["sl_values"], layer["sl_support"]
    scale = config.sl_alpha / config.sl_rank
    lead = a.shape[:-2]
    flat = lambda x, k: x.reshape(-1, *x.shape[-k:])
    w = jax.vmap(lambda a, b, v, i: materialize_w(a, b, v, i, scale))(
        flat(a, 2), flat(b, 2), flat(values, 1), flat(idx, 1)
    )
    return w.reshape(*lead, *w.shape[-2:])


register_effective_weight("sl", ("sl_a", "sl_b", "sl_support", "sl_values"), sl_effective_weight)
