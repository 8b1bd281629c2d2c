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
# # GaLore as an optax transform on your own training loop
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lowrank-jax/lowrank-jax/blob/main/colab/galore.ipynb)
#
# **Runtime:** a TPU (Runtime → Change runtime type → *v5e-1 TPU* or *v6e-1 TPU*); a T4/L4 GPU or the CPU runtime also
# work, at the smaller sizes the *Runtime and size* cell picks.
#
# **GaLore** (Zhao et al., *GaLore: Memory-Efficient LLM Training by Gradient Low-Rank Projection*,
# ICML 2024, [arXiv 2403.03507](https://arxiv.org/abs/2403.03507)) keeps the weights full-rank but
# runs Adam on a rank-`r` projection of each weight matrix's gradient, so Adam's two moments are
# `r × n` instead of `m × n`. The projector is the top-`r` singular vectors of the current gradient,
# recomputed every `T = update_proj_gap` steps.
#
# In lowrank-jax GaLore is an ordinary optax `GradientTransformation`, so it drops into any JAX
# training loop. This notebook uses the package's LLaMA as "your model" but writes the training loop
# by hand (the `lowrank-jax train` loop does the same thing with more bookkeeping):
#
# 1. the projection on one real gradient: how much of it rank `r` keeps;
# 2. optimizer-state memory of AdamW, 8-bit Adam, GaLore and 8-bit GaLore from `jax.eval_shape`
#    (nothing allocated), from this model up to LLaMA-7B, next to the paper's figures;
# 3. the refresh schedule: the official "every matrix at once" refresh against the opt-in staggered
#    refresh with a randomized SVD, and the step-time trace;
# 4. training curves of all four optimizers at equal tokens.

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
# `detect_runtime()` reads `jax.default_backend()`: on a Colab TPU the batch is sharded over a mesh
# of all chips and the model is LLaMA-60M-shaped; on a GPU a mid-sized model; on a CPU a small one
# that trains in a few minutes. The environment variable `LRJ_COLAB_SIZE` (`smoke`, `cpu`, `gpu`,
# `tpu`) forces a size: the test suite runs this notebook with `smoke`, the smallest of all.
# `LRJ_COLAB_CACHE` is where the tokenizer and token cache go.

# %% tags=["runtime"]
import os

import jax

