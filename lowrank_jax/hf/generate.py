"""Autoregressive decoding with a key/value cache, jitted end to end.

The prompt is run once through the model (*prefill*), writing every layer's rotated keys and values
into a cache of ``prompt + max_new_tokens`` positions; each new token then costs one forward pass of
a single position that attends to the cache (Pope et al., "Efficiently Scaling Transformer
Inference", arXiv 2211.05102). The decode steps run inside one ``jax.lax.fori_loop``, so a whole
generation is two compiled calls. The layers are the model's own modules (:class:`Attention`'s
``qkv`` / ``o``, the SwiGLU and the norms), so every dense kind (LoRA, SLTrain, BitLinear…) decodes
with exactly the linears it trains with.

Sampling: ``temperature=0`` is greedy (argmax); otherwise logits are divided by the temperature and,
with ``top_p < 1``, restricted to the smallest set of tokens whose probability reaches ``top_p``
(nucleus sampling, Holtzman et al., arXiv 1904.09751) before drawing from ``jax.random``.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from functools import partial
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from lowrank_jax.config import ModelConfig
from lowrank_jax.layers.dense import dtype_of
from lowrank_jax.models import abstract_params
from lowrank_jax.models.llama import rope_tables


def _attend(q_BTHD, k_BSKD, v_BSKD, start, groups: int):
    """Queries at positions ``start …`` against cached keys ``0 … S−1`` (later positions masked)."""
    T, S = q_BTHD.shape[1], k_BSKD.shape[1]
    if groups > 1:
        k_BSKD, v_BSKD = jnp.repeat(k_BSKD, groups, axis=2), jnp.repeat(v_BSKD, groups, axis=2)
    scale = 1.0 / math.sqrt(q_BTHD.shape[-1])
    scores = jnp.einsum("bqhd,bkhd->bhqk", q_BTHD, k_BSKD, preferred_element_type=jnp.float32) * scale
    visible = jnp.arange(S)[None, :] <= (start + jnp.arange(T))[:, None]
    probs = jax.nn.softmax(jnp.where(visible, scores, -jnp.inf), axis=-1).astype(v_BSKD.dtype)
    return jnp.einsum("bhqk,bkhd->bqhd", probs, v_BSKD)


def _block_step(block, x_BTD, cache_k, cache_v, cos, sin, start):
    """One block on ``T`` new positions starting at ``start``; returns the output and the updated cache."""
    B, T, D = x_BTD.shape
    attn = block.attn
    h = block.attn_norm(x_BTD.reshape(B * T, D))
    q, k, v = attn.qkv(h, cos, sin, B)
    cache_k = jax.lax.dynamic_update_slice(cache_k, k.astype(cache_k.dtype), (0, start, 0, 0))
    cache_v = jax.lax.dynamic_update_slice(cache_v, v.astype(cache_v.dtype), (0, start, 0, 0))
    out = _attend(q, cache_k, cache_v, start, attn.heads // attn.kv_heads)
    x = x_BTD.reshape(B * T, D) + attn.o(out.reshape(B * T, attn.heads * attn.head_dim))
    x = x + block.mlp(block.mlp_norm(x))
    return x.reshape(B, T, D), cache_k, cache_v


def forward_cached(model, tokens_BT, cache, start):
    """Logits ``(B, T, V)`` of ``T`` tokens at positions ``start …`` and the cache with their keys/values.

    ``cache = (k, v)``, each ``(layers, B, S, kv_heads, head_dim)``.
    """
    cfg: ModelConfig = model.cfg
    x = model.embed_tokens(tokens_BT)
    cos, sin = rope_tables(tokens_BT.shape[1], cfg.head_size, cfg.rope_theta, cfg, offset=start)
    ks, vs = cache
    if cfg.scan_layers:
        graphdef, state = nnx.split(model.blocks)

        def body(h, xs):
            layer_state, ck, cv = xs
            h, ck, cv = _block_step(nnx.merge(graphdef, layer_state), h, ck, cv, cos, sin, start)
            return h, (ck, cv)

        x, (ks, vs) = jax.lax.scan(body, x, (state, ks, vs))
    else:
        new_k, new_v = [], []
        for i, block in enumerate(model.blocks):
            x, ck, cv = _block_step(block, x, ks[i], vs[i], cos, sin, start)
            new_k.append(ck)
            new_v.append(cv)
        ks, vs = jnp.stack(new_k), jnp.stack(new_v)
    return model.head(x), (ks, vs)


def sample_token(logits_BV, key, temperature: float, top_p: float):
    """Greedy (``temperature == 0``) or temperature / nucleus sampling of one token per row."""
    if temperature == 0:
        return jnp.argmax(logits_BV, axis=-1).astype(jnp.int32)
    logits = logits_BV.astype(jnp.float32) / temperature
    if top_p < 1.0:
        order = jnp.argsort(-logits, axis=-1)
        sorted_logits = jnp.take_along_axis(logits, order, axis=-1)
        probs = jax.nn.softmax(sorted_logits, axis=-1)
        before = jnp.cumsum(probs, axis=-1) - probs  # mass of the tokens ranked above
        sorted_logits = jnp.where(before < top_p, sorted_logits, -jnp.inf)
        logits = jnp.full_like(logits, -jnp.inf).at[jnp.arange(logits.shape[0])[:, None], order].set(sorted_logits)
    return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)


@dataclass(frozen=True)
class Generator:
    """Compiled prefill and decode loop for one model (params passed as arguments, not baked in)."""

    cfg: ModelConfig
    graphdef: Any

    @classmethod
    def for_config(cls, cfg: ModelConfig) -> Generator:
        return cls(cfg, abstract_params(cfg)[0])

    def empty_cache(self, batch: int, length: int):
        cfg = self.cfg
        shape = (cfg.layers, batch, length, cfg.kv_heads, cfg.head_size)
        z = jnp.zeros(shape, dtype_of(cfg.dtype))
        return z, z

    @partial(jax.jit, static_argnums=(0,))
    def prefill(self, params, tokens_BT, cache):
        model = nnx.merge(self.graphdef, params)
        logits, cache = forward_cached(model, tokens_BT, cache, 0)
        return logits[:, -1], cache

    @partial(jax.jit, static_argnums=(0, 5, 6, 7, 8))
    def decode(self, params, first_BV, cache, key, prompt_len: int, steps: int, temperature: float, top_p: float):
        """``steps`` new tokens ``(B, steps)`` starting from the prompt's last logits ``first_BV``."""
        model = nnx.merge(self.graphdef, params)
        B = first_BV.shape[0]

        def body(i, carry):
            logits, cache, out, key = carry
            key, sub = jax.random.split(key)
            tok = sample_token(logits, sub, temperature, top_p)
            out = out.at[:, i].set(tok)
            new_logits, cache = forward_cached(model, tok[:, None], cache, prompt_len + i)
            return new_logits[:, -1], cache, out, key

        out = jnp.zeros((B, steps), jnp.int32)
        _, _, out, _ = jax.lax.fori_loop(0, steps, body, (first_BV, cache, out, key))
        return out


