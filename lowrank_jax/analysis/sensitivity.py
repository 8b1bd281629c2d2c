"""Parameter sensitivity: the validation-loss increase under a Gaussian perturbation of the weights.

Springer, Goyal, Wen, Kumar, Yue, Malladi, Neubig, Raghunathan, "Overtrained Language Models Are
Harder to Fine-Tune", ICML 2025, arXiv 2503.19206, §3 ("progressive sensitivity"): perturb every
parameter tensor ``θ_i`` of a pretrained model with Gaussian noise drawn from its initialisation
distribution scaled by ``λ``, and measure how much the validation loss rises:

    θ̃_i = θ_i + λ · σ_i · z_i,   z_i ~ N(0, I)          sensitivity(λ) = E_z[L(θ̃)] − L(θ)

with ``σ_i`` the standard deviation of tensor ``i`` at initialisation. The paper finds that for a
fixed ``λ`` the sensitivity grows monotonically with the pretraining token budget. This module
estimates ``E_z`` by averaging over ``n_seeds`` draws and reports, per ``λ``, the mean increase, its
sample standard deviation, a 95% Student-t confidence band for the mean and the per-seed values.

Choices (documented because the paper gives no code):

* **Initialisation std** (``relative="init"``, the paper's protocol): measured from a freshly built
  model of the same config — the std over all entries of each leaf (a stacked ``(layers, in, out)``
  leaf holds ``layers`` tensors drawn from one distribution, so one std serves them all). Tensors
  initialised to a constant (RMSNorm scales = 1, LoRA ``B`` = 0) have init std 0 and are therefore
  *not perturbed*: that is what "noise with the init covariance" means for them.
* ``relative="rms"``: ``σ_i`` is the RMS of the perturbed (trained) tensor itself, per layer for
  stacked leaves, so norms are perturbed too (noise proportional to their size).
* **Factorised layers** (``parameterisation="effective"``, the default): the noise is added to the
  *effective* weight of every linear, never to the factors, so methods are compared on the same
  function class — LoRA/ReLoRA ``W + A B s``, low-rank ``A B``, SLTrain ``A B s + S``. The model is
  first *densified* (every factorised layer replaced by a plain kernel holding its effective
  weight; :func:`densify`) and evaluated with the dense model of the same architecture, whose fresh
  initialisation also supplies ``σ_i``. Every method is thus perturbed with the same noise law on the
  same effective weights, which is what a comparison at equal tokens needs. Each layer kind defines
  its effective weight next to the layer (:func:`lowrank_jax.layers.register_effective_weight`:
  a dense kind maps the key set of its layer's param dict to a function returning the
  ``(..., in, out)`` effective weight), the same definition ReLoRA's merge uses. A kind with no rule raises a
  ``ValueError`` naming ``model_cfg.dense``; ``parameterisation="native"`` then perturbs each stored
  tensor of the model as it is (σ from the kind's own init) and evaluates with the model itself —
  the right choice for quantised kinds such as BitLinear, whose latent weights pass through the
  quantiser in the forward pass.
* **Common random numbers**: seed ``j`` uses the same standard normal draws ``z`` for every ``λ``
  (and for every checkpoint given the same ``key``), so curves over ``λ`` and over budgets are
  paired comparisons. Leaf ``k`` (in ``jax.tree`` leaf order) of seed ``j`` draws
  ``z = jax.random.normal(jax.random.fold_in(keys[j], k), shape, float32)`` with
  ``keys = jax.random.split(key, n_seeds)``; integer leaves (SLTrain's support) are never touched.
* ``λ = 0`` evaluates exactly the clean parameters through the same compiled function, so its
  sensitivity is exactly 0.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.layers.dense import effective_weight_kinds, effective_weight_rules
from lowrank_jax.models import abstract_params, build_model, split_model

RELATIVE = ("init", "rms")
PARAMETERISATIONS = ("effective", "native")

# ---------------------------------------------------------------------------------------------
# Densify: factorised layers seen through their effective weights (the rules live with the layers)


def densify(params: Mapping[str, Any], model_cfg: Any) -> tuple[dict[str, Any], Any]:
    """``(dense_params, dense_cfg)``: every factorised layer under ``blocks`` replaced by ``{"kernel": W_eff}``.

    ``dense_cfg`` is ``model_cfg`` with ``dense="dense"``; ``dense_params`` has exactly the structure
    of that model's params (checked), so ``nnx.merge`` of the dense model's graphdef with it computes
    ``x @ W_eff`` in every linear. Raises ``ValueError`` naming ``model_cfg.dense`` for a kind with no
    registered rule.
    """
    kind = model_cfg.dense
    rules = effective_weight_rules(kind)
    if not rules:
        raise ValueError(
            f"model_cfg.dense: no effective-weight rule for dense kind {kind!r} (registered: "
            f"{', '.join(effective_weight_kinds())}); register one with register_effective_weight or use "
            "parameterisation='native'"
        )

    def walk(node: Any) -> Any:
        if isinstance(node, Mapping):
            keys = frozenset(node)
            for rule in rules:
                if keys == rule.keys:
                    return {"kernel": rule.weight(node, model_cfg).astype(jnp.float32)}
            return {k: walk(v) for k, v in node.items()}
        return node

    if "blocks" not in params:
        raise ValueError("params: expected a LLaMA param dict with a 'blocks' entry")
    out = {k: (walk(v) if k == "blocks" else v) for k, v in params.items()}
    dense_cfg = dataclasses.replace(model_cfg, dense="dense")
    _, want = abstract_params(dense_cfg)
    got_def, want_def = jax.tree.structure(out), jax.tree.structure(want)
    if got_def != want_def:
        raise ValueError(
            f"model_cfg.dense: the {kind!r} layers did not densify into the dense model's structure "
            f"({got_def} vs {want_def})"
        )
    for g, w in zip(jax.tree.leaves(out), jax.tree.leaves(want), strict=True):
        if tuple(g.shape) != tuple(w.shape):
            raise ValueError(f"model_cfg: densified leaf shape {g.shape} differs from the dense model's {w.shape}")
    out = jax.tree.map(lambda g, w: jnp.asarray(g).astype(w.dtype), out, want)
    return out, dense_cfg


# ---------------------------------------------------------------------------------------------
# Per-tensor noise scales


def leaf_std(tree: Any) -> Any:
    """Std over all entries of every floating leaf (0 for constant leaves); ``None`` for integer leaves."""

    def one(x):
        x = np.asarray(x)
        if not np.issubdtype(x.dtype, np.floating):
            return None
        return float(np.std(x.astype(np.float64)))

    return jax.tree.map(one, tree)


def init_std_tree(model_cfg: Any, key: int | jax.Array = 0) -> dict[str, Any]:
    """Per-leaf initialisation std of a freshly built model of ``model_cfg`` (see the module docstring)."""
    _, params = split_model(build_model(model_cfg, key))
    return leaf_std(params)


def _rms_tree(params: Any, stacked: Any) -> Any:
    """RMS of every floating leaf; per leading slice where ``stacked`` is True (stacked layers)."""

    def one(x, st):
        if not jnp.issubdtype(x.dtype, jnp.floating):
            return None
        x32 = x.astype(jnp.float32)
        if st and x.ndim >= 2:
            axes = tuple(range(1, x.ndim))
            return jnp.sqrt(jnp.mean(x32 * x32, axis=axes)).reshape((-1,) + (1,) * (x.ndim - 1))
        return jnp.sqrt(jnp.mean(x32 * x32))

    return jax.tree.map(one, params, stacked)


def _stacked_tree(params: Mapping[str, Any], scan_layers: bool) -> Any:
    return {k: jax.tree.map(lambda _, flag=bool(scan_layers and k == "blocks"): flag, v) for k, v in params.items()}


def perturb(params: Any, scales: Any, key: jax.Array, lam: float | jax.Array) -> Any:
    """``θ + λ·σ·z`` leaf by leaf: leaf ``k`` draws ``z`` from ``fold_in(key, k)``; ``None`` scales keep the leaf."""
    leaves, treedef = jax.tree.flatten(params)
    scale_leaves = treedef.flatten_up_to(scales)
    out = []
    for k, (x, s) in enumerate(zip(leaves, scale_leaves, strict=True)):
        if s is None or not jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating):
            out.append(x)
            continue
        z = jax.random.normal(jax.random.fold_in(key, k), jnp.shape(x), jnp.float32)
        out.append((x.astype(jnp.float32) + lam * jnp.asarray(s, jnp.float32) * z).astype(x.dtype))
    return jax.tree.unflatten(treedef, out)


_perturb_jit = jax.jit(perturb)  # one compile per params structure, shared by every call


# ---------------------------------------------------------------------------------------------
# The table


@dataclass(frozen=True)
class SensitivityRow:
    lam: float
    mean: float  # mean loss increase over seeds (nats/token)
    std: float | None  # sample std over seeds (ddof=1); None with one seed
    ci95: tuple[float, float] | None  # Student-t 95% band of the mean; None with one seed
    per_seed: tuple[float, ...]
    perturbed_loss: float  # clean_loss + mean


@dataclass(frozen=True)
class SensitivityTable:
    clean_loss: float
    rows: tuple[SensitivityRow, ...]
    n_seeds: int
    relative: str
    parameterisation: str
    eval_tokens: int
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, lam: float) -> SensitivityRow:
        for r in self.rows:
            if r.lam == lam:
                return r
        raise KeyError(f"lambda {lam} not in the table ({[r.lam for r in self.rows]})")

    def to_dict(self) -> dict[str, Any]:
        return {
            "clean_loss": self.clean_loss,
            "n_seeds": self.n_seeds,
            "relative": self.relative,
            "parameterisation": self.parameterisation,
            "eval_tokens": self.eval_tokens,
            "rows": [
                {
                    "lambda": r.lam,
                    "mean_increase": r.mean,
                    "std": r.std,
                    "ci95_low": r.ci95[0] if r.ci95 else None,
                    "ci95_high": r.ci95[1] if r.ci95 else None,
                    "per_seed": list(r.per_seed),
                    "perturbed_loss": r.perturbed_loss,
                }
                for r in self.rows
            ],
            **self.extra,
        }


def t_quantile_975(dof: int) -> float:
    """The 0.975 quantile of Student's t with ``dof`` degrees of freedom."""
    from scipy.stats import t

    return float(t.ppf(0.975, dof))


