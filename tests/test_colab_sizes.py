"""Every size a notebook picks for a TPU or a GPU fits that runtime's memory, by the project's own byte count.

The count is XLA's ``memory_analysis()`` peak of the compiled program (``lowrank_jax.train.memory.step_memory`` for a
train step, with loop-invariant code motion off as ``lowrank-jax memory --no-licm`` runs it), compiled on this CPU
for **one device**: the worst case of a Colab runtime, which has one TPU chip (v5e-1) or one GPU, and the whole
batch on it. The caps:

- ``tpu``: 16 GiB of HBM per TPU chip (v5e);
- ``gpu``: 15 GiB, what a T4 makes usable (an L4 has 22.5 GiB; the T4 is the binding one).

What is compiled per notebook: the full-rank AdamW step of its model (the largest state of every comparison it
draws) and its method's step; the SLTrain notebook's layer demo (forward + backward of the materialised reference and
of the ``xla`` path at its ``d_in × d_out``, ``tokens`` and rank); the scale notebook's memory-table rows at its
``table`` preset; the ternary notebook's MNIST MLP is bounded by an explicit byte count (its largest array is the
``chunk × batch × hidden`` activation of the vmapped perturbations).

Each size is checked in a subprocess (the XLA flag must be set before JAX starts); slow: ~2 minutes on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

GIB = 2**30
CAPS = {"tpu": 16 * GIB, "gpu": 15 * GIB}
RUNTIME_NAME = {"tpu": "a 16 GiB TPU chip (v5e)", "gpu": "a 15 GiB T4"}
LLAMA_NOTEBOOKS = {  # the method steps each notebook trains, besides full-rank AdamW
    "galore": lambda c: ["optim.name=galore_adamw", f"galore.rank={c['rank']}"],
    "relora": lambda c: ["model.dense=lora", f"model.lora_rank={c['rank']}", f"relora.every={c['every']}"],
    "sltrain": lambda c: ["model.dense=sl", f"model.sl_rank={c['sl_rank']}", "model.sl_density=0.03"],
    "overtraining": lambda c: [],
    "scale": lambda c: ["optim.name=galore_adamw", "galore.rank=16"],
}


def _sizes(name: str) -> dict:
    """The notebook's SIZES, read by running its cell tagged ``runtime`` (on the CPU backend)."""
    from test_colab import _runtime_cell

    ns: dict = {}
    exec(compile(_runtime_cell(name), f"{name}:runtime", "exec"), ns)
    return ns["SIZES"]


def _llama_overrides(c: dict) -> list[str]:
    return [
        f"model.hidden={c['hidden']}",
        f"model.ffn={c['ffn']}",
        f"model.heads={c['heads']}",
        f"model.layers={c['layers']}",
        f"model.max_seq_len={c['seq_len']}",
        f"model.vocab_size={c['vocab']}",
        f"seq_len={c['seq_len']}",
        f"batch_size={c['batch']}",
        "mesh=1,1,1",
    ]


def measure(name: str, size: str) -> dict[str, float]:
    """Peak bytes of each program the notebook ``name`` runs at ``size``, compiled for one CPU device."""
    import jax
    import jax.numpy as jnp

    from lowrank_jax.config import load_config
    from lowrank_jax.train.memory import expand_method, step_memory
    from lowrank_jax.train.step import compiled_memory

    c = _sizes(name)[size]
    out: dict[str, float] = {}
    if name in LLAMA_NOTEBOOKS:
        base = _llama_overrides(c)
        for label, extra in (("adamw", ["optim.name=adamw"]), ("method", LLAMA_NOTEBOOKS[name](c))):
            cfg = load_config("tiny", [*base, *extra])
            out[f"train step ({label})"] = step_memory(cfg)["xla_memory"]["peak_estimate_bytes"]
    if name == "scale":
        for label, overrides in c["rows"]:
            ov = ["model.param_dtype=bfloat16", "seq_len=256", "mesh=1,1,1", "batch_size=1", *overrides]
            report = step_memory(load_config(c["table"], expand_method(ov)))
            out[f"{c['table']} {label}"] = report["xla_memory"]["peak_estimate_bytes"]
    if name == "sltrain":
        from pallas_kernels.sl_matmul import sl_matmul
        from pallas_kernels.sl_matmul.reference import sl_matmul_reference

        m, k, n, r = c["tokens"], c["d_in"], c["d_out"], c["r"]
        nnz = round(c["density"] * k * n)
        f32 = jnp.float32
        args = [jax.ShapeDtypeStruct(s, f32) for s in ((m, k), (k, r), (r, n), (nnz,))]
        sup = jax.ShapeDtypeStruct((nnz,), jnp.int32)
        for label, fn in (
            ("reference", lambda x, a, b, v, i: sl_matmul_reference(x, a, b, v, i, 0.25)),
            ("xla", lambda x, a, b, v, i: sl_matmul(x, a, b, v, i, 0.25, implementation="xla")),
        ):
            grad = jax.jit(jax.grad(lambda x, a, b, v, i, fn=fn: fn(x, a, b, v, i).sum(), argnums=(0, 1, 2, 3)))
            out[f"layer demo fwd+bwd ({label})"] = compiled_memory(grad.lower(*args, sup).compile())[
                "peak_estimate_bytes"
            ]
    if name == "ternary":
        params = 784 * c["hidden"] + 2 * c["hidden"] ** 2 + 10 * c["hidden"]
        acts = c["chunk"] * c["batch"] * c["hidden"] * 4 * 4 * 2  # 4 layers' f32 activations, forward + saved
        out["noise_step update (byte count)"] = 4 * params * (c["chunk"] + 6) + acts + 4 * c["batch"] * 784
    return out


@pytest.mark.slow
@pytest.mark.parametrize("name", ["galore", "relora", "sltrain", "ternary", "overtraining", "scale"])
@pytest.mark.parametrize("size", ["gpu", "tpu"])
def test_notebook_size_fits_its_runtime(name, size):
    from helpers import REPO

    from lowrank_jax.train.memory import NO_LICM_FLAG

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": NO_LICM_FLAG, "PYTHONPATH": str(REPO / "tests")}
    proc = subprocess.run(
        [sys.executable, __file__, name, size], capture_output=True, text=True, env=env, timeout=900, cwd=os.getcwd()
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    peaks = json.loads(proc.stdout.strip().splitlines()[-1])
    assert peaks
    print(f"{name} at size {size!r} vs {RUNTIME_NAME[size]}:")
    for label, peak in peaks.items():
        print(f"  {label:48s} {peak / GIB:7.2f} GiB")
    over = {k: round(v / GIB, 2) for k, v in peaks.items() if v > CAPS[size]}
    assert not over, f"{name} size {size!r} exceeds {RUNTIME_NAME[size]}: {over} GiB"


if __name__ == "__main__":
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    print(json.dumps(measure(sys.argv[1], sys.argv[2])))