SIZES = {
    # model: hidden, ffn, heads, layers; data: source, vocab; run: seq_len, batch, steps; GaLore: rank, gap T
    "smoke": dict(hidden=64, ffn=160, heads=2, layers=2, source="pydoc", vocab=512, tokenizer_chars=200_000,
                  seq_len=32, batch=8, steps=30, rank=16, gap=10, mesh=(1, 1, 1)),
    "cpu": dict(hidden=128, ffn=352, heads=4, layers=4, source="pydoc", vocab=1024, tokenizer_chars=500_000,
                seq_len=64, batch=16, steps=200, rank=32, gap=50, mesh=(1, 1, 1)),
    "gpu": dict(hidden=256, ffn=688, heads=4, layers=4, source="stdlib", vocab=4096, tokenizer_chars=8_000_000,
                seq_len=256, batch=32, steps=400, rank=64, gap=100, mesh=(1, 1, 1)),
    "tpu": dict(hidden=512, ffn=1376, heads=8, layers=8, source="stdlib", vocab=8192, tokenizer_chars=8_000_000,
                seq_len=256, batch=64, steps=600, rank=128, gap=200, mesh=(-1, 1, 1)),  # data parallel over every chip
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
# ## Model and data
#
# The config system gives a validated `ModelConfig`; `prepare_data` trains a byte-level BPE on the
# embedded corpus (the Python docs' prose for the small sizes, the standard library's source for
# the larger ones) and returns token streams. `build_model` + `split_model` turn the Flax NNX LLaMA
# into a `graphdef` and a plain dict of arrays: the params pytree any optax optimizer works on.

# %%
import time

import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax import sharding as shd
from lowrank_jax.config import load_config, replace
from lowrank_jax.data import BatchIterator, eval_batches, prepare_data
from lowrank_jax.models import abstract_params, build_model, count_bytes, count_params, split_model
from lowrank_jax.optim import GaLoreState

cfg = load_config(
    "tiny",
    [
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
    ],
)
data = prepare_data(cfg.data)
model_cfg = replace(cfg, model__vocab_size=data.vocab_size).model
graphdef, params0 = split_model(build_model(model_cfg, 0))
mesh = shd.make_mesh(C["mesh"])
params0 = jax.device_put(params0, shd.replicated(mesh))
batches = BatchIterator(data.train, C["batch"], C["seq_len"], seed=0)
val = eval_batches(data.val, C["seq_len"], 8 * C["batch"] * C["seq_len"], C["batch"])
print(f"{count_params(params0):,} params; train {len(data.train):,} tokens, vocab {data.vocab_size}")
print(f"mesh {dict(mesh.shape)}")


def loss_fn(params, tokens):
    logits = nnx.merge(graphdef, params)(tokens[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]).mean()


def put(batch):
    return jax.device_put(jnp.asarray(batch, jnp.int32), shd.batch_sharding(mesh))


# %% [markdown]
# ## 1. The projection
#
# Take one real gradient, the MLP `up` kernel of the first block (Flax orientation `(in, out)`). GaLore's
# `proj_type='std'` projects the smaller side: for `in < out` the projector `P` is the top-`r` left singular
# vectors (`in × r`) and Adam sees `Pᵀ G` (`r × out`). The update goes back as `α · P · Adam(Pᵀ G)`.
# Gradients of transformers are close to low rank, which is why a small `r` keeps most of the signal.

# %%
RANK = C["rank"]
g = jax.jit(jax.grad(loss_fn))(params0, put(batches.batch(0)))
G = np.asarray(g["blocks"]["mlp"]["up"]["kernel"][0], np.float64)
u, sv, _ = np.linalg.svd(G, full_matrices=False)
energy = np.cumsum(sv**2) / np.sum(sv**2)
kept = energy[RANK - 1]
print(f"gradient {G.shape}: rank {RANK} keeps {100 * kept:.1f}% of ||G||^2 ({min(G.shape)} singular values)")

# GaLore computes the same subspace: run one update and compare its projector with the SVD.
tx_probe = lrj.scale_by_galore(rank=RANK, mask=lrj.default_mask)  # attention + MLP kernels, by name
_, probe_state = jax.jit(tx_probe.update)(g, tx_probe.init(params0))
P = np.asarray(probe_state.proj_in["blocks"]["mlp"]["up"]["kernel"][0], np.float64)
cos = np.abs(np.sum(P * u[:, :RANK], axis=0))  # |cosine| between matching singular vectors
print(f"GaLore projector {P.shape} vs top-{RANK} singular vectors: min |cos| = {cos.min():.6f}")
up_moment = probe_state.inner_state.mu["blocks"]["mlp"]["up"]["kernel"]
print(f"kernel {g['blocks']['mlp']['up']['kernel'].shape} -> Adam moment {up_moment.shape}")

# %%
# %matplotlib inline
import matplotlib.pyplot as plt

fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 3.6))
a1.semilogy(np.arange(1, len(sv) + 1), sv, ".-")
a1.axvline(RANK, color="tab:red", ls="--", label=f"r = {RANK}")
a1.set(xlabel="index", ylabel="singular value", title="spectrum of one gradient")
a1.legend()
a2.plot(np.arange(1, len(sv) + 1), energy, ".-")
a2.axvline(RANK, color="tab:red", ls="--")
a2.set(xlabel="rank r", ylabel="fraction of ||G||² kept", title="energy kept by the top-r projection")
for ax in (a1, a2):
    ax.grid(alpha=0.3)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Optimizer-state memory, from `jax.eval_shape`
#
# `jax.eval_shape(tx.init, params)` gives the state's shapes and dtypes without allocating it, so we can
# size the optimizer state of LLaMA-7B on a laptop. Four complete optimizers, as optax names them (the
# moments live *inside* `lrj.galore`; `optax.chain(lrj.galore(rank=r), optax.adamw(lr))` stops with a message,
# since its AdamW would allocate full-size moments):
#
# * AdamW: two float moments per parameter;
# * 8-bit Adam (Dettmers et al., [arXiv 2110.02861](https://arxiv.org/abs/2110.02861)): block-wise quantized
#   moments, about 2 bytes per parameter;
# * GaLore and 8-bit GaLore: low-rank moments plus the projectors, on the attention/MLP kernels only.
#
# The paper's sizes use BF16 weights and the ranks of its Table 2 (128/256/256/512, 7B: 1024).

# %%
LR = 1e-2


def optimizers(rank, gap, lr=LR):
    """name -> optax transform (lr may be a schedule); GaLore wraps only the blocks' kernels."""
    return {
        "AdamW": optax.adamw(lr, b1=0.9, b2=0.999, eps=1e-6),
        "8-bit Adam": lrj.adamw_8bit(lr, eps=1e-6, weight_decay=0.0),
        "GaLore": lrj.galore(lr, rank=rank, update_proj_gap=gap, scale=0.25),
        "8-bit GaLore": lrj.galore(lr, rank=rank, update_proj_gap=gap, scale=0.25, eight_bit=True),
    }


