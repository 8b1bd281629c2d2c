"""Float64 NumPy ports of the official updates (PyTorch orientation, weights ``(out, in)``), written from the papers
and the official code, that the optimizer tests follow step by step."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax


def random_tree(rng: np.random.Generator, shapes: dict, scale: float = 1.0) -> dict:
    """Float32 normal leaves of the given shapes."""
    return {k: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32) for k, s in shapes.items()}


def torch_view(tree: dict) -> dict:
    """Float64 PyTorch-orientation copies: a matrix transposed, a stacked ``(L, in, out)`` leaf ``k`` as ``k0`` …"""
    out: dict[str, np.ndarray] = {}
    for k, v in tree.items():
        v = np.asarray(v, np.float64)
        if v.ndim == 3:
            out.update({f"{k}{i}": v[i].T for i in range(v.shape[0])})
        else:
            out[k] = v.T if v.ndim == 2 else v
    return out


def run(tx: optax.GradientTransformation, params: dict, grads: list, probe: Any = None) -> tuple[list, list]:
    """Params after each jitted update of ``tx`` (learning rate included), and ``probe(state)`` after each."""
    state, update, traj, probes = tx.init(params), jax.jit(tx.update), [], []
    for g in grads:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        traj.append(params)
        probes.append(None if probe is None else probe(state))
    return traj, probes


def max_rel_error(traj: list, port: Any, grads: list, probes: list | None = None) -> float:
    """Step ``port`` along the gradients (``port.step(torch grads, probe)``); the largest
    ``max|ours − port| / max|port|`` over steps and weights."""
    worst = 0.0
    for t, g in enumerate(grads):
        port.step(torch_view(g), None if probes is None else probes[t])
        for k, ours in torch_view(traj[t]).items():
            worst = max(worst, float(np.max(np.abs(ours - port.w[k])) / np.max(np.abs(port.w[k]))))
    return worst


def export_step(tx: optax.GradientTransformation, platform: str, dense: str = "dense") -> Any:
    """``jax.export`` for ``platform`` of a jitted train step (loss, gradient, ``tx``, apply) of a small bf16 LLaMA
    built by the dense factory with ``dense`` linears; nothing is allocated."""
    from flax import nnx

    from lowrank_jax.config import derive, load_config
    from lowrank_jax.models import build_model
    from lowrank_jax.train.state import cross_entropy
    from pallas_kernels.lowering import export_for

    small = ["model.vocab_size=256", "model.hidden=64", "model.ffn=160", "model.heads=2", "model.layers=2",
             "model.max_seq_len=32", "model.dtype=bfloat16", "model.param_dtype=bfloat16", "seq_len=16"]  # fmt: skip
    cfg = derive(load_config("tiny", small), model__dense=dense)  # int8: this step requantizes, not the loop
    graphdef, params, rest = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model, 0)), nnx.Param, ...)
    opt_state = jax.eval_shape(tx.init, params)

    def step(params, rest, opt_state, batch, key):  # noqa: ANN001, ANN202
        loss_fn = lambda p: cross_entropy(nnx.merge(graphdef, p, rest)(batch[:, :-1]), batch[:, 1:])  # noqa: E731
        loss, grads = jax.value_and_grad(loss_fn)(params)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        if dense == "int8":  # the INT8 layers take their deltas with stochastic rounding
            params, rest = fold_int8(params, rest, key)
        return params, rest, opt_state, loss

    batch = jax.ShapeDtypeStruct((2, 17), jnp.int32)
    return export_for(step, platform, params, rest, opt_state, batch, jax.random.key(0))


def fold_int8(params: Any, rest: Any, key: jax.Array) -> tuple[Any, Any]:
    """Every INT8 layer of an ``(nnx.Param, rest)`` state pair after :func:`lowrank_jax.layers.int8.requantize`."""
    from lowrank_jax.layers.int8 import requantize

    p, r = params.to_pure_dict(), rest.to_pure_dict()

    def walk(pd: dict, rd: dict) -> None:
        for k, v in rd.items():
            if isinstance(v, dict) and "codes" in v:
                new = requantize({**v, "delta": pd[k]["delta"]}, jax.random.fold_in(key, len(str(k))))
                pd[k]["delta"] = new.pop("delta")
                rd[k] = new
            elif isinstance(v, dict):
                walk(pd.get(k, {}), v)

    walk(p, r)
    params.replace_by_pure_dict(p)
    rest.replace_by_pure_dict(r)
    return params, rest
