# ---
# jupyter:
#   jupytext:
#     formats: ipynb,py:percent
#     text_representation:
#       extension: .py
#       format_name: percent
#   kernelspec:
#     display_name: Python 3
#     language: python
#     name: python3
# ---

# %% [markdown]
# # SLTrain: sparse plus low-rank weights
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lowrank-jax/lowrank-jax/blob/main/colab/sltrain.ipynb)
#
# **Runtime:** a TPU (Runtime → Change runtime type → *v5e-1 TPU* or *v6e-1 TPU*); a T4/L4 GPU or the CPU runtime also
# work, at the smaller sizes the *Runtime and size* cell picks.
#
# **SLTrain** (Han et al., *SLTrain: a sparse plus low-rank approach for parameter and memory efficient
# pretraining*, NeurIPS 2024, [arXiv 2406.02214](https://arxiv.org/abs/2406.02214)) pretrains every attention and
# MLP weight as `W = A B · s + S`: a rank-`r` product plus a sparse matrix `S` whose support — a fixed, uniformly
# random set of `δ·in·out` entries — is drawn once and never changes. Only `A`, `B` and the `nnz` values of `S`
# are parameters, so weights, gradients and optimizer states all shrink.
#
# This notebook:
#
# 1. builds one `SLDense` layer and looks at its support;
# 2. compares the three ways to compute `y = x W`: the naive reference that materialises `W` (and keeps it for the
#    backward pass), the paper's custom backward in XLA (recomputes `W`), and the Pallas kernel that builds the
#    tiles of `W` on chip — numbers, speed and memory;
# 3. trains a small LLaMA full-rank and with SL layers and compares the singular values of a learned weight:
#    the paper's argument that *low-rank + sparse* covers the spectrum a full-rank weight needs.

# %%
import importlib.util
import subprocess
import sys
from pathlib import Path

REPO_URL = "https://github.com/lowrank-jax/lowrank-jax"
VERSION = "0.1.0"  # the release this notebook was written for: pip installs its tag
REQUIREMENT = f"lowrank-jax @ git+{REPO_URL}@v{VERSION}"

IN_COLAB = "google.colab" in sys.modules


def _repo_root() -> Path | None:
    """The checkout this notebook sits in (a parent directory with lowrank-jax's pyproject.toml)."""
    for d in (Path.cwd(), *Path.cwd().parents):
        toml = d / "pyproject.toml"
        if toml.is_file() and 'name = "lowrank-jax"' in toml.read_text():
            return d
    return None


if IN_COLAB:
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", REQUIREMENT], check=True)
    importlib.invalidate_caches()
elif importlib.util.find_spec("lowrank_jax") is None:
    root = _repo_root()
    if root is None:
        raise RuntimeError(f"lowrank_jax is not installed and no checkout was found; pip install '{REQUIREMENT}'")
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "-e", str(root)], check=True)
    # An editable install is picked up by new interpreters; make it importable in this kernel now.
    sys.path.insert(0, str(root))
    importlib.invalidate_caches()

# %% [markdown]
# ## Runtime and size
#
# `detect_runtime()` reads `jax.default_backend()`. On a GPU or TPU the Pallas kernel is compiled (Triton or Mosaic)
# and the layer has the shape of a LLaMA-1B (GPU) or 7B (TPU) MLP projection; on a CPU the kernel can only run in
# the Pallas interpreter, so the layer is small. `LRJ_COLAB_SIZE` (`smoke`, `cpu`, `gpu`, `tpu`) forces a size; the
# test suite uses `smoke`. `LRJ_COLAB_CACHE` is the tokenizer and token cache.

# %% tags=["runtime"]
import os

import jax