def _check(max_new_tokens: int, temperature: float, top_p: float, prompt_len: int, cfg: ModelConfig) -> None:
    if max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens: must be >= 1, got {max_new_tokens}")
    if not (temperature >= 0 and math.isfinite(temperature)):
        raise ValueError(f"--temperature: must be >= 0, got {temperature}")
    if not 0 < top_p <= 1:
        raise ValueError(f"--top-p: must be in (0, 1], got {top_p}")
    if prompt_len < 1:
        raise ValueError("--prompt: encodes to no tokens")
    if prompt_len + max_new_tokens > cfg.max_seq_len:
        raise ValueError(
            f"--max-new-tokens: prompt ({prompt_len}) + {max_new_tokens} new tokens exceed model.max_seq_len="
            f"{cfg.max_seq_len}"
        )


def generate(
    cfg: ModelConfig,
    params: Any,
    prompt_BT: np.ndarray,
    max_new_tokens: int,
    *,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    eos_id: int | None = None,
    timed: bool = True,
) -> tuple[np.ndarray, dict[str, float]]:
    """New tokens ``(B, n)`` after the prompts ``(B, T)`` (cut after the first ``eos_id`` of row 0 when given),
    and timings: ``prefill_s``, ``decode_s`` and ``tokens_per_s`` (decode; with ``timed`` the calls are compiled
    and run once first so that the timings exclude compilation)."""
    prompt = np.asarray(prompt_BT, np.int32)
    _check(max_new_tokens, temperature, top_p, prompt.shape[1], cfg)
    gen = Generator.for_config(cfg)
    params = jax.tree.map(jnp.asarray, params)
    cache = gen.empty_cache(prompt.shape[0], prompt.shape[1] + max_new_tokens)
    key = jax.random.key(seed)
    args = (prompt.shape[1], max_new_tokens, float(temperature), float(top_p))
    # compile both calls first so that the timings below are of decoding alone
    if timed:
        first, c = gen.prefill(params, jnp.asarray(prompt), cache)
        jax.block_until_ready(gen.decode(params, first, c, key, *args))
    t0 = time.perf_counter()
    first, cache = jax.block_until_ready(gen.prefill(params, jnp.asarray(prompt), cache))
    t1 = time.perf_counter()
    out = np.asarray(jax.block_until_ready(gen.decode(params, first, cache, key, *args)))
    t2 = time.perf_counter()
    if eos_id is not None and (out[0] == eos_id).any():
        out = out[:, : int(np.argmax(out[0] == eos_id)) + 1]
    n = prompt.shape[0] * max_new_tokens
    return out, {"prefill_s": t1 - t0, "decode_s": t2 - t1, "tokens_per_s": n / max(t2 - t1, 1e-9)}
