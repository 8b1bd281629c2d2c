"""Analytic training FLOPs of the LLaMA in :mod:`lowrank_jax.models.llama`, and model FLOPs utilisation.

Counting rules (the "model FLOPs" convention of Kaplan et al., arXiv 2001.08361, and of the PaLM
paper's MFU, Chowdhery et al., arXiv 2204.02311, appendix B):

- A matmul ``(M×K) @ (K×N)`` costs ``2·M·K·N`` FLOPs (one multiply and one add per MAC).
- Per token and per layer the seven linears cost ``2·(2·d·H·hd + 2·d·K·hd + 3·d·f)``: q and o are
  ``d×(H·hd)``, k and v ``d×(K·hd)`` (``H`` query heads, ``K`` key/value heads of size ``hd``; ``4·d²``
  for multi-head attention with ``H·hd = d``); gate and up are ``d×f``; down is ``f×d``.
  ``lm_head`` adds ``2·d·V`` once, tied to the embedding or not. The embedding is a gather and costs
  nothing.
- Attention adds, per token and per layer, ``2·T·H·hd`` for the scores ``q·kᵀ`` and ``2·T·H·hd``
  for ``probs·v`` (summed over the query heads; ``H·hd = d`` for the classic shapes). The model
  computes the full ``T×T`` score matrix and masks it afterwards (``jnp.where`` on a ``tril`` mask), so XLA does all
  ``T²`` products, not the ``T(T+1)/2`` a causal kernel would; we count what is computed. A
  flash-style kernel that skips masked blocks would do about half of this attention work.
- Norms, rotary embeddings, softmax, SiLU, residual adds and the loss are elementwise and left
  out; they are ``O(d + heads·T)`` per token against ``O(d²)`` for the matmuls (about 2% of XLA's
  count for a ``d=64`` toy model, far less at real sizes).
- Training costs ``3×`` the forward pass: the backward pass does two matmuls (input gradient and
  weight gradient) for every forward one. Recomputation under ``model.remat`` is *not* counted:
  MFU measures useful model FLOPs, so remat shows up as lower MFU (a hardware-FLOPs count would
  add one more forward).

Every linear is counted as a dense ``d_in×d_out`` map whatever ``model.dense`` builds, so for
low-rank or sparse layers the numbers are the FLOPs of the dense model they stand in for.

Peak throughputs are the vendors' dense (no 2:4 sparsity) tensor-core numbers. ``float32``
means the TF32 tensor-core peak on NVIDIA Ampere/Hopper, because at JAX's default matmul
precision XLA runs float32 matmuls there in TF32.
"""

from __future__ import annotations

from lowrank_jax.config import ModelConfig

# (lower-case substrings that must all occur in jax's ``device.device_kind``, peak bf16, peak fp32)
# in FLOP/s, dense. Checked in order: the first match wins, so specific variants come first.
PEAK_FLOPS_TABLE: tuple[tuple[tuple[str, ...], float, float | None], ...] = (
    (("h100", "pcie"), 756e12, 378e12),
    (("h100", "nvl"), 835e12, 418e12),
    (("h100",), 989e12, 494.7e12),  # SXM5, device_kind "NVIDIA H100 80GB HBM3"
    (("h200",), 989e12, 494.7e12),  # same GH100 die as the H100 SXM, more and faster HBM
    (("a100",), 312e12, 156e12),  # SXM4 and PCIe alike
    (("tpu", "v6", "lite"), 918e12, None),  # Trillium (v6e)
    (("tpu", "v5", "lite"), 197e12, None),  # v5e
    (("tpu v5",), 459e12, None),  # v5p ("TPU v5" / "TPU v5p"; v5e matched above)
    (("tpu", "v4"), 275e12, None),
)


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name}: must be positive, got {value}")


def linear_flops_per_token(cfg: ModelConfig) -> int:
    """Forward FLOPs per token of every linear: ``2·(L·(2d·H·hd + 2d·K·hd + 3df) + d·V)``."""
    if cfg.vocab_size <= 0:
        raise ValueError("model.vocab_size: must be set (> 0) to count lm_head FLOPs")
    d, f, L, V = cfg.hidden, cfg.ffn, cfg.layers, cfg.vocab_size
    q_dim, kv_dim = cfg.heads * cfg.head_size, cfg.kv_heads * cfg.head_size
    return 2 * (L * (2 * d * q_dim + 2 * d * kv_dim + 3 * d * f) + d * V)


def attention_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of the score and value matmuls: ``L · 2 · 2·T·H·hd`` (full ``T×T``, see module doc)."""
    _check_positive("seq_len", seq_len)
    return cfg.layers * 2 * (2 * seq_len * cfg.heads * cfg.head_size)


def forward_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Forward FLOPs per token of a sequence of ``seq_len`` tokens (linears + attention)."""
    return linear_flops_per_token(cfg) + attention_flops_per_token(cfg, seq_len)


def forward_flops(cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    """Forward FLOPs for ``batch_size`` sequences of ``seq_len`` tokens."""
    _check_positive("batch_size", batch_size)
    return batch_size * seq_len * forward_flops_per_token(cfg, seq_len)


def train_flops_per_token(cfg: ModelConfig, seq_len: int) -> int:
    """Training (forward + backward) FLOPs per token: ``3×`` the forward count."""
    return 3 * forward_flops_per_token(cfg, seq_len)


def train_flops_per_step(cfg: ModelConfig, batch_size: int, seq_len: int) -> int:
    """Training FLOPs of one optimizer step over ``batch_size × seq_len`` tokens (``grad_accum`` does not change it).

    The optimizer update (``O(params)``) is left out, like every other elementwise op.
    """
    return 3 * forward_flops(cfg, batch_size, seq_len)


def peak_flops(device_kind: str, dtype: str = "bfloat16") -> float | None:
    """Peak dense FLOP/s of one device of kind ``device_kind`` (as in ``jax.devices()[0].device_kind``).

    ``dtype`` is the compute dtype, ``"bfloat16"`` or ``"float32"``. Returns None for CPUs and
    devices (or dtypes) not in :data:`PEAK_FLOPS_TABLE`.
    """
    if dtype not in ("bfloat16", "float32"):
        raise ValueError(f"dtype: must be 'bfloat16' or 'float32', got {dtype!r}")
    kind = device_kind.lower()
    for needles, bf16, fp32 in PEAK_FLOPS_TABLE:
        if all(n in kind for n in needles):
            return bf16 if dtype == "bfloat16" else fp32
    return None


def mfu(flops_per_s: float, peak_flops: float | None) -> float | None:
    """Model FLOPs utilisation ``flops_per_s / peak_flops`` (a fraction); None when the peak is unknown."""
    if peak_flops is None:
        return None
    if peak_flops <= 0:
        raise ValueError(f"peak_flops: must be positive, got {peak_flops}")
    if flops_per_s < 0:
        raise ValueError(f"flops_per_s: must be >= 0, got {flops_per_s}")
    return flops_per_s / peak_flops
