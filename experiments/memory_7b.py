"""Per-device train-step memory of llama_7b for every method, on 1 device and on 8 (FSDP), from XLA.

    python experiments/memory_7b.py [--out DIR] [--quick]

Each row runs ``lowrank-jax memory llama_7b method=... --no-licm --devices 8`` in a fresh process:
the train step is lowered and compiled ahead of time on abstract inputs (nothing is allocated) and
XLA's ``memory_analysis()`` gives arguments (params + optimizer state + batch), temporaries and the
peak estimate per device. BF16 parameters, sequence 256, one sequence per device per step (the
memory of the per-layer mode does not depend on the number of accumulated micro-batches beyond
their activations). Compiled for the CPU backend (the table needs no accelerator) with
loop-invariant code motion off (see lowrank_jax.train.memory). Writes results.json and table.md.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import optax
from _report import markdown_table, write_results, write_table
from flax import nnx

from lowrank_jax.config import derive, load_config
from lowrank_jax.layers.int8 import Int8Delta, requantize, zero_deltas
from lowrank_jax.models import build_model
from lowrank_jax.optim.q_galore import q_galore
from lowrank_jax.train.memory import NO_LICM_FLAG
from lowrank_jax.train.state import cross_entropy
from lowrank_jax.train.step import compiled_memory

HERE = Path(__file__).resolve().parent
GIB = 2**30
# (label, overrides); method presets are lowrank_jax.train.memory.METHODS
ROWS = [
    ("AdamW (bf16 params)", ["method=adamw"]),
    ("8-bit Adam", ["method=adamw8bit"]),
    ("GaLore r=1024", ["method=galore"]),
    ("8-bit GaLore r=1024", ["method=galore8bit"]),
    ("8-bit GaLore r=1024 + per-layer update", ["method=galore8bit", "layerwise_update=true"]),
    ("Fira r=512", ["method=fira"]),
    ("APOLLO r=256", ["method=apollo"]),
    ("APOLLO-Mini r=1", ["method=apollo_mini"]),
    ("APOLLO-Mini r=1 + per-layer update", ["method=apollo_mini", "layerwise_update=true"]),
    ("SLTrain r=1024 δ=0.05", ["method=sl"]),
    ("ReLoRA / LoRA r=128", ["method=relora"]),
    ("SWAN", ["optim.name=swan"]),
    ("SWAN + per-layer update", ["optim.name=swan", "layerwise_update=true"]),
    ("LDAdam r=1024", ["optim.name=ldadamw", "ldadam.rank=1024"]),
    ("LDAdam r=1024 + per-layer update", ["optim.name=ldadamw", "ldadam.rank=1024", "layerwise_update=true"]),
    ("Q-GaLore r=1024 (bf16 weights)", ["optim.name=q_galore_adamw8bit", "q_galore.rank=1024"]),
    ("Q-GaLore r=1024 (bf16 weights) + per-layer update",
     ["optim.name=q_galore_adamw8bit", "q_galore.rank=1024", "layerwise_update=true"]),
]  # fmt: skip
# Q-GaLore with INT8 weights, measured on this script's own steps (the INT8 deltas built inside the step)
INT8_ROWS = {
    "full": "Q-GaLore r=1024 + INT8 weights",
    "layerwise": "Q-GaLore r=1024 + INT8 weights + per-layer update",
}
MESHES = {"1 device": ["mesh=1,1,1", "batch_size=1"], "8 devices (fsdp)": ["mesh=1,8,1", "batch_size=8"]}
COMMON = ["model.param_dtype=bfloat16", "seq_len=256"]


def measure(overrides: list[str]) -> dict:
    cmd = [sys.executable, "-m", "lowrank_jax.train.cli", "memory", "llama_7b", *COMMON, *overrides]
    cmd += ["--no-licm", "--devices", "8"]
    t0 = time.time()
    out = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"})
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1], "seconds": time.time() - t0}
    report = json.loads(out.stdout.rstrip().rpartition("\n")[0])
    return {**report, "seconds": time.time() - t0}


def int8_step_memory(rank: int = 1024, preset: str = "llama_7b", overrides: tuple[str, ...] = ()) -> dict:
    """XLA memory of one Q-GaLore step of llama_7b with INT8 weights (``model.dense=int8``), one device.

    The train state holds the uint8 codes and group scales of the attention and MLP weights, the bf16 embedding,
    norms and head, and Q-GaLore's state; the step builds the INT8 layers' deltas as zeros, differentiates with
    respect to them (the weight gradient), runs ``q_galore`` (INT4 projectors, 8-bit Adam) and folds each update
    into the codes with stochastic rounding (:func:`lowrank_jax.layers.int8.requantize`).
    """
    cfg = derive(load_config(preset, [*COMMON, "batch_size=1", *overrides]), model__dense="int8")  # it requantizes
    graphdef, state = nnx.split(nnx.eval_shape(lambda: build_model(cfg.model, 0)))
    deltas, params, rest = state.split(Int8Delta, nnx.Param, ...)
    tx = q_galore(1e-3, rank=rank, update_proj_gap=500, mask=lambda t: {"d": matrices(t["d"]), "p": none(t["p"])})
    trees = {"d": deltas.to_pure_dict(), "p": params.to_pure_dict()}
    opt_abstract = jax.eval_shape(tx.init, trees)

    def step(p_pure, rest_pure, opt_state, batch, key):
        d_pure = zero_deltas(trees["d"])

        def loss(d, p):
            model = nnx.merge(graphdef, _with(deltas, d), _with(params, p), _with(rest, rest_pure))
            return cross_entropy(model(batch[:, :-1]), batch[:, 1:])

        value, grads = jax.value_and_grad(loss, argnums=(0, 1))(d_pure, p_pure)
        updates, opt_state = tx.update({"d": grads[0], "p": grads[1]}, opt_state, {"d": d_pure, "p": p_pure})
        return optax.apply_updates(p_pure, updates["p"]), _fold(rest_pure, updates["d"], key), opt_state, value

    args = (trees["p"], rest.to_pure_dict(), opt_abstract)
    batch = jax.ShapeDtypeStruct((1, cfg.seq_len + 1), jnp.int32)
    t0 = time.time()
    compiled = jax.jit(step, donate_argnums=(0, 1, 2)).lower(*args, batch, jax.random.key(0)).compile()
    size = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
    return {
        "xla_memory": compiled_memory(compiled),
        "param_bytes": size(args[0]) + size(args[1]),
        "optimizer_state_bytes": size(opt_abstract),
        "seconds": time.time() - t0,
    }


def int8_layerwise_memory(
    rank: int = 1024,
    preset: str = "llama_7b",
    overrides: tuple[str, ...] = (),
    run_with: Any = None,
    run_batches: tuple = (),
) -> dict:
    """XLA memory of a per-layer Q-GaLore step of llama_7b with INT8 weights (one device, no clipping).

    Forward over the stacked blocks keeping each layer's input; then a loop over the layers from the last: the
    block's vjp with a zero delta gives that layer's gradient, Q-GaLore (the state of one layer, sliced from the
    stacked state) gives its update, the norms move and the INT8 codes take the delta with stochastic rounding,
    written back in place. The embedding and head are updated with their own Q-GaLore state (plain 8-bit Adam).
    Only one layer's gradient and delta ever exist.
    """
    cfg = derive(load_config(preset, [*COMMON, "batch_size=1", *overrides]), model__dense="int8")  # it requantizes
    model = nnx.eval_shape(lambda: build_model(cfg.model, 0))
    graphdef, state = nnx.split(model)
    block_graphdef, block_state = nnx.split(model.blocks)
    full = state.to_pure_dict()
    blocks = _without_delta(full.pop("blocks"))
    one_layer = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), block_state.to_pure_dict())
    delta_of = _only_delta(one_layer)
    tx_block = q_galore(1e-3, rank=rank, update_proj_gap=500, mask=lambda t: _delta_mask(t))
    tx_rest = q_galore(1e-3, rank=rank, mask=none)
    trainable = lambda layer, d: {**_float_part(layer), **{"__d": d}}  # noqa: E731
    opt_block = jax.eval_shape(jax.vmap(tx_block.init), jax.tree.map(
        lambda x: jax.ShapeDtypeStruct((cfg.model.layers, *x.shape), x.dtype),
        trainable(_without_delta(one_layer), delta_of),
    ))  # fmt: skip
    opt_rest = jax.eval_shape(tx_rest.init, full)

    def block_fn(layer, d, h, cos, sin):
        st = nnx.State(jax.tree.map(lambda x: x, _one(block_state)))
        st.replace_by_pure_dict(_with_delta(layer, d))
        return nnx.merge(block_graphdef, st)(h, cos, sin)

    def step(rest, blocks, opt_rest, opt_block, batch, key):
        tokens, targets = batch[:, :-1], batch[:, 1:]
        zeros_d = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), delta_of)

        def whole(r):
            st = nnx.State(jax.tree.map(lambda x: x, state))
            st.replace_by_pure_dict({**r, "blocks": _with_delta(blocks, _stack_zeros(delta_of, cfg.model.layers))})
            return nnx.merge(graphdef, st)

        cos, sin = whole(rest).rope(tokens.shape[1])
        x0, embed_vjp = jax.vjp(lambda r: whole(r).embed_tokens(tokens), rest)
        layer_at = lambda tree, i: jax.tree.map(lambda x: x[i], tree)  # noqa: E731
        x_last, inputs = jax.lax.scan(lambda h, layer: (block_fn(layer, zeros_d, h, cos, sin), h), x0, blocks)
        loss, head_vjp = jax.vjp(lambda r, x: cross_entropy(whole(r).head(x), targets), rest, x_last)
        g_head, dh = head_vjp(jnp.ones((), loss.dtype))

        def layer_update(j, carry):
            blocks, opt_block, dh = carry
            i = cfg.model.layers - 1 - j
            layer = layer_at(blocks, i)
            (g_layer, g_d, dh_in) = jax.vjp(
                lambda fl, d, h: block_fn({**layer, **fl}, d, h, cos, sin), _float_part(layer), zeros_d, inputs[i]
            )[1](dh)
            u, new_opt = tx_block.update(trainable(g_layer, g_d), layer_at(opt_block, i), trainable(layer, zeros_d))
            new_layer = {**layer, **optax.apply_updates(_float_part(layer), {k: v for k, v in u.items() if k != "__d"})}
            new_layer = _fold(new_layer, u["__d"], jax.random.fold_in(key, i))
            new_layer = _after(new_layer, dh_in, i, cfg.model.layers)
            new_opt = _after(new_opt, u, i, cfg.model.layers)
            put = lambda full, part: jax.tree.map(lambda a, b: a.at[i].set(b), full, part)  # noqa: E731
            return put(blocks, new_layer), put(opt_block, new_opt), dh_in

        blocks, opt_block, dh0 = jax.lax.fori_loop(0, cfg.model.layers, layer_update, (blocks, opt_block, dh))
        (g_embed,) = embed_vjp(dh0)
        g_rest = jax.tree.map(lambda a, b: a + b, g_head, g_embed)
        u, opt_rest = tx_rest.update(g_rest, opt_rest, rest)
        return optax.apply_updates(rest, u), blocks, opt_rest, opt_block, loss

    args = (full, blocks, opt_rest, opt_block)
    if run_with is not None:  # a real run from the params of ``run_with`` (a model built with cfg): the losses
        real = nnx.state(run_with).to_pure_dict()
        r_blocks = _without_delta(real.pop("blocks"))
        one = trainable(_float_part(layer_at_0 := jax.tree.map(lambda x: x[0], r_blocks)), _only_delta(
            jax.tree.map(lambda x: x[0], nnx.state(run_with.blocks).to_pure_dict())))  # fmt: skip
        del layer_at_0
        o_block = jax.vmap(lambda _: tx_block.init(one))(jnp.arange(cfg.model.layers))
        state_ = (real, r_blocks, tx_rest.init(real), o_block)
        jstep, losses = jax.jit(step), []
        for i, b in enumerate(run_batches):
            *state_, loss = jstep(*state_, b, jax.random.key(i))
            losses.append(float(loss))
        return {"losses": losses}
    batch = jax.ShapeDtypeStruct((1, cfg.seq_len + 1), jnp.int32)
    t0 = time.time()
    compiled = jax.jit(step, donate_argnums=(0, 1, 2, 3)).lower(*args, batch, jax.random.key(0)).compile()
    size = lambda t: sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(t))  # noqa: E731
    return {
        "xla_memory": compiled_memory(compiled),
        "param_bytes": size(full) + size(blocks),
        "optimizer_state_bytes": size(opt_rest) + size(opt_block),
        "seconds": time.time() - t0,
    }


def _after(tree: Any, deps: Any, i: jax.Array, n: int) -> Any:
    """``tree`` unchanged, but computed from every array in ``deps`` too (one element of each, under a select on
    ``i >= n``: never true for a layer index, but not known to the compiler).

    The loop body reads a layer's slice of the stacked INT8 codes for its backward and of the stacked optimizer
    state for the projection back, and writes both slices in place. Writing the new codes after the layer's
    input gradient, and the new state after the layer's update, orders every read before the write, so XLA
    keeps no copy of the stacked arrays; without it XLA:CPU keeps two copies each of two stacked MLP code
    arrays and of every stacked projector (an optimization barrier is expanded into control edges, which its
    copy insertion does not take as an order)."""
    probe = sum(jnp.ravel(d)[0].astype(jnp.float32) for d in jax.tree.leaves(deps))
    never = (i >= n) & (probe == 0)
    return jax.tree.map(lambda x: jnp.where(never, jnp.zeros_like(x), x), tree)


def _is_int8(t: Any) -> bool:
    return isinstance(t, dict) and "codes" in t


def _without_delta(t: Any) -> Any:
    if _is_int8(t):
        return {k: v for k, v in t.items() if k != "delta"}
    return {k: _without_delta(v) for k, v in t.items()} if isinstance(t, dict) else t


def _only_delta(t: Any) -> Any:
    if _is_int8(t):
        return {"delta": t["delta"]}
    return {k: _only_delta(v) for k, v in t.items() if isinstance(v, dict) and _has_int8(v)}


def _has_int8(t: Any) -> bool:
    return _is_int8(t) or (isinstance(t, dict) and any(_has_int8(v) for v in t.values()))


def _with_delta(t: Any, d: Any) -> Any:
    if _is_int8(t):
        return {**t, "delta": d["delta"]}
    return {k: (_with_delta(v, d[k]) if isinstance(v, dict) and k in d else v) for k, v in t.items()}


def _stack_zeros(d: Any, layers: int) -> Any:
    return jax.tree.map(lambda x: jnp.zeros((layers, *x.shape), x.dtype), d)


def _float_part(t: Any) -> Any:
    """The float leaves outside the INT8 layers (the norms' scales)."""
    if _is_int8(t):
        return {}
    out = {k: (_float_part(v) if isinstance(v, dict) else v) for k, v in t.items()}
    return {k: v for k, v in out.items() if not (isinstance(v, dict) and not v)}


def _one(state: nnx.State) -> nnx.State:
    """A stacked block state's structure for one layer (leading axis dropped)."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), state)


def _delta_mask(tree: dict) -> Any:
    return {k: (matrices(v) if k == "__d" else none(v)) for k, v in tree.items()}


def measure_int8(mode: str) -> dict:
    """:func:`int8_step_memory` (``full``) or :func:`int8_layerwise_memory` in a fresh process, with loop-invariant
    code motion off as for every row."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": f"{os.environ.get('XLA_FLAGS', '')} {NO_LICM_FLAG}"}
    out = subprocess.run([sys.executable, __file__, "--int8-child", mode], capture_output=True, text=True, env=env)
    if out.returncode:
        return {"error": (out.stderr.strip().splitlines() or ["?"])[-1]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def matrices(tree):  # noqa: ANN001, ANN201
    return jax.tree.map(lambda x: x.ndim >= 2, tree)


def none(tree):  # noqa: ANN001, ANN201
    return jax.tree.map(lambda _: False, tree)


def _with(like: nnx.State, pure: dict) -> nnx.State:
    state = jax.tree.map(lambda x: x, like)
    state.replace_by_pure_dict(pure)
    return state


def _fold(rest: dict, deltas: dict, key: jax.Array) -> dict:
    """Every INT8 layer's codes after :func:`requantize` with its delta (one key per layer)."""
    if isinstance(rest, dict) and "codes" in rest:
        return {k: v for k, v in requantize({**rest, "delta": deltas["delta"]}, key).items() if k != "delta"}
    keys = jax.random.split(key, len(rest))
    return {
        k: _fold(v, deltas.get(k, {}), keys[i]) if isinstance(v, dict) else v for i, (k, v) in enumerate(rest.items())
    }


def _cells(r: dict) -> list[str]:
    if "error" in r:
        return [r["label"], r["mesh_label"], "-", "-", "-", f"error: {r['error'][:80]}"]
    m = r["xla_memory"]
    return [
        r["label"],
        r["mesh_label"],
        f"{(r['param_bytes'] + r['optimizer_state_bytes']) / GIB:.2f}",
        f"{m['argument_size_in_bytes'] / GIB:.2f}",
        f"{m['temp_size_in_bytes'] / GIB:.2f}",
        f"**{m['peak_estimate_bytes'] / GIB:.2f}**",
    ]


def table(rows: list[dict]) -> str:
    header = "method | devices | params + state (GiB) | arguments | temporaries | peak estimate / device"
    return markdown_table(header, [_cells(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(HERE / "results" / "memory_7b"))
    p.add_argument("--only", nargs="*", help="labels (prefixes) of the rows to run")
    p.add_argument("--meshes", nargs="*", default=list(MESHES), choices=list(MESHES))
    p.add_argument("--int8-child", choices=list(INT8_ROWS), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.int8_child:
        print(json.dumps(int8_step_memory() if args.int8_child == "full" else int8_layerwise_memory()))
        return 0
    rows = []
    for mesh_label in args.meshes:
        for label, overrides in ROWS:
            if args.only and not any(label.startswith(o) for o in args.only):
                continue
            r = {"label": label, "mesh_label": mesh_label, **measure([*overrides, *MESHES[mesh_label]])}
            print(table([r]).splitlines()[-1], flush=True)
            rows.append(r)
    for mode, label in INT8_ROWS.items():
        if "1 device" in args.meshes and (not args.only or any(label.startswith(o) for o in args.only)):
            r = {"label": label, "mesh_label": "1 device", **measure_int8(mode)}
            print(table([r]).splitlines()[-1], flush=True)
            rows.append(r)
    out = Path(args.out)
    write_results(out, {"rows": rows, "common_overrides": COMMON})
    write_table(out, table(rows))
    print(table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
