"""ReLoRA: merge-and-reinit restarts, optimizer-state reset and the jagged cosine schedule.

Reference: Vladislav Lialin, Sherin Muckatira, Namrata Shivagunde, Anna Rumshisky, "ReLoRA:
High-Rank Training Through Low-Rank Updates", ICLR 2024, arXiv 2307.05695 (official code:
Guitaricet/relora).

Algorithm (every linear of attention and MLP is a :class:`~lowrank_jax.layers.lora.LoRADense`,
``y = x W + (x A) B · s`` with ``W`` frozen)::

    for t = 0 … total−1:
        lr_t   = jagged_cosine(t)                         # 0 at every restart step k·R, re-warms
        A, B  ← Adam step on the LoRA factors (and the dense embeddings / norms / lm_head)
        if t ≥ R and t ≡ 0 (mod R):                        # right after the zero-lr step k·R
            W    ← W + A B · s                             # merge: function preserved
            A    ← Kaiming-uniform (fresh key per layer),  B ← 0,  σ ← 0 (trainable scale)
            m, v ← prune(m, v) on the LoRA factors only    # keep 0.1 % (random) / top (1−p) (magnitude)

The total update ``Σ_k A_k B_k s`` is a sum of rank-``r`` terms and so reaches rank ``≫ r`` while
only ``r·(in+out)`` parameters per layer are trained and carry optimizer state.

Pure functions of the pure-dict params (``nnx.State.to_pure_dict``) and optax states, all jittable:

* :func:`merge_and_reinit` finds every LoRA layer as a dict holding the keys ``kernel``,
  ``lora_a``, ``lora_b`` (and optionally ``lora_scale``), the attribute names of
  :class:`~lowrank_jax.layers.lora.LoRADense`. With ``labels`` (the parallel pytree of Variable
  class names from :func:`lowrank_jax.models.param_labels`) it also checks that those leaves are
  ``FrozenWeight`` / ``LoRAFactor``. Stacked (``scan_layers``) leaves carry a leading ``layers``
  axis; the merge is batched over it and every layer's ``A`` is drawn from its own key.
* :func:`reset_optimizer_state` prunes the moment trees (NamedTuple fields ``mu`` / ``nu`` of e.g.
  ``optax.ScaleByAdamState``, :class:`~lowrank_jax.optim.adam_hf.ScaleByAdamHFState`,
  :class:`~lowrank_jax.optim.adam_8bit.ScaleByAdam8bitState`, found anywhere inside chains,
  ``optax.partition`` / masked states) on the leaves selected by a mask over the params (by
  default: labelled ``LoRAFactor``). The step ``count`` and every other leaf are untouched.
* :func:`jagged_cosine_schedule` is the official ``cosine_restarts`` schedule as an optax schedule.
* :func:`frozen_partition` wraps an optimizer so that ``FrozenWeight`` leaves get
  ``optax.set_to_zero()`` and no state.

Official semantics reproduced (``torchrun_main.py``, ``training_utils.py``, ``relora.py``):

* Reset modes: the official default ``reset_optimizer_on_relora`` zeroes the LoRA moments
  (``mode='zero'``); ``--optimizer_random_pruning p`` keeps entries where ``rand > p``
  (``mode='random'``; the ZeRO-compatible "reset" uses ``p = 0.999``, keeping ≈ 0.1 %);
  ``--optimizer_magnitude_pruning p`` zeroes entries with ``|x| ≤ quantile(|x|, p)``
  (``mode='magnitude'``, linear-interpolated quantile like ``torch.quantile``). Each moment tensor
  is pruned independently (``mu`` and ``nu`` draw different random masks and use their own
  thresholds). Only the ``lora_`` factors are reset; the trainable scale ``σ`` keeps its moments.
  :func:`reset_optimizer_state` defaults to ``mode='random', ratio=0.999`` (the recipe's
  "keep 0.1 %"), which differs from a full zeroing only in the ≈ 0.1 % of entries kept.
* Timing: the official loop merges when ``update_step % R == 1`` (after ``R+1, 2R+1, …`` updates),
  i.e. right after the update that used the schedule's zero learning rate at index ``k·R``.
* Merge with a trainable scale uses ``tanh(σ)`` then sets ``σ = 0``. Note that with ``σ = 0`` and
  ``B = 0`` every factor gradient is zero (``∂/∂B ∝ tanh σ``, ``∂/∂σ ∝ B``, ``∂/∂A ∝ B``): learning
  resumes only through ``σ``'s (unreset) Adam momentum. ``scale_reset`` changes the reset value.

8-bit moments (:class:`~lowrank_jax.optim.adam_8bit.QuantizedArray` leaves) are dequantized,
pruned in float32 and requantized with the same map and block size: pruned entries are exactly 0
(code 0), kept entries are re-rounded against the possibly smaller new block absmax (error within
one quantization step). ``mode='zero'`` is exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax

from lowrank_jax.layers.lora import KERNEL, LORA_A, LORA_B, LORA_SCALE, kaiming_uniform, lora_scale_of, lora_weight
from lowrank_jax.optim.adam_8bit import QuantizedArray, dequantize, quantize
from lowrank_jax.optim.checks import check_choice, check_real, static_int
from lowrank_jax.optim.tree import find_namedtuples, map_namedtuples

RESET_MODES = ("random", "magnitude", "zero", "none")
FROZEN_LABEL = "FrozenWeight"
FACTOR_LABEL = "LoRAFactor"
MOMENT_FIELDS = ("mu", "nu")

Path = tuple[Hashable, ...]


# --------------------------------------------------------------------------------------------
# Argument checks (the numeric ones are shared: lowrank_jax.optim.checks)
# --------------------------------------------------------------------------------------------


def _as_key(key: Any) -> jax.Array:
    """A typed PRNG key from a typed key or raw ``uint32[2]`` key data (``TrainState.rng``)."""
    if key is None:
        raise ValueError("key: a PRNG key is required")
    key = jnp.asarray(key) if not isinstance(key, jax.Array) else key
    if jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return key
    if key.dtype == jnp.uint32 and key.shape[-1:] == (2,):
        return jax.random.wrap_key_data(key)
    raise ValueError(f"key: expected a PRNG key or uint32[2] key data, got {key.dtype}{key.shape}")


# --------------------------------------------------------------------------------------------
# Locating LoRA layers in pure-dict params
# --------------------------------------------------------------------------------------------


def _is_array_like(x: Any) -> bool:
    return hasattr(x, "shape") and hasattr(x, "dtype")


def find_lora_layers(params: Any, labels: Any | None = None) -> list[Path]:
    """Paths (tuples of dict keys) of every dict holding ``kernel``, ``lora_a`` and ``lora_b`` arrays.

    Order is deterministic (keys sorted by ``str``). With ``labels`` (same structure, Variable class
    names) each found layer must be labelled ``FrozenWeight`` / ``LoRAFactor`` / ``LoRAFactor``.
    """
    found: list[Path] = []

    def visit(node: Any, lab: Any, path: Path) -> None:
        if not isinstance(node, dict):
            return
        if all(k in node and _is_array_like(node[k]) for k in (KERNEL, LORA_A, LORA_B)):
            if labels is not None:
                got = tuple(lab.get(k) if isinstance(lab, dict) else None for k in (KERNEL, LORA_A, LORA_B))
                if got != (FROZEN_LABEL, FACTOR_LABEL, FACTOR_LABEL):
                    raise ValueError(
                        f"labels: LoRA layer at {'/'.join(map(str, path))} is labelled {got}, expected "
                        f"({FROZEN_LABEL!r}, {FACTOR_LABEL!r}, {FACTOR_LABEL!r})"
                    )
            found.append(path)
            return
        for k in sorted(node, key=str):
            visit(node[k], lab.get(k) if isinstance(lab, dict) else None, (*path, k))

    visit(params, labels, ())
    return found


def _copy_dicts(tree: Any) -> Any:
    return {k: _copy_dicts(v) for k, v in tree.items()} if isinstance(tree, dict) else tree


def _get(tree: Any, path: Path) -> Any:
    for k in path:
        tree = tree[k]
    return tree


def _reinit_factor(key: jax.Array, a: jax.Array) -> jax.Array:
    """Fresh Kaiming-uniform ``A`` shaped like ``a``; each leading (stacked-layer) index gets its own key."""
    batch = a.shape[:-2]
    if not batch:
        return kaiming_uniform(key, a.shape, a.dtype)
    keys = jax.random.split(key, math.prod(batch))
    new = jax.vmap(lambda k: kaiming_uniform(k, a.shape[-2:], a.dtype))(keys)
    return new.reshape(a.shape)


def merge_and_reinit(
    params: Any,
    key: Any,
    *,
    alpha_over_rank: float,
    labels: Any | None = None,
    scale_reset: float = 0.0,
) -> Any:
    """ReLoRA restart on pure-dict params: ``W += A B · s``; ``A`` Kaiming-uniform; ``B = 0``; ``σ = scale_reset``.

    Args:
      params: the model's pure-dict params (``split_model(model)[1]``); not modified.
      key: PRNG key (typed, or ``uint32[2]`` key data); layer ``i`` (in :func:`find_lora_layers`
        order) uses ``fold_in(key, i)``, split once more per stacked layer.
      alpha_over_rank: the fixed scale ``s = alpha / rank`` of layers without ``lora_scale``;
        layers with a trainable scale use ``tanh(lora_scale)`` instead.
      labels: optional parallel pytree of Variable class names (``param_labels(cfg)``) to check.
      scale_reset: value the raw trainable scale ``σ`` is set to (official: 0.0).

    Returns:
      New params; the network function is unchanged up to float rounding (``B = 0`` afterwards).
      The merge is computed in float32 and cast back to ``W``'s dtype.
    """
    check_real(alpha_over_rank, "alpha_over_rank")
    check_real(scale_reset, "scale_reset")
    key = _as_key(key)
    paths = find_lora_layers(params, labels)
    if not paths:
        raise ValueError(
            f"params: no LoRA layers found (dicts with {KERNEL!r}, {LORA_A!r}, {LORA_B!r}); build the model with "
            "model.dense=lora"
        )
    out = _copy_dicts(params)
    for i, path in enumerate(paths):
        node = _get(out, path)
        w, a, b = node[KERNEL], node[LORA_A], node[LORA_B]
        s = lora_scale_of(node, alpha_over_rank)
        node[KERNEL] = lora_weight(w, a, b, s).astype(w.dtype)  # the layer's effective weight
        node[LORA_A] = _reinit_factor(jax.random.fold_in(key, i), a)
        node[LORA_B] = jnp.zeros_like(b)
        if LORA_SCALE in node:
            node[LORA_SCALE] = jnp.full_like(node[LORA_SCALE], scale_reset)
    return out


# --------------------------------------------------------------------------------------------
# Optimizer-state reset
# --------------------------------------------------------------------------------------------


def _resolve_mask(labels_or_mask: Any, factor_labels: Sequence[str]) -> Any:
    """Bool pytree over the params: True where the leaf's moments are reset."""

    def one(x: Any) -> bool:
        if isinstance(x, str):
            return x in factor_labels
        if isinstance(x, bool | np.bool_):
            return bool(x)
        raise ValueError(f"labels_or_mask: leaves must be Variable class names (str) or bools, got {x!r}")

    return jax.tree.map(one, labels_or_mask)