SIZES = {
    # layer demo: in, out, tokens M, rank r, density δ; LLaMA for the spectrum: model, data, run, SL rank
    "smoke": dict(d_in=256, d_out=512, tokens=256, r=32, density=0.03,
                  hidden=64, ffn=160, heads=2, layers=2, source="pydoc", vocab=512, tokenizer_chars=200_000,
                  seq_len=32, batch=8, steps=40, sl_rank=8, mesh=(1, 1, 1)),
    "cpu": dict(d_in=512, d_out=1376, tokens=512, r=128, density=0.03,
                hidden=128, ffn=352, heads=4, layers=4, source="pydoc", vocab=1024, tokenizer_chars=500_000,
                seq_len=64, batch=16, steps=300, sl_rank=32, mesh=(1, 1, 1)),
    "gpu": dict(d_in=2048, d_out=5461, tokens=4096, r=512, density=0.03,
                hidden=256, ffn=688, heads=4, layers=4, source="stdlib", vocab=4096, tokenizer_chars=8_000_000,
                seq_len=256, batch=32, steps=600, sl_rank=64, mesh=(1, 1, 1)),
    "tpu": dict(d_in=4096, d_out=11008, tokens=4096, r=1024, density=0.05,
                hidden=512, ffn=1376, heads=8, layers=8, source="stdlib", vocab=8192, tokenizer_chars=8_000_000,
                seq_len=256, batch=64, steps=1000, sl_rank=128, mesh=(1, -1, 1)),  # FSDP over every chip
}  # fmt: skip


def detect_runtime() -> str:
    """``'tpu'``, ``'gpu'`` or ``'cpu'``: the kind of accelerator JAX computes on."""
    backend = jax.default_backend()
    return {"tpu": "tpu", "gpu": "gpu", "cuda": "gpu", "rocm": "gpu"}.get(backend, "cpu")


def choose_size() -> str:
    """``LRJ_COLAB_SIZE`` if set, else the detected runtime."""
    size = os.environ.get("LRJ_COLAB_SIZE") or detect_runtime()
    if size not in SIZES:
        raise ValueError(f"LRJ_COLAB_SIZE: must be one of {', '.join(SIZES)}, got {size!r}")
    return size


SIZE = choose_size()
C = SIZES[SIZE]
CACHE_DIR = os.environ.get("LRJ_COLAB_CACHE", "~/.cache/lowrank_jax")
print(f"backend {jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}; size {SIZE!r}")
print(C)

# %% [markdown]
# ## 1. One SL layer and its support
#
# `SLDense(in, out, rank=r, alpha, density=δ)` holds `sl_a` (`in × r`, Kaiming-uniform), `sl_b` (`r × out`, zeros),
# the `nnz = round(δ·in·out)` trainable `sl_values` (`U(±1/√in)`) and the int32 `sl_support`: flat row-major indices
# `i·out + j` drawn uniformly without replacement from the layer's key (identical on every host), sorted. The support
# is an `nnx.Variable` that is not a `Param`: no gradient, no optimizer state. At initialisation `B = 0`, so `W = S`.

# %%
# %matplotlib inline
import time

import jax.numpy as jnp
import matplotlib.pyplot as plt
import numpy as np
from flax import nnx

from lowrank_jax.layers import SLDense

