"""LLaMA-family checkpoints between the Hugging Face layout and this project's model.

Hugging Face ``LlamaForCausalLM`` (the port of Touvron et al., arXiv 2302.13971, used by SmolLM2,
TinyLlama and Llama 3.x) stores ``model.layers.{i}.self_attn.{q,k,v,o}_proj.weight``,
``model.layers.{i}.mlp.{gate,up,down}_proj.weight`` as PyTorch ``(out, in)`` matrices, two RMSNorm
scales per layer, ``model.embed_tokens.weight`` ``(V, d)``, ``model.norm.weight`` and, unless tied,
``lm_head.weight`` ``(V, d)``. Here kernels are Flax ``(in, out)`` and, with ``scan_layers``, stacked
on a leading ``layers`` axis. The rotary convention (half-split rotation) is the same on both sides,
so q/k need no permutation. The conversion is a pure re-layout: no value changes, so an import of
an export of an import is bitwise the first import.

Every problem with a checkpoint (non-LLaMA architecture, unsupported option, missing or extra
tensor, a shape that disagrees with ``config.json``) raises :class:`CheckpointFormatError` with a
one-line message naming the file or tensor.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

import jax
import ml_dtypes
import numpy as np

from lowrank_jax.config import Config, ConfigError, ModelConfig


class CheckpointFormatError(ValueError):
    """A Hugging Face checkpoint this project cannot read or write (one line naming the problem)."""


LINEARS = {  # our (module, name) -> HF name inside model.layers.{i}
    ("attn", "q"): "self_attn.q_proj",
    ("attn", "k"): "self_attn.k_proj",
    ("attn", "v"): "self_attn.v_proj",
    ("attn", "o"): "self_attn.o_proj",
    ("mlp", "gate"): "mlp.gate_proj",
    ("mlp", "up"): "mlp.up_proj",
    ("mlp", "down"): "mlp.down_proj",
}
NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
ARCHITECTURES = ("LlamaForCausalLM",)
# Llama-architecture options this model does not implement, with the value it needs
_UNSUPPORTED = {"attention_bias": False, "mlp_bias": False, "hidden_act": "silu", "pretraining_tp": 1}


def _need(hf: Mapping[str, Any], key: str) -> Any:
    if key not in hf:
        raise CheckpointFormatError(f"config.json: missing {key!r}")
    return hf[key]


def _rope(hf: Mapping[str, Any]) -> dict[str, Any]:
    """ModelConfig rope fields from ``rope_theta`` / ``rope_scaling`` or the newer ``rope_parameters``."""
    params = dict(hf.get("rope_parameters") or hf.get("rope_scaling") or {})
    theta = params.get("rope_theta", hf.get("rope_theta", 10000.0))
    kind = params.get("rope_type", params.get("type", "default"))
    out: dict[str, Any] = {"rope_theta": float(theta)}
    if kind == "llama3":
        out.update(
            rope_scaling="llama3",
            rope_factor=float(params["factor"]),
            rope_low_freq_factor=float(params["low_freq_factor"]),
            rope_high_freq_factor=float(params["high_freq_factor"]),
            rope_original_max_seq_len=int(params["original_max_position_embeddings"]),
        )
    elif kind != "default":
        raise CheckpointFormatError(f"config.json: rope scaling {kind!r} is not supported (default or llama3)")
    return out


def model_config_from_hf(hf: Mapping[str, Any], **overrides: Any) -> ModelConfig:
    """The :class:`ModelConfig` of a Hugging Face ``config.json`` (a LLaMA-family causal LM)."""
    archs = hf.get("architectures") or []
    if hf.get("model_type") != "llama" or not set(archs) <= set(ARCHITECTURES):
        got = ", ".join(archs) or hf.get("model_type") or "?"
        raise CheckpointFormatError(f"config.json: architecture {got} is not a LLaMA causal LM ({ARCHITECTURES[0]})")
    for key, want in _UNSUPPORTED.items():
        if hf.get(key, want) != want:
            raise CheckpointFormatError(f"config.json: {key}={hf[key]!r} is not supported (needs {want!r})")
    hidden, heads = int(_need(hf, "hidden_size")), int(_need(hf, "num_attention_heads"))
    head_dim = int(hf.get("head_dim") or hidden // heads)
    fields = dict(
        vocab_size=int(_need(hf, "vocab_size")),
        hidden=hidden,
        ffn=int(_need(hf, "intermediate_size")),
        heads=heads,
        layers=int(_need(hf, "num_hidden_layers")),
        num_kv_heads=int(hf.get("num_key_value_heads") or heads),
        head_dim=0 if head_dim * heads == hidden else head_dim,
        max_seq_len=int(hf.get("max_position_embeddings", 2048)),
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        init_std=float(hf.get("initializer_range", 0.02)),
        **_rope(hf),
    )
    fields.update(overrides)
    try:
        cfg = ModelConfig(**fields)
        Config(model=cfg, seq_len=min(cfg.max_seq_len, 256))  # the cross-field shape rules
    except ConfigError as e:
        raise CheckpointFormatError(f"config.json: {e}") from None
    return cfg


def hf_config_from_model(cfg: ModelConfig, torch_dtype: str = "float32") -> dict[str, Any]:
    """A ``config.json`` dict that ``transformers.LlamaConfig`` reads as ``cfg``'s architecture."""
    out: dict[str, Any] = {
        "architectures": list(ARCHITECTURES),
        "model_type": "llama",
        "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.hidden,
        "intermediate_size": cfg.ffn,
        "num_attention_heads": cfg.heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_size,
        "num_hidden_layers": cfg.layers,
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": cfg.init_std,
        "hidden_act": "silu",
        "attention_bias": False,
        "mlp_bias": False,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": None,
        "torch_dtype": torch_dtype,
    }
    if cfg.rope_scaling == "llama3":
        out["rope_scaling"] = {
            "rope_type": "llama3",
            "factor": cfg.rope_factor,
            "low_freq_factor": cfg.rope_low_freq_factor,
            "high_freq_factor": cfg.rope_high_freq_factor,
            "original_max_position_embeddings": cfg.rope_original_max_seq_len,
        }
    return out