def _prune(x: jax.Array, key: jax.Array | None, mode: str, ratio: float) -> jax.Array:
    """Prune one float moment tensor (any dtype; decisions in float32)."""
    if mode == "zero":
        return jnp.zeros_like(x)
    if mode == "random":
        keep = jax.random.uniform(key, x.shape, jnp.float32) > ratio
    else:  # magnitude, per matrix (per stacked layer): keep |x| > quantile(|x|, ratio)
        mag = jnp.abs(x.astype(jnp.float32))
        flat = mag.reshape(*x.shape[:-2], -1) if x.ndim >= 2 else mag.reshape(1, -1)
        thresh = jnp.quantile(flat, ratio, axis=-1, keepdims=True)
        keep = (flat > thresh).reshape(x.shape)
    return jnp.where(keep, x, jnp.zeros_like(x))


def _prune_leaf(x: Any, selected: bool, key: jax.Array | None, mode: str, ratio: float) -> Any:
    if not selected:
        return x
    if isinstance(x, QuantizedArray):
        return quantize(_prune(dequantize(x), key, mode, ratio), x.signed, x.block_size)
    if isinstance(x, jax.Array | np.ndarray) and jnp.issubdtype(x.dtype, jnp.floating):
        return _prune(x, key, mode, ratio)
    return x  # MaskedNode, None, ...