D_IN, D_OUT, R, DENSITY = C["d_in"], C["d_out"], C["r"], C["density"]
SCALE_ALPHA = R / 4  # s = alpha / r = 0.25, the paper's 60M setting (r = 128, alpha = 32)
layer = SLDense(D_IN, D_OUT, rank=R, alpha=SCALE_ALPHA, density=DENSITY, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
idx = np.asarray(layer.sl_support[...])
nnz = idx.size
n_sl = R * (D_IN + D_OUT) + nnz
print(f"W {D_IN}x{D_OUT}: {D_IN * D_OUT:,} dense entries; SL: r(in+out) + nnz = {R * (D_IN + D_OUT):,} + {nnz:,} "
      f"= {n_sl:,} parameters ({100 * n_sl / (D_IN * D_OUT):.1f}% of dense)")  # fmt: skip
print(f"support: {nnz:,} entries (δ·in·out = {DENSITY * D_IN * D_OUT:,.0f}), distinct: {len(np.unique(idx)) == nnz}, "
      f"sorted: {bool(np.all(np.diff(idx) > 0))}")  # fmt: skip
rows, cols = np.divmod(idx, D_OUT)
per_row = np.bincount(rows, minlength=D_IN)
print(f"non-zeros per row: mean {per_row.mean():.1f}, std {per_row.std():.2f} "
      f"(binomial: {np.sqrt(D_OUT * DENSITY * (1 - DENSITY)):.2f})")  # fmt: skip

fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
corner = np.zeros((64, 128))
sel = (rows < 64) & (cols < 128)
corner[rows[sel], cols[sel]] = 1
a1.imshow(corner, cmap="Greys", interpolation="nearest")
a1.set(title=f"support: the top-left 64 × 128 of S (δ = {DENSITY})", xlabel="out", ylabel="in")
a2.hist(per_row, bins=30)
a2.set(title="non-zeros per input row", xlabel="count", ylabel="rows")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Three ways to compute `y = x (A B s + S)`
#
# `pallas_kernels.sl_matmul.sl_matmul(x, a, b, values, idx, s, implementation=...)`:
#
# * **reference** (`pallas_kernels.sl_matmul.reference`): build `W` densely, one matmul, plain autodiff — which
#   saves `W` for the backward pass, one `in × out` array per layer alive until the gradient is computed;
# * **`'xla'`**: the paper's backward as a `custom_vjp`: `W` is recomputed in the backward pass instead of saved,
#   `dvalues = G.flat[idx]` with `G = xᵀ dY`;
# * **`'pallas'`**: the fused kernels build each tile of `W` on chip (the sparse tile from a per-tile view of the
#   support, the low-rank part as `s·(xA)B`), so `W` never exists in device memory, in the forward or the backward.
#
# Give the factors non-zero values (as after training) and compare values and gradients with the reference. What
# the backward pass keeps is read from `jax.vjp`'s residuals (shapes only, via `jax.eval_shape`); the compiled
# program's temporaries come from XLA's `memory_analysis()`. On a CPU the Pallas kernel runs in the *interpreter*,
# so its speed and temporaries there say nothing about the compiled kernel; on a GPU or TPU they do.

# %%
from pallas_kernels.sl_matmul import sl_matmul
from pallas_kernels.sl_matmul.reference import materialize_w, sl_matmul_reference

keys = jax.random.split(jax.random.key(1), 4)
x = jax.random.normal(keys[0], (C["tokens"], D_IN), jnp.float32)
a = layer.sl_a[...]
b = jax.random.normal(keys[1], (R, D_OUT), jnp.float32) / np.sqrt(R)
values = layer.sl_values[...]
sup = layer.sl_support[...]
s = layer.scaling
ct = jax.random.normal(keys[2], (C["tokens"], D_OUT), jnp.float32)  # a random output cotangent

paths = {
    "reference (materialised W)": lambda x, a, b, v: sl_matmul_reference(x, a, b, v, sup, s),
    "xla (recompute W)": lambda x, a, b, v: sl_matmul(x, a, b, v, sup, s, implementation="xla"),
    "pallas (W tiles on chip)": lambda x, a, b, v: sl_matmul(x, a, b, v, sup, s, implementation="pallas"),
}


def fwd_bwd(f):
    def loss(x, a, b, v):
        return jnp.sum(f(x, a, b, v) * ct)

    return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))


def residual_bytes(f):
    res = jax.eval_shape(lambda *ops: jax.vjp(f, *ops)[1], x, a, b, values)
    return sum(leaf.size * leaf.dtype.itemsize for leaf in jax.tree.leaves(res))


