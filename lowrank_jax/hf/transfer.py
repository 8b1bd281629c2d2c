"""``import-hf`` and ``export-hf``: LLaMA checkpoints into a model directory and out to Hugging Face.

Export writes a directory that ``transformers.AutoModelForCausalLM.from_pretrained`` loads:
``config.json`` (``LlamaForCausalLM``), ``model.safetensors`` and the tokenizer files. A model with
factored linears is exported *merged*, each linear replaced by the dense weight its layer computes
with, from the layer kind's registered effective-weight function
(:func:`lowrank_jax.analysis.sensitivity.densify`): LoRA / ReLoRA ``W + A B s``, low-rank ``A B``,
SLTrain ``B A s + S``. The exported model computes the same function.

BitLinear (BitNet b1.58, Ma et al., arXiv 2402.17764) has no dense equivalent: its forward pass
quantises the *activations* to int8 per token as well as the weights. Export writes the ternary
weight dequantised, ``W̃ · γ`` (:func:`lowrank_jax.layers.bitlinear.weight_quant`, values in
``{−γ, 0, γ}``), so a Hugging Face LLaMA sees exactly the ternary weights; its float activations make
its logits close to, not equal to, this project's BitLinear model.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from lowrank_jax.config import ModelConfig
from lowrank_jax.hf import safetensors_io
from lowrank_jax.hf.convert import (
    CheckpointFormatError,
    dense_config,
    hf_config_from_model,
    hf_tensors_from_dense,
    numpy_dtype,
)
from lowrank_jax.hf.model_dir import (
    check_new_output,
    copy_tokenizer_files,
    load_model,
    read_hf_dir,
    save_model_dir,
    write_atomically,
)
from lowrank_jax.layers.bitlinear import EPS, weight_quant


def import_hf(src: str | Path, out: str | Path) -> Path:
    """Read a Hugging Face LLaMA checkpoint directory and write it as a model directory at ``out``."""
    src_dir = Path(src).expanduser()
    if not src_dir.is_dir():
        raise CheckpointFormatError(f"{src}: no such directory")
    out_dir = check_new_output(out)
    cfg, params = read_hf_dir(src_dir)
    save_model_dir(out_dir, cfg, params, src_dir, None)
    return out_dir


def _bitlinear_dense(params: dict[str, Any], cfg: ModelConfig) -> dict[str, Any]:
    def ternary(w):
        w = jnp.asarray(w)
        if w.ndim == 3:  # stacked layers: one scale per layer
            return jax.vmap(lambda x: jnp.multiply(*weight_quant(x, EPS)))(w)
        return jnp.multiply(*weight_quant(w, EPS))

    def walk(node):
        if isinstance(node, dict):
            if set(node) == {"kernel"} and not isinstance(node["kernel"], dict):
                return {"kernel": ternary(node["kernel"])}
            return {k: walk(v) for k, v in node.items()}
        return node

    return {k: (walk(v) if k == "blocks" else v) for k, v in params.items()}


def dense_params(params: dict[str, Any], cfg: ModelConfig) -> tuple[dict[str, Any], ModelConfig]:
    """``(params, cfg)`` of the dense model that computes what ``cfg.dense``'s layers compute (see module doc)."""
    if cfg.dense == "dense":
        return params, cfg
    if cfg.dense == "bitlinear":
        return _bitlinear_dense(params, cfg), dense_config(cfg)
    from lowrank_jax.analysis.sensitivity import densify  # lazy: analysis imports train, which imports hf

    try:
        return densify(params, cfg)
    except ValueError as e:
        raise CheckpointFormatError(f"model.dense: cannot merge {cfg.dense!r} layers for export ({e})") from None


def export_hf(src: str | Path, out: str | Path, dtype: str = "float32") -> Path:
    """Write the model at ``src`` (model directory, run or HF directory) as a Hugging Face checkpoint at ``out``."""
    if dtype not in ("float32", "bfloat16"):
        raise CheckpointFormatError(f"--dtype: must be float32 or bfloat16, got {dtype!r}")
    out_dir = check_new_output(out)
    model = load_model(src)
    params, cfg = dense_params(model.params, model.cfg)
    tensors = hf_tensors_from_dense(jax.tree.map(np.asarray, params), cfg, numpy_dtype(dtype))
    hf_cfg = hf_config_from_model(cfg, dtype)

    def write(tmp: Path) -> None:
        (tmp / "config.json").write_text(json.dumps(hf_cfg, indent=2) + "\n")
        safetensors_io.save_file(tmp / "model.safetensors", tensors, {"format": "pt"})
        src_dir = model.directory if model.source != "run" else None
        copy_tokenizer_files(src_dir, model.tokenizer, tmp)

    write_atomically(out_dir, write)
    return out_dir