def _take(tensors: dict[str, np.ndarray], name: str, shape: tuple[int, ...]) -> np.ndarray:
    if name not in tensors:
        raise CheckpointFormatError(f"safetensors: missing tensor {name!r}")
    t = tensors.pop(name)
    if tuple(t.shape) != shape:
        raise CheckpointFormatError(
            f"safetensors: tensor {name!r} has shape {tuple(t.shape)}, config.json implies {shape}"
        )
    return t


def params_from_hf(tensors: Mapping[str, np.ndarray], cfg: ModelConfig, dtype: np.dtype) -> dict[str, Any]:
    """Our dense pure-dict params (``cfg.scan_layers`` layout, ``dtype``) from HF tensors (checked)."""
    rest = dict(tensors)
    d, f, V = cfg.hidden, cfg.ffn, cfg.vocab_size
    qd, kvd = cfg.heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    out_in = {"q": (qd, d), "k": (kvd, d), "v": (kvd, d), "o": (d, qd), "gate": (f, d), "up": (f, d), "down": (d, f)}
    cast = lambda a: np.asarray(a).astype(dtype)
    layers = []
    for i in range(cfg.layers):
        pre = f"model.layers.{i}."
        layer: dict[str, Any] = {"attn": {}, "mlp": {}}
        for (mod, name), hf_name in LINEARS.items():
            w = _take(rest, f"{pre}{hf_name}.weight", out_in[name])
            layer[mod][name] = {"kernel": cast(w.T)}
        for ours, hf_name in NORMS.items():
            layer[ours] = {"scale": cast(_take(rest, f"{pre}{hf_name}.weight", (d,)))}
        layers.append(layer)
    params: dict[str, Any] = {
        "embed": cast(_take(rest, "model.embed_tokens.weight", (V, d))),
        "final_norm": {"scale": cast(_take(rest, "model.norm.weight", (d,)))},
    }
    head = rest.pop("lm_head.weight", None)
    if not cfg.tie_embeddings:
        if head is None:
            raise CheckpointFormatError("safetensors: missing tensor 'lm_head.weight' (tie_word_embeddings is false)")
        rest["lm_head.weight"] = head
        params["lm_head"] = {"kernel": cast(_take(rest, "lm_head.weight", (V, d)).T)}
    rest = {k: v for k, v in rest.items() if not k.endswith("rotary_emb.inv_freq")}
    if rest:
        raise CheckpointFormatError(f"safetensors: unexpected tensor {sorted(rest)[0]!r} for config.json's model")
    if cfg.scan_layers:
        params["blocks"] = jax.tree.map(lambda *xs: np.stack(xs), *layers)
    else:
        params["blocks"] = dict(enumerate(layers))
    return params


def layer_params(params: Mapping[str, Any], cfg: ModelConfig) -> list[dict[str, Any]]:
    """The blocks' params as one dict per layer, whatever ``cfg.scan_layers`` is."""
    blocks = params["blocks"]
    if not cfg.scan_layers:
        return [blocks[i] if i in blocks else blocks[str(i)] for i in range(cfg.layers)]
    return [jax.tree.map(lambda x, i=i: np.asarray(x)[i], blocks) for i in range(cfg.layers)]


def hf_tensors_from_dense(params: Mapping[str, Any], cfg: ModelConfig, dtype: np.dtype) -> dict[str, np.ndarray]:
    """HF tensors from our *dense* params (every linear a ``{"kernel": (in, out)}``)."""
    cast = lambda a: np.ascontiguousarray(np.asarray(a).astype(dtype))
    out = {"model.embed_tokens.weight": cast(params["embed"]), "model.norm.weight": cast(params["final_norm"]["scale"])}
    for i, layer in enumerate(layer_params(params, cfg)):
        pre = f"model.layers.{i}."
        for (mod, name), hf_name in LINEARS.items():
            out[f"{pre}{hf_name}.weight"] = cast(np.asarray(layer[mod][name]["kernel"]).T)
        for ours, hf_name in NORMS.items():
            out[f"{pre}{hf_name}.weight"] = cast(layer[ours]["scale"])
    if not cfg.tie_embeddings:
        out["lm_head.weight"] = cast(np.asarray(params["lm_head"]["kernel"]).T)
    return out


def numpy_dtype(name: str) -> np.dtype:
    """``float32`` / ``bfloat16`` as a NumPy dtype."""
    return np.dtype(np.float32) if name == "float32" else np.dtype(ml_dtypes.bfloat16)


def dense_config(cfg: ModelConfig) -> ModelConfig:
    """``cfg`` with plain dense linears (the architecture of an exported checkpoint)."""
    return dataclasses.replace(cfg, dense="dense")