results, outs = {}, {}
for name, f in paths.items():
    g = fwd_bwd(f)
    compiled = g.lower(x, a, b, values).compile()
    out = jax.block_until_ready(compiled(x, a, b, values))
    times = []
    for _ in range(3):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(x, a, b, values))
        times.append(1e3 * (time.perf_counter() - t0))
    fwd_mem = jax.jit(f).lower(x, a, b, values).compile().memory_analysis()
    outs[name] = out
    results[name] = dict(ms=float(np.median(times)), residual=residual_bytes(f), fwd_temp=fwd_mem.temp_size_in_bytes)

ref_val, ref_grads = outs["reference (materialised W)"]
w_bytes = D_IN * D_OUT * 4
print(f"W is {w_bytes / 1e6:.2f} MB in float32; SL parameters {4 * n_sl / 1e6:.2f} MB + support {4 * nnz / 1e6:.2f} MB")
for name, r in results.items():
    val, grads = outs[name]
    rel = [float(jnp.max(jnp.abs(g - g0)) / jnp.max(jnp.abs(g0))) for g, g0 in zip(grads, ref_grads, strict=True)]
    print(f"{name:28s} fwd+bwd {r['ms']:8.2f} ms | saved for backward {r['residual'] / 1e6:6.2f} MB | "
          f"forward temporaries {r['fwd_temp'] / 1e6:6.2f} MB | max rel. error vs reference: "
          f"loss {abs(float(val - ref_val)) / abs(float(ref_val)):.1e}, grads x/a/b/values "
          + "/".join(f"{e:.1e}" for e in rel))  # fmt: skip
if jax.default_backend() == "cpu":
    print("(CPU: the Pallas kernel ran in the interpreter; its time and temporaries are not the compiled kernel's)")

# %% [markdown]
# ## 3. The spectrum of a learned weight: full-rank vs sparse + low-rank
#
# The paper's motivation: a pretrained weight is neither low-rank nor sparse, but its spectrum has a few large
# singular values (what a low-rank part captures) on top of a slowly decaying bulk that stays full-rank — and a
# *random* sparse matrix is full-rank with a flat spectrum, a cheap way to supply that bulk. Train the same small
# LLaMA full-rank and with `model.dense=sl` on the same batches, then take the first block's MLP `up` weight:
#
# * full-rank: `W(t)`, its initialisation `W(0)` (random, full-rank) and the learned update `ΔW = W(t) − W(0)`;
# * SL: `W = A B s + S`, the low-rank part `A B s` (rank ≤ `r` by construction) and the sparse part `S`.

# %%
from lowrank_jax.config import load_config
from lowrank_jax.data import BatchIterator, prepare_data
from lowrank_jax.train.step import make_trainer

base = [
    f"model.hidden={C['hidden']}",
    f"model.ffn={C['ffn']}",
    f"model.heads={C['heads']}",
    f"model.layers={C['layers']}",
    f"model.max_seq_len={C['seq_len']}",
    f"data.source={C['source']}",
    f"data.vocab_size={C['vocab']}",
    f"data.tokenizer_train_chars={C['tokenizer_chars']}",
    f"data.cache_dir={CACHE_DIR}",
    f"seq_len={C['seq_len']}",
    f"batch_size={C['batch']}",
    f"steps={C['steps']}",
    f"mesh={','.join(map(str, C['mesh']))}",
    "optim.lr=0.003",  # the paper's SLTrain learning rate; full-rank uses the same here
    "progress=false",
]
data = prepare_data(load_config("tiny", base).data)
base.append(f"model.vocab_size={data.vocab_size}")
SL_RANK = C["sl_rank"]
cfgs = {
    "full-rank": load_config("tiny", base),
    "SLTrain": load_config(
        "tiny",
        [*base, "model.dense=sl", f"model.sl_rank={SL_RANK}", f"model.sl_alpha={SL_RANK / 4}", "model.sl_density=0.03"],
    ),
}
batches = BatchIterator(data.train, C["batch"], C["seq_len"], seed=0)
trained = {}
for name, cfg in cfgs.items():
    trainer = make_trainer(cfg)
    state = trainer.init_state()
    first = jax.device_get(state.params["blocks"]["mlp"]["up"])  # a host copy: the step donates the state
    losses = []
    for t in range(cfg.steps):
        state, m = trainer.train_step(state, trainer.put_batch(batches.batch(t)))
        losses.append(float(m["loss"]))
    trained[name] = dict(first=first, last=jax.device_get(state.params["blocks"]["mlp"]["up"]), loss=losses)
    print(f"{name:10s} loss {losses[0]:.3f} -> {np.mean(losses[-5:]):.3f} (last 5 steps)")