def fmt_bytes(n):
    """Decimal units, as the paper's memory figures."""
    return f"{n / 1e9:.2f} GB" if n >= 1e8 else f"{n / 1e6:.2f} MB"


def state_bytes(tx, params):
    return count_bytes(jax.eval_shape(tx.init, params))


# name, config, rank; paper: (optimizer state GB of full-rank Adam, of GaLore), BF16 (GaLore Table 2 text)
PAPER = {"llama_60m": (0.23, 0.13), "llama_130m": (0.51, 0.28), "llama_350m": (1.37, 0.54), "llama_1b": (5.20, 1.78)}
models = [("this model", model_cfg, RANK)] + [
    (name, load_config(name, ["model.param_dtype=bfloat16"]).model, r)
    for name, r in (("llama_60m", 128), ("llama_130m", 256), ("llama_350m", 256), ("llama_1b", 512), ("llama_7b", 1024))
]
memory = {}
for name, mcfg, r in models:
    _, abstract = abstract_params(mcfg)
    memory[name] = {k: state_bytes(tx, abstract) for k, tx in optimizers(r, 200).items()}
    memory[name]["params"] = count_bytes(abstract)

print(f"{'model':12s} {'params':>10s} " + " ".join(f"{k:>12s}" for k in optimizers(1, 1)) + "   paper Adam / GaLore")
for name, m in memory.items():
    paper = " / ".join(f"{x:.2f} GB" for x in PAPER[name]) if name in PAPER else ""
    cells = " ".join(f"{fmt_bytes(m[k]):>12s}" for k in ["params", *optimizers(1, 1)])
    print(f"{name:12s} {cells}   {paper}")
saving = 1 - memory["llama_7b"]["8-bit GaLore"] / memory["llama_7b"]["AdamW"]
print(f"llama_7b: 8-bit GaLore state is {100 * saving:.1f}% smaller than AdamW's")

# %%
names = list(memory)
methods = list(optimizers(1, 1))
x = np.arange(len(names))
fig, ax = plt.subplots(figsize=(11, 4))
for i, k in enumerate(methods):
    ax.bar(x + (i - 1.5) * 0.2, [memory[n][k] / 1e9 for n in names], 0.2, label=k)
ax.set_yscale("log")
ax.set_xticks(x, names)
ax.set_ylabel("optimizer state (GB, log scale)")
ax.set_title("optimizer state from jax.eval_shape (BF16 weights for the LLaMA sizes)")
ax.grid(alpha=0.3, axis="y")
ax.legend()
plt.show()

# %% [markdown]
# ## 3 + 4. Training at equal tokens, the refresh schedule and the step-time trace
#
# Every optimizer trains the same model from the same initialisation on the same batches, with the
# papers' schedule (linear warmup over 10% of the steps, cosine decay to 10%). Learning rates follow
# the GaLore recipe: 0.01 with `α = 0.25` for GaLore, whose kernels therefore move at an effective 0.0025;
# AdamW at 0.003 (this codebase's `tiny` default). The refresh gap is short here (`T` below) so that
# several refreshes happen.
#
# Two GaLore refresh modes (both opt-in flags of `galore`, beyond the paper):
#
# * `refresh='all'` (official): at steps 0, T, 2T, … every matrix computes its SVD on the same step, so
#   that step is slow and holds every SVD's workspace at once;
# * `refresh='staggered'`: matrix `i` of `N` refreshes at steps `≡ i·T/N (mod T)`, so no step does more
#   than `⌈N/T⌉` SVDs; with `svd='randomized'` each is a range finder (Halko et al. 2011), `O(mnr)`.
#
# Each matrix's step of last refresh is in the state (`last_refresh`), so we can count the SVDs of every step.

# %%
STEPS, GAP = C["steps"], C["gap"]
TOKENS_PER_STEP = C["batch"] * C["seq_len"]


