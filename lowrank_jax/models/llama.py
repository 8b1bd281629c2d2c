"""LLaMA decoder in Flax NNX, as used by the GaLore / ReLoRA / SLTrain pretraining recipes.

Pre-norm blocks: ``x + Attn(RMSNorm(x))`` then ``x + SwiGLU(RMSNorm(x))``; rotary position
embeddings (half-split rotation, as in the HF LLaMA port the papers train); causal attention with
``num_kv_heads`` key/value heads shared by groups of query heads (grouped-query attention, Ainslie et
al., arXiv 2305.13245; ``num_kv_heads = heads`` is multi-head attention); an ``lm_head`` of its own
or tied to the input embedding. Reference: Touvron et al., "LLaMA: Open and Efficient Foundation
Language Models", arXiv 2302.13971; rope scaling ``llama3`` as in Llama 3.1 (Grattafiori et al.,
"The Llama 3 Herd of Models", arXiv 2407.21783).

The seven linears of every block (q, k, v, o, gate, up, down) come from the dense factory
(:func:`lowrank_jax.layers.make_dense`), so training methods swap them without touching this file.
Embedding, norms and ``lm_head`` are always plain. Every parameter carries logical axis names in
its ``axes`` metadata; with ``scan_layers`` the blocks are stacked on a leading ``layers`` axis and
run with ``jax.lax.scan`` (optionally rematerialised).
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx

from lowrank_jax.config import ModelConfig
from lowrank_jax.layers.dense import Dense, dtype_of, make_dense


class RMSNorm(nnx.Module):
    """``y = x / sqrt(mean(x²) + eps) * scale``, computed in float32."""

    def __init__(self, dim: int, *, eps: float, dtype: jnp.dtype, param_dtype: jnp.dtype):
        self.eps, self.dtype = eps, dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), axes=("embed",))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(self.dtype)


def rope_frequencies(head_dim: int, theta: float, cfg: ModelConfig | None = None) -> jax.Array:
    """Inverse frequencies ``theta^(-2i/head_dim)`` ``(head_dim // 2,)``, rescaled when ``cfg.rope_scaling='llama3'``.

    Llama-3 scaling keeps wavelengths shorter than ``L / high_freq_factor`` (``L`` the original context
    ``rope_original_max_seq_len``), divides those longer than ``L / low_freq_factor`` by ``rope_factor``
    and interpolates smoothly in between.
    """
    inv_freq = 1.0 / (theta ** (jnp.arange(0, head_dim, 2, dtype=jnp.float32) / head_dim))
    if cfg is None or cfg.rope_scaling == "none":
        return inv_freq
    factor, low, high = cfg.rope_factor, cfg.rope_low_freq_factor, cfg.rope_high_freq_factor
    context = cfg.rope_original_max_seq_len
    wavelen = 2 * math.pi / inv_freq
    scaled = jnp.where(wavelen > context / low, inv_freq / factor, inv_freq)
    smooth = (context / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= context / high) & (wavelen <= context / low)
    return jnp.where(medium, blended, scaled)


def rope_tables(
    seq_len: int, head_dim: int, theta: float, cfg: ModelConfig | None = None, offset: jax.Array | int = 0
) -> tuple[jax.Array, jax.Array]:
    """cos/sin tables ``(seq_len, head_dim // 2)`` for positions ``offset … offset + seq_len − 1``."""
    inv_freq = rope_frequencies(head_dim, theta, cfg)
    positions = jnp.arange(seq_len, dtype=jnp.float32)
    if not (isinstance(offset, int) and offset == 0):
        positions = positions + jnp.asarray(offset, jnp.float32)
    angles = positions[:, None] * inv_freq[None, :]
    return jnp.cos(angles), jnp.sin(angles)


def apply_rope(x_BTHD: jax.Array, cos_TK: jax.Array, sin_TK: jax.Array) -> jax.Array:
    """Rotate the two halves of each head dimension (HF LLaMA convention)."""
    half = x_BTHD.shape[-1] // 2
    x1, x2 = x_BTHD[..., :half].astype(jnp.float32), x_BTHD[..., half:].astype(jnp.float32)
    cos, sin = cos_TK[None, :, None, :], sin_TK[None, :, None, :]
    out = jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)
    return out.astype(x_BTHD.dtype)


# XLA:CPU (README, "CPU performance"); accelerators keep the whole-matrix attention.
CPU_QUERY_BLOCK: int | None = 128  # query rows per block of causal_attention (None: the whole matrix)


def causal_attention(q_BTHD: jax.Array, k_BTHD: jax.Array, v_BTHD: jax.Array, *, block: int | None) -> jax.Array:
    """Causal softmax attention ``softmax(q kᵀ / √d + mask) v`` over ``(B, T, heads, head_dim)``.

    Scores and softmax are float32; the probabilities are cast to ``v``'s dtype for the second product.
    ``block=None`` computes the whole ``(T, T)`` score matrix with the upper triangle masked (the
    accelerator path). ``block=n`` splits the queries into blocks of ``n`` rows and lets block ``i``
    see only keys up to its last row, so the masked upper triangle is never computed: about
    ``(1 + 1/m)/2`` of the work for ``m`` blocks, and score blocks small enough to stay in cache. Same
    values to float32 rounding; on XLA:CPU it cut ``tiny``'s attention (fwd + bwd) from 48 to 30 ms.
    """
    T, scale = q_BTHD.shape[1], 1.0 / math.sqrt(q_BTHD.shape[-1])
    q, k, v = (jnp.swapaxes(a, 1, 2) for a in (q_BTHD, k_BTHD, v_BTHD))  # (B, heads, T, head_dim)
    starts = [0] if block is None else list(range(0, T, block))
    outs = []
    for i, s in enumerate(starts):
        e = starts[i + 1] if i + 1 < len(starts) else T
        scores = jnp.einsum("bhqd,bhkd->bhqk", q[:, :, s:e], k[:, :, :e], preferred_element_type=jnp.float32)
        visible = jnp.arange(e)[None, :] <= jnp.arange(s, e)[:, None]  # key <= query
        scores = jnp.where(visible, scores * scale, -jnp.inf)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        outs.append(jnp.einsum("bhqk,bhkd->bhqd", probs, v[:, :, :e]))
    return jnp.swapaxes(outs[0] if len(outs) == 1 else jnp.concatenate(outs, axis=2), 1, 2)


class Attention(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d = cfg.hidden
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_size
        q_dim, kv_dim = self.heads * self.head_dim, self.kv_heads * self.head_dim
        self.q = make_dense(cfg.dense, d, q_dim, axes=("embed", "heads"), rngs=rngs, config=cfg)
        self.k = make_dense(cfg.dense, d, kv_dim, axes=("embed", "heads"), rngs=rngs, config=cfg)
        self.v = make_dense(cfg.dense, d, kv_dim, axes=("embed", "heads"), rngs=rngs, config=cfg)
        self.o = make_dense(cfg.dense, q_dim, d, axes=("heads", "embed"), rngs=rngs, config=cfg)

    def qkv(self, x_ND: jax.Array, cos: jax.Array, sin: jax.Array, batch: int) -> tuple[jax.Array, ...]:
        """Rotated queries ``(B, T, heads, hd)``, rotated keys and values ``(B, T, kv_heads, hd)``."""
        T = x_ND.shape[0] // batch
        q = apply_rope(self.q(x_ND).reshape(batch, T, self.heads, self.head_dim), cos, sin)
        k = apply_rope(self.k(x_ND).reshape(batch, T, self.kv_heads, self.head_dim), cos, sin)
        v = self.v(x_ND).reshape(batch, T, self.kv_heads, self.head_dim)
        return q, k, v

    def repeat_kv(self, x_BTKD: jax.Array) -> jax.Array:
        """Key/value heads repeated to one per query head (query head ``h`` reads group ``h // (heads/kv)``)."""
        groups = self.heads // self.kv_heads
        return x_BTKD if groups == 1 else jnp.repeat(x_BTKD, groups, axis=2)

    def __call__(self, x_ND: jax.Array, cos: jax.Array, sin: jax.Array, batch: int) -> jax.Array:
        """``x_ND``: the ``batch * T`` tokens of the block, batch-major (see :class:`Block`)."""
        T = x_ND.shape[0] // batch
        q, k, v = self.qkv(x_ND, cos, sin, batch)
        k, v = self.repeat_kv(k), self.repeat_kv(v)
        out = causal_attention(q, k, v, block=CPU_QUERY_BLOCK if jax.default_backend() == "cpu" else None)
        return self.o(out.reshape(batch * T, self.heads * self.head_dim))


class SwiGLU(nnx.Module):
    """``down(silu(gate(x)) * up(x))`` (Shazeer 2020)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.hidden, cfg.ffn
        self.gate = make_dense(cfg.dense, d, f, axes=("embed", "mlp"), rngs=rngs, config=cfg)
        self.up = make_dense(cfg.dense, d, f, axes=("embed", "mlp"), rngs=rngs, config=cfg)
        self.down = make_dense(cfg.dense, f, d, axes=("mlp", "embed"), rngs=rngs, config=cfg)

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.down(jax.nn.silu(self.gate(x)) * self.up(x))


class Block(nnx.Module):
    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        norm = dict(eps=cfg.norm_eps, dtype=dtype_of(cfg.dtype), param_dtype=dtype_of(cfg.param_dtype))
        self.attn_norm = RMSNorm(cfg.hidden, **norm)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = RMSNorm(cfg.hidden, **norm)
        self.mlp = SwiGLU(cfg, rngs)

    def __call__(self, x_BTD: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
        # Inside the block the tokens are one axis, so every linear is a plain 2-D matmul and its
        # weight gradient the 2-D ``xᵀ·dy``. Left (B, T, D), XLA:CPU contracts the weight gradient
        # over two axes and copies the cotangent into a transposed layout first, which made
        # ``tiny``'s step 1.6x slower (README, "CPU performance"); the reshapes are free everywhere.
        B, T, D = x_BTD.shape
        x = x_BTD.reshape(B * T, D)
        x = x + self.attn(self.attn_norm(x), cos, sin, batch=B)
        x = x + self.mlp(self.mlp_norm(x))
        return x.reshape(B, T, D)


def _stacked_blocks(cfg: ModelConfig, key: jax.Array) -> Block:
    """``cfg.layers`` blocks with every parameter stacked on a leading ``layers`` axis."""
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: Block(cfg, nnx.Rngs(0))))
    keys = jax.random.split(key, cfg.layers)
    states = jax.vmap(lambda k: nnx.state(Block(cfg, nnx.Rngs(k))))(keys)
    blocks = nnx.merge(graphdef, states)
    for _, var in nnx.iter_graph(blocks):
        if isinstance(var, nnx.Variable) and "axes" in var.get_metadata():
            var.set_metadata("axes", ("layers", *var.get_metadata()["axes"]))
    return blocks


class Llama(nnx.Module):
    """Decoder-only LM: ``tokens (B, T) int32 -> logits (B, T, vocab) float32``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        if cfg.vocab_size <= 0:
            raise ValueError("model.vocab_size: must be set (> 0) before building the model")
        self.cfg = cfg
        dtype, param_dtype = dtype_of(cfg.dtype), dtype_of(cfg.param_dtype)
        emb = jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.hidden), jnp.float32) * cfg.init_std
        self.embed = nnx.Param(emb.astype(param_dtype), axes=("vocab", "embed"))
        if cfg.scan_layers:
            self.blocks = _stacked_blocks(cfg, rngs.params())
        else:
            self.blocks = nnx.List([Block(cfg, rngs) for _ in range(cfg.layers)])
        self.final_norm = RMSNorm(cfg.hidden, eps=cfg.norm_eps, dtype=dtype, param_dtype=param_dtype)
        if cfg.tie_embeddings:
            return
        self.lm_head = Dense(
            cfg.hidden,
            cfg.vocab_size,
            axes=("embed", "vocab"),
            rngs=rngs,
            init_std=cfg.init_std,
            dtype=dtype,
            param_dtype=param_dtype,
        )

    def embed_tokens(self, tokens_BT: jax.Array) -> jax.Array:
        """Token embeddings ``(B, T, hidden)`` in the compute dtype."""
        return jnp.take(self.embed[...], tokens_BT, axis=0).astype(dtype_of(self.cfg.dtype))

    def rope(self, seq_len: int) -> tuple[jax.Array, jax.Array]:
        cfg = self.cfg
        if seq_len > cfg.max_seq_len:
            raise ValueError(f"seq_len: {seq_len} exceeds model.max_seq_len={cfg.max_seq_len}")
        return rope_tables(seq_len, cfg.head_size, cfg.rope_theta, cfg)

    def head(self, x_BTD: jax.Array) -> jax.Array:
        """Final norm and ``lm_head``: logits ``(B, T, vocab)`` in float32 (one 2-D matmul, as in :class:`Block`)."""
        B, T, D = x_BTD.shape
        h = self.final_norm(x_BTD.reshape(B * T, D))
        if self.cfg.tie_embeddings:
            dtype = dtype_of(self.cfg.dtype)
            logits = h.astype(dtype) @ self.embed[...].astype(dtype).T
        else:
            logits = self.lm_head(h)
        return logits.reshape(B, T, -1).astype(jnp.float32)

    def __call__(self, tokens_BT: jax.Array) -> jax.Array:
        return self.head(self._blocks(self.embed_tokens(tokens_BT), with_rms=False)[0])

    def residual_rms(self, tokens_BT: jax.Array) -> tuple[jax.Array, jax.Array]:
        """RMS of the embeddings and of the residual stream after each block, ``((), (layers,))`` float32.

        The health signal logged at every evaluation: with a learning rate too large for the blocks,
        the block outputs grow orders of magnitude past the embeddings long before the loss says so.
        """
        x = self.embed_tokens(tokens_BT)
        return _rms(x), self._blocks(x, with_rms=True)[1]

    def _blocks(self, x: jax.Array, *, with_rms: bool) -> tuple[jax.Array, jax.Array | None]:
        """The residual stream after the last block, and (``with_rms``) its RMS after each block ``(layers,)``."""
        cfg = self.cfg
        cos, sin = self.rope(x.shape[1])
        if cfg.scan_layers:
            graphdef, state = nnx.split(self.blocks)

            def body(h, layer_state):
                h = nnx.merge(graphdef, layer_state)(h, cos, sin)
                return h, _rms(h) if with_rms else None

            if cfg.remat:
                body = jax.checkpoint(body, policy=jax.checkpoint_policies.nothing_saveable)
            x, rms = jax.lax.scan(body, x, state)
            return x, rms
        rms = []
        for block in self.blocks:
            x = nnx.remat(lambda blk, h: blk(h, cos, sin))(block, x) if cfg.remat else block(x, cos, sin)
            if with_rms:
                rms.append(_rms(x))
        return x, jnp.stack(rms) if with_rms else None


def _rms(x: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.mean(jnp.square(x.astype(jnp.float32))))