def reset_optimizer_state(
    opt_state: Any,
    labels_or_mask: Any,
    mode: str = "random",
    ratio: float = 0.999,
    key: Any | None = None,
    *,
    factor_labels: Sequence[str] = (FACTOR_LABEL,),
    fields: Sequence[str] = MOMENT_FIELDS,
) -> Any:
    """Prune the moments of the LoRA factors in ``opt_state`` (ReLoRA's partial optimizer reset).

    Args:
      opt_state: any optax state; every NamedTuple with fields in ``fields`` (default ``mu``, ``nu``)
        is treated as holding moment trees that mirror the params (leaves may be
        ``optax.MaskedNode`` under ``optax.partition``, or 8-bit ``QuantizedArray``).
      labels_or_mask: params-shaped pytree of Variable class names (leaves in ``factor_labels`` are
        reset) or of bools (True: reset).
      mode: ``'random'`` keep an entry iff ``U(0,1) > ratio`` (independent draw per moment tensor);
        ``'magnitude'`` keep iff ``|x| > quantile(|x|, ratio)`` per matrix (per layer when stacked),
        i.e. the top ``1 − ratio``; ``'zero'`` zero them all (``ratio`` unused); ``'none'`` keep them
        all (restarts without optimizer reset, the paper's ablation; the state is returned as is).
      ratio: fraction pruned, in [0, 1]; default 0.999 (the official ZeRO-compatible reset).
      key: PRNG key, required for ``'random'``; moment tree ``j`` and leaf ``i`` use
        ``fold_in(fold_in(key, j), i)``.

    Returns:
      The state with the selected moment leaves pruned; counts and all other leaves unchanged.
    """
    check_choice(mode, "mode", RESET_MODES)
    check_real(ratio, "ratio", lo=0.0, hi=1.0)
    if mode == "none":
        return opt_state
    if mode == "random":
        key = _as_key(key)
    mask = _resolve_mask(labels_or_mask, factor_labels)
    mask_leaves, mask_def = jax.tree.flatten(mask)
    n_trees = [0]

    def prune_tree(tree: Any) -> Any:
        try:
            subtrees = mask_def.flatten_up_to(tree)
        except (ValueError, TypeError) as err:
            raise ValueError(f"opt_state: a moment tree is not shaped like labels_or_mask ({err})") from err
        tree_key = jax.random.fold_in(key, n_trees[0]) if mode == "random" else None
        n_trees[0] += 1
        new = [
            _prune_leaf(x, m, None if tree_key is None else jax.random.fold_in(tree_key, i), mode, ratio)
            for i, (x, m) in enumerate(zip(subtrees, mask_leaves, strict=True))
        ]
        return mask_def.unflatten(new)

    out = map_namedtuples(opt_state, lambda nt: {f: prune_tree(getattr(nt, f)) for f in nt._fields if f in fields})
    if n_trees[0] == 0:
        raise ValueError(f"opt_state: no moment fields {tuple(fields)} found in the optimizer state")
    return out