def schedule(peak):
    return optax.warmup_cosine_decay_schedule(0.0, peak, max(1, STEPS // 10), STEPS, peak * 0.1)


def galore_variant(**kw):
    return lrj.galore(schedule(LR), rank=RANK, update_proj_gap=GAP, scale=0.25, **kw)


runs_tx = {
    "AdamW": optax.adamw(schedule(3e-3), b1=0.9, b2=0.999, eps=1e-6),
    "GaLore (all, exact SVD)": galore_variant(),
    "GaLore (staggered, randomized SVD)": galore_variant(refresh="staggered", svd="randomized"),
    "8-bit GaLore": optimizers(RANK, GAP, schedule(LR))["8-bit GaLore"],
}


def refreshed_now(opt_state, step):
    """Number of matrices whose projector was refreshed at ``step`` (0 for non-GaLore states)."""
    found = [s for s in jax.tree.leaves(opt_state, is_leaf=lambda s: isinstance(s, GaLoreState))
             if isinstance(s, GaLoreState)]  # fmt: skip
    return sum(int(np.sum(np.asarray(x) == step)) for s in found for x in jax.tree.leaves(s.last_refresh))


def val_loss(params):
    f = jax.jit(loss_fn)
    return float(np.mean([f(params, put(b)) for b in val]))


def train_run(tx):
    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    params = jax.tree.map(jnp.copy, params0)
    opt_state = tx.init(params)
    compiled = jax.jit(step, donate_argnums=(0, 1)).lower(params, opt_state, put(batches.batch(0))).compile()
    losses, times, svds = [], [], []
    for t in range(STEPS):
        tokens = put(batches.batch(t))
        t0 = time.perf_counter()
        params, opt_state, loss = compiled(params, opt_state, tokens)
        loss.block_until_ready()
        times.append(1e3 * (time.perf_counter() - t0))
        losses.append(float(loss))
        svds.append(refreshed_now(opt_state, t))
    return dict(loss=np.array(losses), ms=np.array(times), svds=np.array(svds),
                val=val_loss(params), state_bytes=count_bytes(opt_state))  # fmt: skip


runs = {}
for name, tx in runs_tx.items():
    runs[name] = train_run(tx)
    r = runs[name]
    print(f"{name:36s} loss {r['loss'][0]:.3f} -> {r['loss'][-1]:.3f}, val {r['val']:.3f}, "
          f"state {fmt_bytes(r['state_bytes'])}, median step {np.median(r['ms']):.1f} ms")  # fmt: skip

n_mat = runs["GaLore (all, exact SVD)"]["svds"][0]
for name in ("GaLore (all, exact SVD)", "GaLore (staggered, randomized SVD)"):
    s = runs[name]["svds"]
    print(f"{name}: {n_mat} matrices; SVDs per step after step 0: max {s[1:].max()}, total {s.sum()}")
print(
    "8-bit GaLore state / GaLore state: "
    f"{runs['8-bit GaLore']['state_bytes'] / runs['GaLore (all, exact SVD)']['state_bytes']:.2f}"
)

# %%
tokens = (np.arange(STEPS) + 1) * TOKENS_PER_STEP
fig, axes = plt.subplots(1, 3, figsize=(15, 4))
for name, r in runs.items():
    smooth = np.convolve(r["loss"], np.ones(5) / 5, mode="valid")
    axes[0].plot(tokens[4:], smooth, label=f"{name} (val {r['val']:.2f})")
axes[0].set(xlabel="tokens", ylabel="train loss (5-step mean)", title="equal tokens, same batches")
for name in ("AdamW", "GaLore (all, exact SVD)", "GaLore (staggered, randomized SVD)"):
    axes[1].plot(np.arange(1, STEPS), runs[name]["ms"][1:], label=name, lw=1)
    axes[2].step(np.arange(STEPS), runs[name]["svds"], where="mid", label=name)
axes[1].set(xlabel="step", ylabel="ms / step", title="step-time trace")
axes[2].set(xlabel="step", ylabel="SVDs in the step", title=f"projector refreshes (T = {GAP})")
for ax in axes:
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Reading the results
#
# * The projection keeps most of a gradient at small rank, and GaLore's projector is exactly the SVD's.
# * The state memory of GaLore shrinks with `r / min(m, n)` on the kernels; embeddings and `lm_head` keep full
#   Adam moments, which is why the saving is smaller at 60M (large vocabulary relative to the blocks) than at
#   7B. 8-bit moments take about 2 bytes per parameter: half of BF16 Adam's moments, a quarter of float32's.
#   The GaLore figures here sit above the paper's estimate (e.g. 0.16 vs 0.13 GB at 60M): they count every array
#   of the state, projectors included.
# * With `refresh='all'` every matrix refreshes on the same step; staggered refresh spreads them (at the price of
#   a second refresh in the first period for the matrices with a non-zero offset). On a CPU with small matrices
#   SVDs are cheap and the trace is noisy; with the larger sizes the refresh steps stand out.
# * At equal tokens the ranking of the four curves at this tiny budget says more about the learning rates than
#   about the methods (GaLore's recipe trains the embeddings at 0.01, AdamW's at 0.003); the paper's Table 2 has
#   GaLore within ~1 perplexity point of full-rank at 60M–1B, and the README's swept table compares the methods
#   here with a learning-rate grid per method.
#
# Same thing from the command line: `lowrank-jax train tiny optim.name=galore_adamw optim.lr=0.01 galore.rank=32`.