def summarise(lam: float, clean: float, values: Sequence[float]) -> SensitivityRow:
    v = np.asarray(values, dtype=np.float64)
    mean = float(v.mean())
    if v.size < 2:
        return SensitivityRow(float(lam), mean, None, None, tuple(float(x) for x in v), clean + mean)
    std = float(v.std(ddof=1))
    half = t_quantile_975(v.size - 1) * std / math.sqrt(v.size)
    return SensitivityRow(float(lam), mean, std, (mean - half, mean + half), tuple(float(x) for x in v), clean + mean)


def _check_args(lambdas: Any, n_seeds: Any, relative: str, parameterisation: str) -> list[float]:
    if isinstance(n_seeds, bool) or not isinstance(n_seeds, int) or n_seeds < 1:
        raise ValueError(f"n_seeds: must be a positive integer, got {n_seeds!r}")
    try:
        lams = [float(x) for x in lambdas]
    except TypeError:
        raise ValueError(f"lambdas: must be a sequence of numbers, got {lambdas!r}") from None
    if not lams:
        raise ValueError("lambdas: must not be empty")
    if any(not math.isfinite(x) or x < 0 for x in lams):
        raise ValueError(f"lambdas: must be finite and >= 0, got {lams}")
    if relative not in RELATIVE:
        raise ValueError(f"relative: must be one of {RELATIVE}, got {relative!r}")
    if parameterisation not in PARAMETERISATIONS:
        raise ValueError(f"parameterisation: must be one of {PARAMETERISATIONS}, got {parameterisation!r}")
    return lams