# --------------------------------------------------------------------------------------------
# Jagged cosine schedule
# --------------------------------------------------------------------------------------------


def jagged_cosine_schedule(
    peak: float,
    warmup: int,
    restart_every: int,
    restart_warmup: int,
    total: int,
    min_ratio: float = 0.1,
    first_restart: int | None = None,
) -> optax.Schedule:
    """Global cosine with linear warmup, dropping to 0 and re-warming at every ReLoRA restart.

    With ``f(t) = peak·(m + (1 − m)·½(1 + cos(π·clip((t − warmup)/(total − warmup), 0, 1))))``,
    ``m = min_ratio``, ``R = restart_every``, ``Wr = restart_warmup``, ``F = first_restart`` (default
    ``R``), ``k = (t − F) // R``, ``j = (t − F) mod R``::

        lr(t) = peak · t / warmup                 t < warmup
              = (j / Wr) · f(F + k·R + Wr)         t ≥ F and j < Wr    (0 at every restart t = F + k·R)
              = f(t)                               otherwise

    ``first_restart`` moves the restarts to ``F, F + R, …``: with a full-rank warm start of ``N``
    steps (``F = N``) the switch to LoRA is the first restart and the steps before it follow the
    plain warmup + cosine.

    The re-warm ramps linearly to the curve's value at the end of the re-warm, joining the global
    cosine continuously (official ``_get_cosine_schedule_with_multiple_warmups_lambda`` with
    ``adjust_step=0``). After ``total`` the curve stays at ``m·peak`` (the official lambda would
    rise again). Unlike the official code, ``total`` need not be a multiple of ``restart_every``.
    """
    why = "it shapes the schedule"
    check_real(peak, "peak", lo=0.0, lo_open=True)
    warmup = static_int(warmup, "warmup", why, lo=0)
    restart_every = static_int(restart_every, "restart_every", why, lo=1)
    restart_warmup = static_int(restart_warmup, "restart_warmup", why, lo=1)
    total = static_int(total, "total", why, lo=1)
    check_real(min_ratio, "min_ratio", lo=0.0, hi=1.0)
    if restart_warmup >= restart_every:
        raise ValueError(f"restart_warmup: must be < restart_every={restart_every}, got {restart_warmup}")
    if warmup > total:
        raise ValueError(f"warmup: must be <= total={total}, got {warmup}")
    first = restart_every if first_restart is None else static_int(first_restart, "first_restart", why, lo=1)
    if warmup > first:
        raise ValueError(f"warmup: the first restart (step {first}) would come before the warmup ends")
    peak, min_ratio = float(peak), float(min_ratio)
    decay_len = float(max(1, total - warmup))

    def curve(t: jax.Array) -> jax.Array:
        progress = jnp.clip((t - warmup) / decay_len, 0.0, 1.0)
        return peak * (min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + jnp.cos(jnp.pi * progress)))

    def schedule(count: jax.Array | int) -> jax.Array:
        c = jnp.asarray(count, jnp.int32)
        k, j = (c - first) // restart_every, (c - first) % restart_every
        t = c.astype(jnp.float32)
        warm = peak * t / float(max(1, warmup))
        rewarm_end = (first + k * restart_every + restart_warmup).astype(jnp.float32)
        rewarm = j.astype(jnp.float32) / restart_warmup * curve(rewarm_end)
        lr = jnp.where((c >= first) & (j < restart_warmup), rewarm, curve(t))
        return jnp.where(c < warmup, warm, lr).astype(jnp.float32)

    return schedule


