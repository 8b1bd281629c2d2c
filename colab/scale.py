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
# # Scale: meshes, sharded optimizer state, the 7B memory table, the per-layer update
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lowrank-jax/lowrank-jax/blob/main/colab/scale.ipynb)
#
# **Runtime:** a TPU (Runtime → Change runtime type → *v5e-1 TPU* or *v6e-1 TPU*); a T4/L4 GPU or the CPU runtime also
# work, at the smaller sizes the *Runtime and size* cell picks.
#
# The same train step runs on one CPU and on a TPU pod: it is one `jax.jit` with explicit input/output shardings on
# a `(data, fsdp, tensor)` device mesh, and every parameter names its dimensions logically (`embed`, `mlp`, `heads`,
# `vocab`, `rank`, `layers`, …) so rules can map them to mesh axes. This notebook:
#
# 1. builds meshes and shows how parameters *and optimizer state* (Adam moments, GaLore's projectors and low-rank
#    moments) are sharded, and what each device holds;
# 2. compiles the LLaMA-7B train step ahead of time on abstract inputs (nothing is allocated) and tabulates XLA's
#    per-device memory analysis for the methods, on one device and with FSDP (on one TPU chip or a T4/L4 GPU the
#    table is LLaMA-1B's, whose every row fits 16 GiB per TPU chip and a 15 GiB T4) — the memory claims of GaLore
#    ([arXiv 2403.03507](https://arxiv.org/abs/2403.03507): 7B in 22 GB with 8-bit states and per-layer updates),
#    SLTrain ([arXiv 2406.02214](https://arxiv.org/abs/2406.02214)) and ReLoRA
#    ([arXiv 2307.05695](https://arxiv.org/abs/2307.05695)) checked from the compiled program;
# 3. runs the per-layer update (each block updated inside the backward pass, so the full gradient never exists) next
#    to the ordinary step: same losses, less temporary memory.
#
# On a CPU, XLA is asked for 8 host devices so that every mesh can be built and compiled without the hardware.

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
# ## XLA flags, before JAX starts
#
# XLA reads `XLA_FLAGS` when JAX first initialises a backend, so this cell must run before anything touches a
# device (restart the runtime if it did). Two flags, as `lowrank-jax memory --devices 8 --no-licm` sets them:
#
# * 8 host (CPU) devices — only the CPU platform is affected; a TPU or GPU runtime keeps its real chips;
# * loop-invariant code motion off: on the CPU backend bf16 matmuls run in float32 and that pass hoists a float32
#   copy of every stacked bf16 weight out of the layer loop, memory an accelerator compile never allocates.

# %%
import os

from lowrank_jax.train.memory import NO_LICM_FLAG, request_host_devices

request_host_devices(8)
os.environ["XLA_FLAGS"] = f"{os.environ['XLA_FLAGS']} {NO_LICM_FLAG}"
print("XLA_FLAGS =", os.environ["XLA_FLAGS"])

# %% [markdown]
# ## Runtime and size
#
# `detect_runtime()` reads `jax.default_backend()`: on a TPU the meshes span all its chips and the memory table is
# compiled for the TPU itself, at LLaMA-1B (the TPU compiler refuses a program larger than the chip, and the 7B
# AdamW step needs about 75 GiB); on a GPU for the GPU, also at 1B; on a CPU, where compiling allocates nothing,
# for the 8 host devices at 7B. `LRJ_COLAB_SIZE` (`smoke`, `cpu`, `gpu`, `tpu`) forces a size; the test suite uses
# `smoke`, which compiles fewer rows of the table.

# %% tags=["runtime"]
import os

import jax

