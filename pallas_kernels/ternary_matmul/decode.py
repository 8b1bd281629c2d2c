"""Decoding one bit plane of a packed ternary tile on chip: shifts and masks, or inline PTX on NVIDIA GPUs.

A packed byte holds four weights, one per bit plane (:mod:`pallas_kernels.ternary_matmul.layout`); plane
``j`` of a uint8 tile is the tile's codes ``c = (p >> 2j) & 3`` ∈ {0, 1, 2}, the weights ``c − 1``.
:func:`plane` returns either

* **weights** ``c − 1`` in the compute dtype (bfloat16 or float32), or
* **codes** ``c`` as int8, for an int8 × int8 → int32 product: ``x @ (C − 1) = x @ C − rowsum(x)``, so the
  kernel subtracts each row's activation sum once at the end and the decode needs no subtraction.

Two ways to compute it:

* ``jnp`` shifts, masks and a convert, one weight per operation (every backend; the interpreter).
* ``ptx=True`` (Triton lowered for CUDA): inline PTX that decodes four weights per instance
  (``pack=4``: four bytes of the tile arrive in one 32-bit register). Codes take a shift and one AND for
  four weights (``r >> 2j & 0x03030303`` leaves each byte's code in place: int8 codes need no further
  work). bfloat16 weights use the magic-number trick: two PRMTs lay the four codes under the bfloat16
  exponent byte ``0x43`` (the bit pattern ``0x43‹c›`` is the number 128 + c, exact: bfloat16's unit in
  the last place at 128 is 1), and one bf16x2 FMA per pair subtracts 129. Per four weights that is one
  shift (none for plane 0), one AND, two PRMTs and two FMAs, against a shift, an AND, a convert and a
  subtraction per weight in the ``jnp`` decode (compiled counts: ``experiments/results/sass``).

:data:`PTX_CODES` and :data:`PTX_BF16` are the PTX templates; ``tests/pallas_kernels/test_ternary_decode.py``
executes them, instruction by instruction, against the ``jnp`` decode on every byte value.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental.pallas import triton as pltriton

MAGIC_BYTE = 0x43  # high byte of bfloat16 128.0 (0x4300): 0x43‹c› is 128 + c for c < 128
MINUS_129_X2 = 0xC301C301  # bfloat16 −129.0, twice
ONE_X2 = 0x3F803F80  # bfloat16 1.0, twice

# Four packed bytes in ``$1`` (codes: ``$0``) or ``$2`` (weights: ``$0`` holds weights 0, 1 and ``$1``
# weights 2, 3, low half first). ``{shift}`` is 2j.
PTX_CODES = """{{
.reg .b32 t;
shr.b32 t, $1, {shift};
and.b32 $0, t, 0x03030303;
}}"""
PTX_BF16 = """{{
.reg .b32 t, m, one, bias;
shr.b32 t, $2, {shift};
and.b32 t, t, 0x03030303;
mov.b32 m, 0x{magic:02X}{magic:02X}{magic:02X}{magic:02X};
prmt.b32 $0, t, m, 0x4140;
prmt.b32 $1, t, m, 0x4342;
mov.b32 one, 0x{one:08X};
mov.b32 bias, 0x{bias:08X};
fma.rn.bf16x2 $0, $0, one, bias;
fma.rn.bf16x2 $1, $1, one, bias;
}}"""


def ptx_text(template: str, j: int) -> str:
    """The PTX of ``template`` for plane ``j`` (ptxas drops plane 0's shift by 0)."""
    return template.format(shift=2 * j, magic=MAGIC_BYTE, one=ONE_X2, bias=MINUS_129_X2)


def plane(p_u8: jax.Array, j: int, dtype: jnp.dtype, *, codes: bool = False, ptx: bool = False) -> jax.Array:
    """Plane ``j`` of the uint8 tile ``p_u8``: weights ``c − 1`` in ``dtype``, or (``codes``) int8 codes ``c``.

    ``ptx``: decode with the inline PTX of this module (Triton on CUDA only; bfloat16 weights or codes).
    """
    if not 0 <= j < 4:
        raise ValueError(f"j: a byte holds bit planes 0-3, got {j}")
    if ptx and (codes or dtype == jnp.bfloat16):
        out = jnp.int8 if codes else jnp.bfloat16
        template, constraints = (PTX_CODES, "=r,r") if codes else (PTX_BF16, "=r,=r,r")
        (y,) = pltriton.elementwise_inline_asm(
            ptx_text(template, j),
            args=[p_u8],
            constraints=constraints,
            pack=4,
            result_shape_dtypes=[jax.ShapeDtypeStruct(p_u8.shape, out)],
        )
        return y
    c = (p_u8.astype(jnp.int32) >> (2 * j)) & 3  # 32-bit shifts: what Mosaic TPU lowers
    return c.astype(jnp.int8) if codes else (c - 1).astype(dtype)
