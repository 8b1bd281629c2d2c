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
# # Overtraining: sensitivity grows with tokens
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lowrank-jax/lowrank-jax/blob/main/colab/overtraining.ipynb)
#
# **Runtime:** a TPU (Runtime → Change runtime type → *v5e-1 TPU* or *v6e-1 TPU*); a T4/L4 GPU or the CPU runtime also
# work, at the smaller sizes the *Runtime and size* cell picks.
#
# Springer et al., *Overtrained Language Models Are Harder to Fine-Tune*, ICML 2025,
# [arXiv 2503.19206](https://arxiv.org/abs/2503.19206), find *catastrophic overtraining*: past some token budget, more
# pretraining makes a model worse after fine-tuning. Their mechanism is *progressive sensitivity*: add Gaussian noise
# with each tensor's initialisation scale times `λ` to the weights, and the loss increase for a fixed `λ` grows with
# the number of pretraining tokens. A two-layer linear network explains it: it learns the target's singular values
# from the largest to the smallest, and once the mode being learned is smaller than what the perturbation costs, the
# error under perturbation rises although the clean error keeps falling.
#
# This notebook uses `lowrank_jax.analysis`:
#
# 1. `linear_toy`: the singular values learned in order, and the perturbed error's inflection;
# 2. pretrains a small LLaMA with checkpoints along the way and measures `parameter_sensitivity` of each;
# 3. `finetune_degradation`: fine-tunes every checkpoint on a second domain with fixed hyperparameters and plots the
#    fine-tuned loss and the forgetting of the first domain against the pretraining budget.

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
# `detect_runtime()` reads `jax.default_backend()`: a TPU pretrains over a mesh of all its chips (FSDP) with the most
# tokens, a GPU a mid-sized run, a CPU a small one. `LRJ_COLAB_SIZE` (`smoke`, `cpu`, `gpu`, `tpu`) forces a size;
# the test suite uses `smoke`. `LRJ_COLAB_CACHE` is the tokenizer and token cache, `LRJ_COLAB_OUT` the run directory
# (a fresh temporary directory by default).

# %% tags=["runtime"]
import os

import jax

SIZES = {
    # pretraining: model, corpus (documents per split, 0 = all), vocab, run; a checkpoint every `every` steps;
    # sensitivity: λs, seeds, held-out tokens; fine-tuning: steps at lr
    "smoke": dict(hidden=64, ffn=160, heads=2, layers=2, max_docs=150, vocab=512, tokenizer_chars=200_000,
                  seq_len=32, batch=8, steps=60, every=20, lambdas=(1.0, 4.0), seeds=2, eval_tokens=2048,
                  ft_steps=10, ft_lr=1e-3, mesh=(1, 1, 1)),
    "cpu": dict(hidden=128, ffn=352, heads=4, layers=4, max_docs=600, vocab=2048, tokenizer_chars=2_000_000,
                seq_len=128, batch=16, steps=200, every=25, lambdas=(1.0, 2.0, 4.0, 8.0), seeds=3, eval_tokens=16384,
                ft_steps=40, ft_lr=1e-3, mesh=(1, 1, 1)),
    "gpu": dict(hidden=256, ffn=688, heads=4, layers=4, max_docs=0, vocab=4096, tokenizer_chars=8_000_000,
                seq_len=256, batch=32, steps=1200, every=100, lambdas=(1.0, 2.0, 4.0, 8.0), seeds=4,
                eval_tokens=65536, ft_steps=100, ft_lr=1e-3, mesh=(1, 1, 1)),
    "tpu": dict(hidden=512, ffn=1376, heads=8, layers=8, max_docs=0, vocab=8192, tokenizer_chars=8_000_000,
                seq_len=256, batch=64, steps=2000, every=200, lambdas=(1.0, 2.0, 4.0, 8.0), seeds=4,
                eval_tokens=131072, ft_steps=100, ft_lr=1e-3, mesh=(1, -1, 1)),  # FSDP over every chip
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
# ## 1. The linear toy: singular values are learned in order
#
# `linear_toy` trains `f(x) = W2 W1 x` by gradient descent from a small initialisation on a target `Y = U diag(s) Vᵀ`
# with singular values `10, 5, 2.5, …` (whitened inputs, so the loss is `‖W2 W1 − Y‖²`). It records the learned
# singular values `σ_k(t) = u_kᵀ W2 W1 v_k`, the clean error and the error under a fixed Gaussian perturbation of size
# `γ` of both factors. Learning mode `k` lowers the clean error by `s_k²` but raises the perturbation's cost by
# `γ²(d_in + d_out) s_k`, so it pays off only while `s_k > τ(γ) = γ²(d_in + d_out)`: the perturbed error is minimal
# around the learning of the last mode above `τ` and rises after it — earlier for a larger `γ`.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt

from lowrank_jax.analysis import linear_toy

toy = linear_toy()
s_target = toy.target_singular_values
print(f"target singular values {s_target.tolist()}")
print(f"step at which each mode reaches half its value: {toy.half_steps.tolist()}")
for inf in toy.inflections:
    print(f"γ = {inf.gamma}: τ = {inf.threshold:.2f}, first mode below τ: k* = {inf.mode}, predicted minimum at step "
          f"{inf.predicted_step} (window {inf.predicted_window}), observed {inf.observed_step}, "
          f"rise after the minimum {inf.rise_after_min:+.3f}")  # fmt: skip

fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(16, 4))
for k in range(len(s_target)):
    a1.plot(toy.steps, toy.learned[:, k] / s_target[k], label=f"s_{k + 1} = {s_target[k]:g}")