# --------------------------------------------------------------------------------------------
# Optimizer plumbing
# --------------------------------------------------------------------------------------------


def frozen_partition(
    tx: optax.GradientTransformation,
    labels: Any | Callable[[Any], Any],
    *,
    frozen_labels: Sequence[str] = (FROZEN_LABEL,),
) -> optax.GradientTransformation:
    """``tx`` on every leaf except those labelled ``FrozenWeight``, which get ``optax.set_to_zero()``.

    ``labels``: params-shaped pytree of Variable class names (``param_labels(cfg)``) or a function
    params → such a pytree. Built with ``optax.partition``, so ``tx``'s state holds
    ``optax.MaskedNode`` (no arrays) for frozen leaves: optimizer memory is that of the trainable
    params only. The frozen weights still get an all-zero update (no change).
    """

    def group(tree: Any) -> Any:
        return jax.tree.map(lambda lab: "frozen" if lab in frozen_labels else "trainable", tree)

    param_groups = (lambda params: group(labels(params))) if callable(labels) else group(labels)
    return optax.partition({"trainable": tx, "frozen": optax.set_to_zero()}, param_groups)


def relora_restart(
    params: Any,
    opt_state: Any,
    key: Any,
    *,
    labels: Any,
    alpha_over_rank: float,
    reset_mode: str = "random",
    reset_ratio: float = 0.999,
    scale_reset: float = 0.0,
) -> tuple[Any, Any]:
    """One ReLoRA restart: :func:`merge_and_reinit` then :func:`reset_optimizer_state` on the factors.

    ``labels`` is ``param_labels(cfg)``. Returns ``(params, opt_state)``. Jittable (``labels``,
    ``reset_mode`` static via closure / ``functools.partial``).
    """
    key = _as_key(key)
    k_merge, k_reset = jax.random.split(key)
    params = merge_and_reinit(params, k_merge, alpha_over_rank=alpha_over_rank, labels=labels, scale_reset=scale_reset)
    opt_state = reset_optimizer_state(opt_state, labels, reset_mode, reset_ratio, k_reset)
    return params, opt_state


