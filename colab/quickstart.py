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
# # lowrank-jax quickstart
#
# [![Open In Colab](https://colab.research.google.com/assets/colab-badge.svg)](https://colab.research.google.com/github/lowrank-jax/lowrank-jax/blob/main/colab/quickstart.ipynb)
#
# **Runtime:** any: the CPU runtime is enough (a few minutes); a T4 GPU or a TPU is faster.
#
# **lowrank-jax** is a JAX/Flax NNX codebase for memory-efficient LLM pretraining (GaLore, ReLoRA,
# SLTrain, ternary training) that runs the same code on a laptop CPU, one GPU and a TPU pod. Runs
# are described by a named YAML config plus `key=value` overrides, and every run writes
# `results.json`, `metrics.jsonl`, a loss plot and checkpoints into its output directory.
#
# This notebook:
#
# 1. installs the package (from GitHub in Colab; the local checkout otherwise),
# 2. pretrains the `tiny` LLaMA on the embedded Python-stdlib corpus through the Python API
#    (`load_config` + `train`; a few minutes on a CPU, faster on a Colab GPU or TPU),
# 3. plots the training and validation loss from `metrics.jsonl`,
# 4. compares the final validation perplexity with a unigram baseline.

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
# ## Parameters
#
# The defaults train `tiny` for 200 steps (about 0.8M tokens). The environment variables let the
# test suite run this notebook as a short smoke test: `LRJ_QUICKSTART_STEPS` (number of steps),
# `LRJ_QUICKSTART_OVERRIDES` (extra `key=value` overrides, shell-quoted, space-separated) and
# `LRJ_QUICKSTART_OUT` (output directory; a fresh temporary directory by default).

# %%
import os
import shlex
import tempfile

QUICKSTART_STEPS = int(os.environ.get("LRJ_QUICKSTART_STEPS", "200"))
QUICKSTART_OVERRIDES = shlex.split(os.environ.get("LRJ_QUICKSTART_OVERRIDES", ""))
OUT_DIR = os.environ.get("LRJ_QUICKSTART_OUT") or tempfile.mkdtemp(prefix="lrj_quickstart_")
print(f"steps={QUICKSTART_STEPS} overrides={QUICKSTART_OVERRIDES} out_dir={OUT_DIR}")

# %% [markdown]
# ## Train
#
# `load_config` resolves the named config and the overrides into validated frozen dataclasses
# (a bad key or value is a one-line `ConfigError` before anything compiles); `train` prepares the
# data and tokenizer, compiles the sharded train step and runs it, evaluating on held-out text.

# %%
import jax

from lowrank_jax.config import load_config
from lowrank_jax.train.loop import train

print(f"jax {jax.__version__} on {jax.devices()[0].device_kind} ({jax.default_backend()})")
cfg = load_config("tiny", [f"steps={QUICKSTART_STEPS}", f"out_dir={OUT_DIR}", *QUICKSTART_OVERRIDES])
results = train(cfg)

# %% [markdown]
# ## Loss curves
#
# Each line of `metrics.jsonl` is one record: training records carry `loss`, evaluation records
# carry `val_loss`, and both carry the number of `tokens` seen.

# %%
# %matplotlib inline
import matplotlib.pyplot as plt

from lowrank_jax.train.metrics import read_metrics

records = read_metrics(Path(OUT_DIR) / "metrics.jsonl")
train_recs = [r for r in records if "loss" in r]
val_recs = [r for r in records if "val_loss" in r]

fig, ax = plt.subplots(figsize=(7, 4))
ax.plot([r["tokens"] for r in train_recs], [r["loss"] for r in train_recs], label="train loss")
ax.plot([r["tokens"] for r in val_recs], [r["val_loss"] for r in val_recs], "o-", label="validation loss")
ax.axhline(results["unigram_val_loss"], color="gray", ls="--", lw=1, label="unigram baseline")
ax.set_xlabel("tokens")
ax.set_ylabel("cross-entropy (nats/token)")
ax.set_title(f"tiny: {results['params'] / 1e6:.2f}M params")
ax.grid(alpha=0.3)
ax.legend()
plt.show()

# %% [markdown]
# ## Result
#
# The unigram baseline is the perplexity of predicting every token from its training-set
# frequency alone; a model that has learned anything about context beats it.

# %%
print(
    f"final validation perplexity: {results['final_val_ppl']:.2f} "
    f"(unigram baseline {results['unigram_val_ppl']:.2f}) after {results['tokens']:,} tokens"
)
print(f"{results['tokens_per_s']:,.0f} tokens/s; run directory {OUT_DIR}")

# %% [markdown]
# ## Next steps
#
# The same run from a shell, with any config key overridable on the command line:
#
# ```bash
# lowrank-jax train tiny                        # writes runs/tiny/{results.json,metrics.jsonl,loss.png}
# lowrank-jax train tiny steps=500 optim.lr=1e-3 out_dir=runs/tiny_500
# lowrank-jax configs                           # list the named configs (tiny ... llama_7b)
# lowrank-jax params llama_60m model.vocab_size=32000   # parameter count without allocating
# ```