a1.set(xlabel="gradient-descent step", ylabel="σ_k(t) / s_k", title="singular values learned largest first")
a2.semilogy(toy.steps, toy.clean_error, "k")
a2.set(xlabel="gradient-descent step", ylabel="‖W2 W1 − Y‖²", title="clean error")
for inf in toy.inflections:
    err = toy.perturbed_error[inf.gamma]
    (line,) = a3.plot(toy.steps, err / err.min(), label=f"γ = {inf.gamma} (τ = {inf.threshold:.2f})")
    a3.axvline(inf.observed_step, color=line.get_color(), ls=":", lw=1)
a3.set_xlim(0, 2 * max(toy.half_steps))
a3.set_ylim(0.9, 1.6)
a3.set(xlabel="gradient-descent step", ylabel="perturbed error / its minimum",
       title="perturbed error: a minimum (dotted), then a rise")  # fmt: skip
for ax in (a1, a2, a3):
    ax.grid(alpha=0.3)
a1.legend(fontsize=8)
a3.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2. Pretrain with checkpoints, then measure sensitivity
#
# One pretraining run of the LLaMA on the Python standard library's source (`data.source=stdlib`), with a checkpoint
# every few steps: each checkpoint is a token budget. The learning rate is constant after the warmup
# (`optim.min_lr_ratio=1`, as in `experiments/overtraining.py`), so later checkpoints differ from earlier ones by
# tokens, not by annealing.
#
# `parameter_sensitivity(params, batches, lambdas, n_seeds, key, model_cfg=...)` adds `λ · σ_i · z_i` to every tensor
# `i` (`σ_i` its standard deviation at initialisation: tensors initialised to a constant, such as the norm scales,
# are not perturbed) and reports the mean validation-loss increase over seeds with a 95% band. The seeds' noise is
# the same at every checkpoint (common random numbers), so the budgets are compared on the same draws.

# %%
import tempfile

from lowrank_jax.analysis import finetune_degradation, finetune_token_data, load_params, parameter_sensitivity
from lowrank_jax.analysis.finetune import run_config
from lowrank_jax.config import load_config
from lowrank_jax.data import eval_batches, prepare_data
from lowrank_jax.train.loop import train

OUT = Path(os.environ.get("LRJ_COLAB_OUT") or tempfile.mkdtemp(prefix="lrj_overtraining_"))
cfg = load_config(
    "tiny",
    [
        f"model.hidden={C['hidden']}",
        f"model.ffn={C['ffn']}",
        f"model.heads={C['heads']}",
        f"model.layers={C['layers']}",
        f"model.max_seq_len={C['seq_len']}",
        "data.source=stdlib",
        f"data.max_docs={C['max_docs']}",
        f"data.vocab_size={C['vocab']}",
        f"data.tokenizer_train_chars={C['tokenizer_chars']}",
        f"data.cache_dir={CACHE_DIR}",
        f"seq_len={C['seq_len']}",
        f"batch_size={C['batch']}",
        f"steps={C['steps']}",
        f"mesh={','.join(map(str, C['mesh']))}",
        f"eval_tokens={C['eval_tokens']}",
        "eval_every=0",
        "optim.min_lr_ratio=1.0",
        f"checkpoint_every={C['every']}",
        "keep_checkpoints=1000",
        f"out_dir={OUT / 'pretrain'}",
        "progress=false",
    ],
)
pretrain = train(cfg, log=lambda *a, **k: None)
budgets = list(range(C["every"], C["steps"] + 1, C["every"]))
tokens = [b * cfg.tokens_per_step for b in budgets]
print(f"pretrained {pretrain['params']:,} params for {pretrain['tokens']:,} tokens "
      f"({pretrain['tokens'] / pretrain['params']:.2f} tokens/param); val loss {pretrain['final_val_loss']:.3f}; "
      f"checkpoints at steps {budgets}")  # fmt: skip