# --------------------------------------------------------------------------------------------
# Full-rank warm start
# --------------------------------------------------------------------------------------------


def _copy_matching(dst: Any, src: Any) -> Any:
    """``dst`` with every leaf replaced by ``src``'s leaf at the same key path, where that leaf has its shape/dtype."""
    by_path = {path: leaf for path, leaf in jax.tree_util.tree_flatten_with_path(src)[0]}

    def pick(path: Any, x: Any) -> Any:
        y = by_path.get(path)
        return y if y is not None and y.shape == x.shape and y.dtype == x.dtype else x

    return jax.tree_util.tree_map_with_path(pick, dst)


def warm_start_to_lora(
    dense_params: Any,
    dense_opt_state: Any,
    lora_params: Any,
    lora_opt_state: Any,
    *,
    fields: Sequence[str] = MOMENT_FIELDS,
) -> tuple[Any, Any]:
    """Switch a full-rank run to ReLoRA, carrying the trained weights and optimizer state over.

    ReLoRA's warm start (paper §3: a short full-rank phase, then LoRA with restarts) as a pure
    function of four pytrees: the full-rank run's params and optimizer state, and a freshly
    initialised LoRA model's params and optimizer state (``tx.init`` of the LoRA optimizer).

    * Params: every LoRA-model leaf whose key path exists in ``dense_params`` with the same shape
      and dtype takes the trained value. That is each frozen ``kernel`` (the dense kernel becomes
      ``W``), the embeddings, norms and ``lm_head``; the new factors ``lora_a`` (Kaiming) and
      ``lora_b`` (zeros) keep their initialisation, so the network function is unchanged.
    * Optimizer state: the ``k``-th NamedTuple with moment fields (``mu``/``nu``) in the LoRA state
      receives the moments of the ``k``-th one in the dense state at matching key paths (the dense
      leaves' Adam moments carry over; the factors' moments stay at their initial zeros; frozen
      weights have no state). Every ``count`` field is set to the dense state's count, so bias
      correction and the schedule continue from the warm-start step exactly as at a ReLoRA restart
      with the factors' moments reset.

    Returns ``(params, opt_state)`` shaped like ``lora_params`` / ``lora_opt_state``. Jittable.
    """
    params = _copy_matching(lora_params, dense_params)
    src_nodes, dst_nodes = find_namedtuples(dense_opt_state, fields[0]), find_namedtuples(lora_opt_state, fields[0])
    if len(src_nodes) != len(dst_nodes) or not dst_nodes:
        raise ValueError(
            f"dense_opt_state: {len(src_nodes)} moment trees ({fields[0]!r}) but lora_opt_state has "
            f"{len(dst_nodes)}; both must come from the same optimizer"
        )
    counts = find_namedtuples(dense_opt_state, "count")
    if not counts:
        raise ValueError("dense_opt_state: no 'count' field found")
    count = counts[0].count
    sources = iter(src_nodes)

    def visit(nt: Any) -> dict[str, Any]:
        new = {}
        if fields[0] in nt._fields:
            src = next(sources)
            new = {f: _copy_matching(getattr(nt, f), getattr(src, f)) for f in fields if f in nt._fields}
        if "count" in nt._fields:
            new["count"] = jnp.asarray(count, jnp.asarray(nt.count).dtype)
        return new

    return params, map_namedtuples(lora_opt_state, visit)
