"""GaLore: gradient low-rank projection, as an optax GradientTransformation.

Reference: Zhao, Zhang, Chen, Wang, Anandkumar, Tian, "GaLore: Memory-Efficient LLM Training by
Gradient Low-Rank Projection", ICML 2024, arXiv:2403.03507 (official code: galore-torch).

Algorithm, for every selected weight matrix with gradient ``G_t`` (rank ``r``, gap ``T``, scale ``α``)::

    if t % T == 0:   P ← top-r singular vectors of G_t       (SVD in float32, cast to G's dtype)
    R_t  = project(G_t, P)           low-rank gradient, e.g. Pᵀ G_t (r × n)
    N_t  = base(R_t)                 any params-free optax transform (default: HF-style Adam),
                                     so its state (Adam's m, v) is low-rank
    ΔW_t = α · project_back(N_t, P)  e.g. P N_t (m × n)

Leaves that are not selected get the base optimizer at full size. A single base state serves both groups:
``base_optimizer`` is initialised once on a "proxy" tree that holds the low-rank shapes for projected
leaves and the params themselves for the others.

Two entry points, as in optax: :func:`scale_by_galore` (composable, no learning rate, any params-free
``base_optimizer``; default mask: every matrix) and :func:`galore` (the complete GaLore-AdamW with
``learning_rate``, ``weight_decay`` and a default mask of the attention and MLP matrices by name).

Orientation. Flax kernels are ``(in, out)`` with ``y = x @ K``; PyTorch weights are ``(out, in)``
``= K.T``. A Flax gradient ``G`` is ``in × out``. The *input-side* projector ``P_in`` (in × r) holds
the top-r left singular vectors of ``G``: low-rank gradient ``P_inᵀ G`` (r × out), back-projection
``P_in U``. The *output-side* projector ``P_out`` (out × r) holds the top-r right singular vectors:
low-rank ``G P_out`` (in × r), back-projection ``U P_outᵀ``.

==============  =============================================  ==========================
``proj_type``   side(s) projected (Flax ``G``: in × out)        official galore-torch name
==============  =============================================  ==========================
``std``         the smaller of in/out; tie → input              ``std``
``reverse_std`` the larger of in/out; tie → output              ``reverse_std``
``input``       always input (``P_in``)                         ``right`` (``Vh[:r]``)
``output``      always output (``P_out``)                       ``left`` (``U[:, :r]``)
``both``        both: ``P_inᵀ G P_out`` (r × r)                 ``full`` (``Aᵀ G Bᵀ``)
==============  =============================================  ==========================

(Official ``std``: for a PyTorch gradient m × n with m ≥ n use the right projector ``Vh[:r]``,
which spans n = in, else the left ``U[:, :r]``, which spans m = out.) ``optax.contrib.galore``
projects the larger side, i.e. it equals ``reverse_std`` here except for square matrices, where
it projects the input side like ``std``.

Defaults reproduce the official semantics: the SVD of the *current* gradient at steps 0, T, 2T, …
(``count % T == 0``, count starting at 0 on the first update) for every leaf; Adam moments kept
as they are (not rotated, not reset) across refreshes while the bias correction keeps counting;
``scale`` multiplies the back-projected update. The effective rank of a leaf is
``min(rank, in, out)`` because a thin SVD has no more singular vectors (the official code slices
the same thin SVD; with ``rank >= min(in, out)`` and ``std`` the projector is square orthogonal).

Opt-in improvements:

- ``refresh='staggered'``: matrix ``i`` of ``N`` (leaves in flatten order; every matrix of a
  batched leaf counts) refreshes when ``count % T == (i * T) // N``, spreading SVD cost over the
  gap (no step after step 0 refreshes more than ``ceil(N / T)`` matrices). Step 0 computes every
  projector once, since none exists yet, so a matrix with a non-zero offset refreshes twice in
  the first period.
- ``svd='randomized'``: randomized range finder (Halko, Martinsson, Tropp 2011) with
  ``oversample`` extra columns and ``power_iters`` QR-orthonormalised power iterations, then a
  small exact SVD; O(m n r) instead of O(m n min(m, n)). Random test matrices come from
  ``(seed, count, matrix index)``.
- ``moments='reproject'``: on a refresh rotate the inner moments into the new basis with
  ``R = P_newᵀ P_old`` (r × r): first moment ``m ← R m`` (along the projected side, exact for
  the projection of the old estimate), second moment ``v ← (R∘R) v`` (elementwise-squared
  rotation: an approximation that keeps ``v ≥ 0``). ``moments='reset'`` zeroes the moments of
  the refreshed matrices. The moments are found anywhere in the inner state (inside chains and
  wrappers) as NamedTuple fields ``mu`` (first moment) and ``nu`` (second moment), which covers
  :func:`scale_by_adam_hf`, ``optax.scale_by_adam``, ``optax.scale_by_lion`` …; other state
  types (e.g. quantized moments) plug in with :func:`register_moments`. An inner state with other
  per-parameter leaves (e.g. AMSGrad's ``nu_max``) or no moments is rejected at init.
- ``canonical_signs=True``: flip every singular vector so that its largest-|·| entry is
  positive, so that CPU/GPU/TPU SVDs give the same trajectory (with ``moments='keep'`` the
  trajectory after a refresh depends on the SVD's sign convention).

GoLore (He, Li, Hu, Chen, Yuan, "Subspace Optimization for Large Language Models with Convergence
Guarantees", ICML 2025, arXiv:2410.11289; code pkumelon/Golore) as ``projector='random'``::

    if t % T == 0:   P ← top-r singular vectors of G_t            while t <  random_from   (GaLore)
                     P ← Z (ZᵀZ)^(-1/2),  Z_ij ~ N(0, 1)          once  t >= random_from   (GoLore)

GaLore's SVD subspace can be dominated by gradient noise once the true gradient is small, and GaLore then
need not converge; a projector drawn uniformly from the Stiefel manifold (independent of the noise) restores
the convergence guarantee. The official recipe uses SVD for the first 80% of the steps (``--rand_ratio 0.8``,
switch step ``rand_ratio · num_training_steps``, ``rand = step >= rand_epoch`` in golore_torch/adamw.py),
``scale=1`` and rotates the first moment into each new basis while keeping the second: pass
``moments='reproject_first'``. The random projectors are orthonormal, drawn in float32 from
``(seed, t, matrix index, side)`` (see :mod:`~lowrank_jax.optim.projection`) and cast to the param
dtype; a random refresh computes no SVD. (golore_torch's ``get_random_orthogonal_matrix`` is applied to a
``Z`` of shape ``(r, n)`` for its right-side projector, whose ``ZᵀZ`` is singular for ``r < n``; here both
sides use the ``(dim, r)`` polar factor, the distribution the paper specifies.)

Robustness (always on): a refresh whose gradient or SVD is not finite keeps the previous projector
(the truncated identity before the first success) and increments ``svd_failures``.

State layout (:class:`GaLoreState`): ``count``; ``inner_state`` (on the proxy tree); ``proj_in`` /
``proj_out``: per leaf ``(*batch, in, r)`` / ``(*batch, out, r)`` in the param dtype, or
``optax.MaskedNode()`` where that side is not projected; ``last_refresh``: per leaf int32
``batch_shape`` array, the step of the last successful refresh (-1 before the first); and
``svd_failures`` (int32 total). Shapes never change between steps.

Higher-rank leaves (``dimension_numbers``): a leaf of ndim > 2 is a batch of matrices described by
:class:`GaLoreDims` axis indices; default: every leading axis is a batch axis and the last two are
(in, out), so a scanned LLaMA's ``(layers, in, out)`` kernels get one projector per layer. Use
``GaLoreDims(rows=(0,), cols=(1, 2))`` for an ``(embed, heads, head_dim)`` kernel. Refreshes are
``jax.lax.cond``\\ s, so a step that does not refresh computes no SVD; with ``refresh='all'`` a
batched leaf has one cond around a batched SVD, with ``'staggered'`` a ``jax.lax.map`` over its
matrices with a cond inside each (never a vmapped cond, which would compute both branches).

Precision: SVDs run in float32; projectors are stored in the param dtype (= the gradient dtype
in the usual case, as in the official code); projections and back-projections are matmuls in the
gradient dtype with JAX's default precision (set ``jax_default_matmul_precision`` for closer
agreement with PyTorch float32 on accelerators). Note for ``both``: at a refresh the low-rank
gradient is ``diag(σ)`` and a first Adam step with a tiny ``eps`` turns its off-diagonal rounding
noise into O(1e-2) updates — in the official code as much as here.

Differences from galore-torch (none changes the default trajectory for weight decay 0): the
projected leaves are chosen by ``mask`` (the official scripts list the attention/MLP modules, which is
:func:`galore`'s default; :func:`scale_by_galore` takes every matrix unless told); a failed SVD keeps the
previous projector instead of propagating NaNs or raising; :func:`galore` decays the weight before rather
than after the update (an O(lr²·wd) difference).

``optax.inject_hyperparams(galore)(learning_rate=…, weight_decay=…, rank=…)`` works as for ``optax.adamw``:
inject_hyperparams turns every numeric argument into an array, traced inside ``jit``; ``scale``,
``update_proj_gap``, ``seed``, ``random_from`` and ``power_iters`` may be traced, ``rank`` is read from the
state's projector shapes during updates (``init`` runs on concrete values), and ``oversample`` must be static
for ``svd='randomized'`` (``static_args=('oversample',)``). A ``mask`` given there as regexes (a string or a
tuple of strings, :func:`~lowrank_jax.optim.masks.resolve_mask`) needs nothing more; a callable mask or
``dimension_numbers`` goes in ``static_args``, since inject_hyperparams takes callables for schedules.

Code: the projection core shared with GoLore, APOLLO and Fira is :mod:`lowrank_jax.optim.projection` (plans,
projectors, refresh schedule, projection); here ``moments.py`` (:func:`register_moments`, reproject / reset) and
``transform.py`` (:class:`GaLoreState`, :func:`scale_by_galore`, :func:`galore`), ``golore.py``
(:func:`scale_by_golore`, :func:`golore`); :func:`scale_by_adam_hf` lives in
:mod:`lowrank_jax.optim.adam_hf`.
"""

from lowrank_jax.optim.adam_hf import ScaleByAdamHFState, scale_by_adam_hf
from lowrank_jax.optim.galore.golore import golore, scale_by_golore
from lowrank_jax.optim.galore.moments import MOMENT_MODES, register_moments
from lowrank_jax.optim.galore.transform import GaLoreState, galore, scale_by_galore
from lowrank_jax.optim.projection import PROJ_TYPES, PROJECTORS, REFRESH_MODES, SVD_MODES, GaLoreDims

__all__ = [
    "MOMENT_MODES",
    "PROJECTORS",
    "PROJ_TYPES",
    "REFRESH_MODES",
    "SVD_MODES",
    "GaLoreDims",
    "GaLoreState",
    "ScaleByAdamHFState",
    "galore",
    "golore",
    "scale_by_galore",
    "scale_by_golore",
    "register_moments",
    "scale_by_adam_hf",
]