# %%
dense_w0 = np.asarray(trained["full-rank"]["first"]["kernel"][0], np.float64)
dense_wt = np.asarray(trained["full-rank"]["last"]["kernel"][0], np.float64)
p = {k: v[0] for k, v in trained["SLTrain"]["last"].items()}
sl_s = cfgs["SLTrain"].model.sl_alpha / SL_RANK
sl_w = np.asarray(materialize_w(p["sl_a"], p["sl_b"], p["sl_values"], p["sl_support"], sl_s), np.float64)
sl_low = np.asarray(p["sl_a"], np.float64) @ np.asarray(p["sl_b"], np.float64) * sl_s
sl_sparse = sl_w - sl_low
mats = {
    "full-rank W(t)": dense_wt,
    "full-rank W(0)": dense_w0,
    "full-rank ΔW = W(t) − W(0)": dense_wt - dense_w0,
    "SL  W = ABs + S": sl_w,
    "SL  low-rank ABs": sl_low,
    "SL  sparse S": sl_sparse,
}
spectra = {k: np.linalg.svd(m, compute_uv=False) for k, m in mats.items()}


def numerical_rank(sv, rtol=1e-4):
    return int(np.sum(sv > rtol * sv[0]))


full_dim = min(dense_wt.shape)
print(f"block 0 MLP up {dense_wt.shape}; SL rank r = {SL_RANK}")
for k, sv in spectra.items():
    top = np.sum(sv[:SL_RANK] ** 2) / np.sum(sv**2)
    print(f"{k:28s} numerical rank {numerical_rank(sv):4d} / {full_dim}, top-{SL_RANK} energy {100 * top:5.1f}%")

fig, (a1, a2) = plt.subplots(1, 2, figsize=(13, 4))
for k in ("full-rank W(t)", "full-rank W(0)", "full-rank ΔW = W(t) − W(0)"):
    a1.semilogy(spectra[k], label=k)
for k in ("SL  W = ABs + S", "SL  low-rank ABs", "SL  sparse S"):
    a2.semilogy(np.maximum(spectra[k], 1e-12), label=k)
for ax, title in ((a1, "full-rank training"), (a2, f"SLTrain (r = {SL_RANK}, δ = 0.03)")):
    ax.axvline(SL_RANK, color="gray", ls=":", lw=1)
    ax.set(xlabel="index", ylabel="singular value", title=title)
    ax.grid(alpha=0.3)
    ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Reading the results
#
# * The support is uniform: every row holds about `δ·out` entries, with binomial spread; nothing about it is
#   learned or stored beyond one int32 per entry.
# * All three paths agree with the reference to float32 rounding. The reference keeps `W` for the backward pass;
#   the `xla` and `pallas` paths keep only `x`, the factors and the sparse values, which is SLTrain's memory saving
#   per layer. The fused kernel is built so that `W` is not written to device memory at all; its temporaries on a
#   GPU or TPU runtime show whether that holds there (this repository has not measured it on a device yet).
# * The full-rank weight is its full-rank random initialisation plus a learned update whose energy concentrates in
#   the top singular directions. SLTrain's weight has the same two ingredients by construction: `S` is a full-rank
#   random matrix (flat spectrum), `A B s` carries the learned top-`r` directions; the sum is full-rank.
#
# From the command line: `lowrank-jax train tiny model.dense=sl model.sl_rank=32 model.sl_alpha=8`;
# `python experiments/sl_memory.py` gives params + optimizer state from 60M to 7B next to the paper's.