def _check_data(data: Any) -> list[np.ndarray]:
    batches = [data] if isinstance(data, (np.ndarray, jax.Array)) else list(data)
    if not batches:
        raise ValueError("data: needs at least one batch")
    out = []
    for b in batches:
        b = np.asarray(b)
        if b.ndim != 2 or b.shape[1] < 2 or not np.issubdtype(b.dtype, np.integer):
            raise ValueError(f"data: batches must be int token arrays (batch, seq_len + 1), got {b.dtype} {b.shape}")
        out.append(b.astype(np.int32))
    return out


@functools.lru_cache(maxsize=16)
def lm_loss_fn(graphdef: Any) -> Callable[[Any, jax.Array], tuple[jax.Array, jax.Array]]:
    """``(params, tokens (B, T+1)) -> (sum of next-token NLL, token count)`` for the LLaMA ``graphdef``."""
    from flax import nnx

    def fn(params, batch):
        logits = nnx.merge(graphdef, params)(batch[:, :-1])
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        nll = -jnp.take_along_axis(logp, batch[:, 1:, None], axis=-1)
        return jnp.sum(nll), jnp.asarray(nll.size, jnp.float32)

    return fn


def sensitivity_core(
    params: Any,
    batches: Sequence[Any],
    loss_sum_fn: Callable[[Any, Any], tuple[jax.Array, jax.Array]],
    scales_fn: Callable[[Any], Any],
    lambdas: Sequence[float],
    n_seeds: int,
    key: jax.Array,
) -> tuple[float, list[list[float]], int]:
    """Clean loss, ``deltas[λ][seed]`` and the number of scored tokens, for any model.

    ``loss_sum_fn(params, batch) -> (sum, count)``; ``scales_fn(params)`` gives the per-leaf ``σ``
    pytree (``None`` leaves are not perturbed). The loss is ``Σ sum / Σ count`` over ``batches``.
    """
    eval_one = jax.jit(loss_sum_fn)

    def make(p, k, lam):
        return _perturb_jit(p, scales_fn(p), k, lam)

    def loss(p) -> tuple[float, int]:
        total, count = 0.0, 0.0
        for b in batches:
            s, n = eval_one(p, b)
            total += float(s)
            count += float(n)
        return total / count, int(count)

    # The clean loss goes through the same compiled perturbation at λ = 0: exactly the clean params.
    clean, tokens = loss(make(params, key, jnp.float32(0.0)))
    keys = jax.random.split(key, n_seeds)
    deltas = [[loss(make(params, keys[j], jnp.float32(lam)))[0] - clean for j in range(n_seeds)] for lam in lambdas]
    return clean, deltas, tokens


