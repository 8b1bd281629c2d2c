"""GoLore: GaLore whose projectors become random once the gradient is mostly noise.

Reference: Yutong He, Pengrui Li, Yipeng Hu, Chuyan Chen, Kun Yuan, "Subspace Optimization for Large Language
Models with Convergence Guarantees", ICML 2025, arXiv:2410.11289 (official code: pkumelon/Golore).

GoLore is GaLore's update with another projector from step ``random_from`` on (the package docstring of
:mod:`lowrank_jax.optim.galore` has the algorithm box): ``P ← Z (ZᵀZ)^(-1/2)``, ``Z_ij ~ N(0, 1)``, drawn at every
refresh instead of an SVD. Defaults follow the official golore_torch code and scripts: ``scale=1``, the first moment
rotated into each new basis and the second kept (``moments='reproject_first'``), rank 128, ``update_proj_gap`` 200.
The official recipe switches after 80% of the run (``--rand_ratio 0.8``: ``random_from = 0.8 · steps``); the
optimizer does not know the run length, so ``random_from`` has no default.
"""

from __future__ import annotations

from typing import Any

import optax

from lowrank_jax.optim.complete import check_learning_rate, guard_composition
from lowrank_jax.optim.galore.transform import galore, scale_by_galore
from lowrank_jax.optim.projection import MaskOrFn


def scale_by_golore(
    rank: int = 128,
    *,
    random_from: int,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    moments: str = "reproject_first",
    base_optimizer: optax.GradientTransformation | None = None,
    mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh: str = "all",
    svd: str = "exact",
    canonical_signs: bool = False,
    power_iters: int = 2,
    oversample: int = 8,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """GoLore's scaling: :func:`~lowrank_jax.optim.galore.scale_by_galore` with ``projector='random'``.

    ``random_from``: the first step whose refresh draws a random projector (official: ``0.8 · steps``); 0 makes
    every projector random. The other keywords are ``scale_by_galore``'s.
    """
    tx = scale_by_galore(
        rank,
        random_from=random_from,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        moments=moments,
        base_optimizer=base_optimizer,
        mask=mask,
        projector="random",
        dimension_numbers=dimension_numbers,
        refresh=refresh,
        svd=svd,
        canonical_signs=canonical_signs,
        power_iters=power_iters,
        oversample=oversample,
        seed=seed,
    )
    return guard_composition(tx, "golore", complete=False)


def golore(
    learning_rate: optax.ScalarOrSchedule = None,
    *,
    random_from: int,
    rank: int = 128,
    update_proj_gap: int = 200,
    scale: float = 1.0,
    proj_type: str = "std",
    moments: str = "reproject_first",
    b1: float = 0.9,
    b2: float = 0.999,
    eps: float = 1e-6,
    weight_decay: float = 0.0,
    eight_bit: bool = False,
    mask: MaskOrFn = None,
    weight_decay_mask: MaskOrFn = None,
    dimension_numbers: Any = None,
    refresh: str = "all",
    svd: str = "exact",
    canonical_signs: bool = False,
    power_iters: int = 2,
    oversample: int = 8,
    seed: int = 0,
) -> optax.GradientTransformationExtraArgs:
    """GoLore-AdamW, complete like ``optax.adamw``: :func:`~lowrank_jax.optim.galore.galore` with random projectors
    from ``random_from`` on and GoLore's defaults (``scale=1``, ``moments='reproject_first'``).

    ``mask`` None selects the attention and MLP matrices by name; the other keywords are
    :func:`~lowrank_jax.optim.galore.galore`'s.
    """
    check_learning_rate(learning_rate, "golore")
    tx = galore(
        learning_rate,
        rank=rank,
        random_from=random_from,
        update_proj_gap=update_proj_gap,
        scale=scale,
        proj_type=proj_type,
        moments=moments,
        b1=b1,
        b2=b2,
        eps=eps,
        weight_decay=weight_decay,
        eight_bit=eight_bit,
        mask=mask,
        weight_decay_mask=weight_decay_mask,
        projector="random",
        dimension_numbers=dimension_numbers,
        refresh=refresh,
        svd=svd,
        canonical_signs=canonical_signs,
        power_iters=power_iters,
        oversample=oversample,
        seed=seed,
    )
    return guard_composition(tx, "golore", complete=True)