# %%
# %matplotlib inline
# (again: `train` renders its loss.png with matplotlib's Agg backend, which switches inline plots off)
pt_data = prepare_data(cfg.data)
val = eval_batches(pt_data.val, cfg.seq_len, cfg.eval_tokens, cfg.eval_batch_size)
LAMBDAS = C["lambdas"]
sens = {}
for step in budgets:
    params, run_cfg, _ = load_params(OUT / "pretrain" / "checkpoints" / str(step))
    sens[step] = parameter_sensitivity(params, val, LAMBDAS, C["seeds"], jax.random.key(0), model_cfg=run_cfg.model)
    print(f"step {step:4d}: clean val loss {sens[step].clean_loss:.3f}; loss increase "
          + ", ".join(f"λ={r.lam:g}: {r.mean:+.3f}" for r in sens[step].rows))  # fmt: skip

fig, ax = plt.subplots(figsize=(7, 4))
for lam in LAMBDAS:
    rows = [sens[s].row(lam) for s in budgets]
    (line,) = ax.plot(tokens, [r.mean for r in rows], "o-", label=f"λ = {lam:g}")
    if rows[0].ci95 is not None:
        ax.fill_between(tokens, [r.ci95[0] for r in rows], [r.ci95[1] for r in rows], color=line.get_color(), alpha=0.2)
ax.set(xlabel="pretraining tokens", ylabel="validation-loss increase (nats/token)", title="sensitivity to noise")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## 3. Fine-tune every checkpoint with the same hyperparameters
#
# The second domain is the English prose of the Python docs (`pydoc`), encoded with the *pretraining* tokenizer
# (`finetune_token_data`). `finetune_degradation` restores a checkpoint, fine-tunes it with a fresh AdamW state for a
# fixed number of steps at a fixed learning rate, and reports both domains before and after: `ft_loss_after` (the
# fine-tuned quality) and `forgetting` (how much the pretraining-domain loss rose). In the paper, past some budget the
# fine-tuned quality gets *worse* with more pretraining (a U-shape).

# %%
pre_cfg = run_config(OUT / "pretrain")  # the run's config.json: the vocabulary size the run resolved
ft_data = finetune_token_data(pre_cfg, "pydoc")
ft = {}
for step in budgets:
    ft[step] = finetune_degradation(
        OUT / "pretrain" / "checkpoints" / str(step),
        ft_data,
        pt_data.val,
        steps=C["ft_steps"],
        lr=C["ft_lr"],
        eval_tokens=C["eval_tokens"],
    )
    r = ft[step]
    print(f"step {step:4d}: pydoc {r['ft_loss_before']:.3f} -> {r['ft_loss_after']:.3f}; stdlib "
          f"{r['pt_loss_before']:.3f} -> {r['pt_loss_after']:.3f} (forgetting {r['forgetting']:+.3f})")  # fmt: skip

fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4))
a1.plot(tokens, [ft[s]["ft_loss_after"] for s in budgets], "o-", label="after fine-tuning")
a1.plot(tokens, [ft[s]["ft_loss_before"] for s in budgets], "o--", label="before fine-tuning")
a1.set(xlabel="pretraining tokens", ylabel="pydoc validation loss", title="fine-tune domain")
a2.plot(tokens, [ft[s]["forgetting"] for s in budgets], "o-", color="tab:red")
a2.set(xlabel="pretraining tokens", ylabel="stdlib loss rise", title="forgetting of the pretraining domain")
for ax in (a1, a2):
    ax.grid(alpha=0.3)
a1.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## Reading the results
#
# * The toy learns its modes strictly in order, and the perturbed error bottoms out near the predicted step and
#   then rises: the paper's mechanism in a closed form.
# * In the LLaMA the sensitivity at a fixed `λ` is measured at every budget on the same noise draws. These runs are
#   tiny (far below one token per parameter), where the paper's models are not yet overtrained; the CPU-scale study in
#   `experiments/overtraining.py` (table in `experiments/results/overtraining/table.md`) found sensitivity mostly
#   rising with tokens and no U-shape of the fine-tuned quality at 0.44 tokens per parameter. Run the `gpu` or `tpu`
#   size (more tokens per parameter) to move towards the paper's regime.