def parameter_sensitivity(
    model_state: Any,
    data: Any,
    lambdas: Sequence[float],
    n_seeds: int,
    key: jax.Array,
    *,
    model_cfg: Any = None,
    relative: str = "init",
    parameterisation: str = "effective",
    loss_fn: Callable[[Any, Any], tuple[jax.Array, jax.Array]] | None = None,
    init_std: Any = None,
    init_key: int | jax.Array = 0,
) -> SensitivityTable:
    """Mean validation-loss increase under ``θ_i + λ σ_i z_i`` for each ``λ`` (see the module docstring).

    ``model_state``: a ``TrainState`` (its ``params`` are used) or a params pytree. ``data``: token
    batches ``(B, T+1)`` (a list, or one array). For a LLaMA pass ``model_cfg`` (a ``ModelConfig``);
    for any other model pass ``loss_fn(params, batch) -> (NLL sum, count)`` and ``init_std`` (a
    pytree of per-leaf init stds, ``None`` for leaves never perturbed; needed with ``relative="init"``);
    such a model is perturbed as stored and the table records ``parameterisation="native"``.
    """
    lams = _check_args(lambdas, n_seeds, relative, parameterisation)
    batches = [jnp.asarray(b) for b in _check_data(data)]
    params = getattr(model_state, "params", model_state)
    if not isinstance(key, jax.Array):
        raise ValueError(f"key: must be a jax PRNG key, got {type(key).__name__}")
    extra: dict[str, Any] = {}
    if loss_fn is not None:
        if model_cfg is not None:
            raise ValueError("model_cfg: pass either model_cfg (LLaMA) or loss_fn (any model), not both")
        if relative == "init" and init_std is None:
            raise ValueError("init_std: needed with loss_fn and relative='init'")
        parameterisation = "native"  # a generic model has no factorisation to see through: perturbed as stored
        fn = loss_fn
        stacked = jax.tree.map(lambda _: False, params)
        stds = init_std
    else:
        if model_cfg is None:
            raise ValueError("model_cfg: needed for a LLaMA model (or pass loss_fn)")
        if parameterisation == "effective":
            params, eval_cfg = densify(params, model_cfg)
        else:
            eval_cfg = model_cfg
        graphdef, _ = abstract_params(eval_cfg)
        fn = lm_loss_fn(graphdef)
        stacked = _stacked_tree(params, eval_cfg.scan_layers)
        stds = init_std if init_std is not None else (init_std_tree(eval_cfg, init_key) if relative == "init" else None)
        extra["eval_dense_kind"] = eval_cfg.dense
        extra["model_dense_kind"] = model_cfg.dense

    if relative == "init":
        treedef = jax.tree.structure(params)
        std_leaves = treedef.flatten_up_to(stds)
        if len(std_leaves) != treedef.num_leaves:  # pragma: no cover - flatten_up_to checks this
            raise ValueError("init_std: structure differs from the params")
        fixed = jax.tree.unflatten(treedef, [None if (s is None or s == 0.0) else float(s) for s in std_leaves])

        def scales_fn(_p):
            return fixed

    else:

        def scales_fn(p):
            return _rms_tree(p, stacked)  # eager: a few reductions per call, outside the compiled perturbation

    clean, deltas, tokens = sensitivity_core(params, batches, fn, scales_fn, lams, n_seeds, key)
    rows = tuple(summarise(lam, clean, d) for lam, d in zip(lams, deltas, strict=True))
    return SensitivityTable(clean, rows, n_seeds, relative, parameterisation, tokens, extra)