# the memory table's rows: (label, `lowrank-jax memory` overrides); "fsdp" rows shard over every device of the mesh
ROWS_SMOKE = [
    ("AdamW", ["method=adamw"]),
    ("GaLore r=1024", ["method=galore"]),
    ("GaLore r=1024 + per-layer update", ["method=galore", "layerwise_update=true"]),
    ("ReLoRA / LoRA r=128", ["method=relora"]),
]
ROWS_ALL = ROWS_SMOKE + [
    ("8-bit Adam", ["method=adamw8bit"]),
    ("8-bit GaLore r=1024", ["method=galore8bit"]),
    ("8-bit GaLore r=1024 + per-layer update", ["method=galore8bit", "layerwise_update=true"]),
    ("SLTrain r=1024 δ=0.05", ["method=sl"]),
    ("APOLLO-Mini r=1 + per-layer update", ["method=apollo_mini", "layerwise_update=true"]),
]
SIZES = {
    # demo model (trained a few steps on its mesh); the memory table (`table`: its preset), its rows on one device
    # and with FSDP over all devices
    "smoke": dict(hidden=64, ffn=160, heads=2, layers=2, vocab=512, tokenizer_chars=200_000, seq_len=32, batch=8,
                  steps=4, mesh=(2, 2, 2), table="llama_7b", rows=ROWS_SMOKE, fsdp_rows=ROWS_SMOKE[:1]),
    "cpu": dict(hidden=128, ffn=352, heads=4, layers=4, vocab=1024, tokenizer_chars=500_000, seq_len=128, batch=16,
                steps=10, mesh=(2, 2, 2), table="llama_7b", rows=ROWS_ALL, fsdp_rows=ROWS_SMOKE),
    "gpu": dict(hidden=256, ffn=688, heads=4, layers=4, vocab=4096, tokenizer_chars=2_000_000, seq_len=256,
                batch=32, steps=10, mesh=(1, -1, 1), table="llama_1b", rows=ROWS_ALL, fsdp_rows=ROWS_ALL),
    "tpu": dict(hidden=512, ffn=1376, heads=8, layers=8, vocab=8192, tokenizer_chars=2_000_000, seq_len=256,
                batch=64, steps=10, mesh=(1, -1, 1), table="llama_1b", rows=ROWS_ALL, fsdp_rows=ROWS_ALL),
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
print({k: v for k, v in C.items() if "rows" not in k})

# %% [markdown]
# ## 1. A mesh, and what each device holds
#
# `mesh=(data, fsdp, tensor)` (one `-1` takes the remaining devices). The rules (`lowrank_jax.sharding.DEFAULT_RULES`)
# map `embed → fsdp`, `mlp`, `heads`, `vocab → tensor` and the batch over `data × fsdp`. The optimizer state is
# sharded by aligning each state leaf's dimensions with its parameter's (`state_shardings`): an Adam moment shards
# like its parameter; GaLore's projector `(layers, in, r)` shards its `in` like the kernel, its low-rank moment
# `(layers, r, out)` its `out`. `make_trainer` builds all of it from the config, without allocating anything.

# %%
import numpy as np

from lowrank_jax.config import load_config
from lowrank_jax.data import BatchIterator, prepare_data
from lowrank_jax.train.step import compile_train_step, compiled_memory, make_trainer

MESH = ",".join(map(str, C["mesh"]))
base = [
    f"model.hidden={C['hidden']}",
    f"model.ffn={C['ffn']}",
    f"model.heads={C['heads']}",
    f"model.layers={C['layers']}",
    f"model.max_seq_len={C['seq_len']}",
    "data.source=pydoc",
    f"data.vocab_size={C['vocab']}",
    f"data.tokenizer_train_chars={C['tokenizer_chars']}",
    f"data.cache_dir={CACHE_DIR}",
    f"seq_len={C['seq_len']}",
    f"batch_size={C['batch']}",
    f"steps={C['steps']}",
    "optim.name=galore_adamw",
    "optim.lr=0.01",
    "galore.rank=16",
    "progress=false",
]
data = prepare_data(load_config("tiny", base).data)
base.append(f"model.vocab_size={data.vocab_size}")
cfg = load_config("tiny", [*base, f"mesh={MESH}"])
trainer = make_trainer(cfg)
mesh = trainer.mesh
print(f"mesh {dict(mesh.shape)} over {mesh.devices.size} {mesh.devices.flat[0].platform} devices")


def show(tree, keep):
    for path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
        name = jax.tree_util.keystr(path)
        if keep(name):
            print(f"  {name[:92]:92s} {str(leaf.shape):18s} {leaf.sharding.spec}")


abstract = trainer.abstract_state
print("parameters:")
show(abstract.params, lambda n: "attn']['q" in n or "mlp']['up" in n or n in ("['embed']", "['lm_head']['kernel']"))
print("optimizer state of blocks/mlp/up (GaLore: projector and low-rank Adam moments):")
show(abstract.opt_state, lambda n: "mlp']['up']['kernel']" in n)

# %%
state = trainer.init_state()
dev0 = mesh.devices.flat[0]


def bytes_on(tree, device):
    return sum(s.data.nbytes for leaf in jax.tree.leaves(tree) for s in leaf.addressable_shards if s.device == device)


def total_bytes(tree):
    return sum(leaf.nbytes for leaf in jax.tree.leaves(tree))


for name, tree in (("params", state.params), ("optimizer state", state.opt_state)):
    print(f"{name:16s} {total_bytes(tree) / 1e3:9.1f} kB in all, {bytes_on(tree, dev0) / 1e3:8.1f} kB on device 0")
if hasattr(jax.debug, "visualize_array_sharding"):
    print("lm_head kernel (embed, vocab) over the mesh:")
    jax.debug.visualize_array_sharding(state.params["lm_head"]["kernel"])

batches = BatchIterator(data.train, cfg.batch_size, cfg.seq_len, seed=0)
mesh_losses = []
for t in range(cfg.steps):
    state, m = trainer.train_step(state, trainer.put_batch(batches.batch(t)))
    mesh_losses.append(float(m["loss"]))
print(f"{cfg.steps} GaLore steps on the {MESH} mesh: loss {mesh_losses[0]:.3f} -> {mesh_losses[-1]:.3f}")

# %% [markdown]
# ## 2. The memory table, from XLA
#
# `lowrank_jax.train.memory.step_memory(cfg)` builds the run's trainer on abstract inputs, lowers and compiles the
# train step ahead of time and returns `compiled.memory_analysis()`: argument bytes (params + optimizer state +
# batch), temporaries and the peak estimate `arguments + outputs + temporaries − aliased (donated)`, per device.
# `expand_method` turns `method=NAME` into the overrides `lowrank-jax memory` uses (GaLore r=1024, SLTrain r=1024
# δ=0.05, ReLoRA r=128 — the papers' 7B settings). BF16 parameters, one sequence of 256 tokens per device.

# %%
import time

from lowrank_jax.train.memory import expand_method, step_memory

GIB = 2**30
COMMON = ["model.param_dtype=bfloat16", "seq_len=256"]
n_dev = jax.device_count()
table = []
plan = [(label, ov, 1) for label, ov in C["rows"]]
if n_dev > 1:
    plan += [(label, ov, n_dev) for label, ov in C["fsdp_rows"]]
t0 = time.time()
for label, overrides, devices in plan:
    mesh_ov = [f"mesh=1,{devices},1", f"batch_size={devices}"]
    report = step_memory(load_config(C["table"], expand_method([*COMMON, *overrides, *mesh_ov])))
    mem = report["xla_memory"]
    table.append(dict(label=label, devices=devices, params=report["param_bytes"] / GIB,
                      state=report["optimizer_state_bytes"] / GIB, args=mem["argument_size_in_bytes"] / GIB,
                      temp=mem["temp_size_in_bytes"] / GIB, peak=mem["peak_estimate_bytes"] / GIB))  # fmt: skip
print(f"compiled {len(plan)} train steps of {C['table']} ({report['params'] / 1e9:.2f}B params) in "
      f"{time.time() - t0:.0f} s for {jax.devices()[0].device_kind}")  # fmt: skip
header = f"{'method':42s} {'devices':>7s} {'params':>8s} {'opt state':>9s} | per device: "
print(header + f"{'args':>7s} {'temp':>7s} {'peak':>7s} GiB")
for r in table:
    print(f"{r['label']:42s} {r['devices']:7d} {r['params']:8.2f} {r['state']:9.2f} |             "
          f"{r['args']:7.2f} {r['temp']:7.2f} {r['peak']:7.2f}")  # fmt: skip
peak = {(r["label"], r["devices"]): r["peak"] for r in table}
saving = 1 - peak[("GaLore r=1024 + per-layer update", 1)] / peak[("GaLore r=1024", 1)]
print(f"per-layer update: GaLore's peak falls by {100 * saving:.0f}% on one device (GaLore paper: 8-bit GaLore with "
      "per-layer updates trains 7B in 22.0 GB, measured on a GPU)")  # fmt: skip

# %%
import matplotlib.pyplot as plt

labels = [f"{r['label']}" + ("" if r["devices"] == 1 else f" (FSDP/{r['devices']})") for r in table]
args = np.array([r["args"] for r in table])
temps = np.array([r["peak"] - r["args"] for r in table])  # outputs + temporaries − aliased
fig, ax = plt.subplots(figsize=(10, 0.45 * len(table) + 1.5))
y = np.arange(len(table))[::-1]
ax.barh(y, args, label="arguments: params + optimizer state + batch")
ax.barh(y, temps, left=args, label="the rest of the peak: temporaries (+ outputs − donated)")
ax.axvline(24, color="k", ls=":", lw=1, label="24 GB consumer GPU")
ax.set_yticks(y, labels)
ax.set_xlabel("GiB per device (XLA memory analysis of the compiled step)")
ax.set_title(f"{C['table']} train step, bf16 parameters, compiled for {jax.devices()[0].device_kind}")
ax.legend(loc="lower right", fontsize=8)
ax.grid(alpha=0.3, axis="x")
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 3. The per-layer update next to the ordinary step
#
# `layerwise_update=true` replaces the step by a reverse loop over the scanned blocks: block `l`'s gradient is
# computed by its own `jax.vjp`, clipped by the true global norm (a first pass computes it) and applied at once, so
# only one block's gradient exists at a time; embeddings and head are updated in row chunks. Unlike the official
# GaLore hooks it accumulates micro-batches exactly and clips. Same model, same batches, both on one device: the
# losses agree, and the compiled step's temporaries are smaller.

# %%
runs = {}
for name, extra in (("ordinary step", []), ("per-layer update", ["layerwise_update=true"])):
    c = load_config("tiny", [*base, "mesh=1,1,1", *extra])
    tr = make_trainer(c)
    mem = compiled_memory(compile_train_step(tr))
    st = tr.init_state()
    losses = []
    for t in range(c.steps):
        st, m = tr.train_step(st, tr.put_batch(batches.batch(t)))
        losses.append(float(m["loss"]))
    runs[name] = dict(loss=np.array(losses), temp=mem["temp_size_in_bytes"], peak=mem["peak_estimate_bytes"])
    print(f"{name:16s} losses {np.round(losses, 4).tolist()}; temporaries {mem['temp_size_in_bytes'] / 1e6:.2f} MB, "
          f"peak {mem['peak_estimate_bytes'] / 1e6:.2f} MB")  # fmt: skip
diff = float(np.max(np.abs(runs["ordinary step"]["loss"] - runs["per-layer update"]["loss"])))
print(f"per-layer vs ordinary: max loss difference {diff:.1e} over {cfg.steps} steps")

# %% [markdown]
# ## Reading the results
#
# * Parameters and every piece of optimizer state are sharded by their logical axes: with FSDP each device holds a
#   fraction of both, and the GaLore state follows its kernel.
# * The memory table is XLA's own accounting of the compiled program (on a CPU, of the CPU program: bf16 matmuls
#   there may add float32 copies an accelerator does not need; on a Colab TPU or GPU the same cell measures that
#   chip).
#   GaLore's projected moments shrink the optimizer state; the per-layer update removes the gradient-sized
#   temporaries; FSDP divides what is left by the number of devices.
# * The per-layer update computes the same losses as the ordinary step with less temporary memory.
#
# From the command line: `lowrank-jax memory llama_7b method=galore8bit model.param_dtype=bfloat16 batch_size=1
# layerwise_update=true --no-licm`; `python experiments/memory_7b.py` writes the whole table.
