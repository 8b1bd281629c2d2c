"""The ternary decode's inline PTX, executed instruction by instruction against the jnp decode; and where it is used.

No GPU runs here, so the PTX text the CUDA kernel carries is run by a small executor of the five
instructions it uses (``mov``, ``shr``, ``and``, ``prmt`` in its default mode, ``fma.rn.bf16x2``), written
from the PTX ISA's definitions, on every byte value and every plane.
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from pallas_kernels.lowering import export_for, triton_kernels
from pallas_kernels.platforms import Target
from pallas_kernels.ternary_matmul import packed_rows, ternary_matmul
from pallas_kernels.ternary_matmul.decode import PTX_BF16, PTX_CODES, plane, ptx_text

S = jax.ShapeDtypeStruct
BYTES = np.arange(256, dtype=np.uint8)


def _bf16x2(word: int) -> tuple[float, float]:
    halves = np.array([word & 0xFFFF, word >> 16], np.uint16).view(ml_dtypes.bfloat16)
    return float(halves[0]), float(halves[1])


def _to_bf16x2(lo: float, hi: float) -> int:
    bits = np.array([lo, hi], np.float32).astype(ml_dtypes.bfloat16).view(np.uint16).astype(np.uint32)
    return int(bits[0] | (bits[1] << 16))


def _prmt(a: int, b: int, selector: int) -> int:
    """PTX ``prmt.b32`` default mode: byte i of the result is byte ``selector[4i+2:4i]`` of {b, a}; bit 4i+3
    replicates that byte's sign bit."""
    pool = (b << 32) | a
    out = 0
    for i in range(4):
        nibble = (selector >> (4 * i)) & 0xF
        byte = (pool >> (8 * (nibble & 7))) & 0xFF
        if nibble & 8:
            byte = 0xFF if byte & 0x80 else 0
        out |= byte << (8 * i)
    return out


def run_ptx(text: str, operands: dict[str, int]) -> dict[str, int]:
    """Execute ``text`` (the subset the decode uses) on 32-bit ``operands`` (``$0`` …); returns the registers."""
    regs = dict(operands)
    value = lambda tok: int(tok, 0) if re.fullmatch(r"-?(0x[0-9a-fA-F]+|\d+)", tok) else regs[tok]
    for line in text.splitlines():
        line = line.strip().rstrip(";")
        if not line or line in "{}" or line.startswith(".reg"):
            continue
        op, args = line.split(None, 1)
        dst, *src = [a.strip() for a in args.split(",")]
        v = [value(s) for s in src]
        if op == "mov.b32":
            regs[dst] = v[0]
        elif op == "shr.b32":
            regs[dst] = v[0] >> v[1]
        elif op == "and.b32":
            regs[dst] = v[0] & v[1]
        elif op == "prmt.b32":
            regs[dst] = _prmt(*v)
        elif op == "fma.rn.bf16x2":
            (a0, a1), (b0, b1), (c0, c1) = (_bf16x2(x) for x in v)
            regs[dst] = _to_bf16x2(a0 * b0 + c0, a1 * b1 + c1)
        else:
            raise AssertionError(f"instruction outside the executor's subset: {line}")
        regs[dst] &= 0xFFFFFFFF
    return regs


def _words() -> np.ndarray:
    """Every byte value in every byte position: (256, 4) bytes, four per 32-bit register."""
    return np.stack([np.roll(BYTES, 61 * i) for i in range(4)], axis=1)


@pytest.mark.parametrize("j", range(4))
def test_ptx_codes_match_the_jnp_decode_on_every_byte(j):
    words = _words()
    expected = np.asarray(plane(jnp.asarray(words), j, jnp.int8, codes=True))
    text = ptx_text(PTX_CODES, j)
    for row, want in zip(words, expected, strict=True):
        out = run_ptx(text, {"$1": int(row.view("<u4")[0])})["$0"]
        got = np.array([out], "<u4").view(np.int8)
        np.testing.assert_array_equal(got, want)
    assert set(np.unique(expected)) == {0, 1, 2, 3}  # every byte: each code, 3 (never packed) included


@pytest.mark.parametrize("j", range(4))
def test_ptx_bf16_weights_match_the_jnp_decode_on_every_byte(j):
    words = _words()
    expected = np.asarray(plane(jnp.asarray(words), j, jnp.bfloat16), np.float32)
    text = ptx_text(PTX_BF16, j)
    for row, want in zip(words, expected, strict=True):
        regs = run_ptx(text, {"$2": int(row.view("<u4")[0])})
        got = [*_bf16x2(regs["$0"]), *_bf16x2(regs["$1"])]
        np.testing.assert_array_equal(got, want)
    assert set(np.unique(expected)) == {-1.0, 0.0, 1.0, 2.0}  # code 3 (never packed) decodes alike too


def test_plane_jnp_decode_and_errors():
    p = jnp.asarray([[0b10_01_00_10, 0x55]], jnp.uint8)
    np.testing.assert_array_equal(plane(p, 0, jnp.float32), [[1.0, 0.0]])
    np.testing.assert_array_equal(plane(p, 1, jnp.float32), [[-1.0, 0.0]])
    np.testing.assert_array_equal(plane(p, 3, jnp.int8, codes=True), [[2, 1]])
    with pytest.raises(ValueError, match="bit planes 0-3"):
        plane(p, 4, jnp.float32)


def test_ptx_only_where_triton_compiles_for_cuda():
    assert Target("gpu", ptx=True).ptx
    with pytest.raises(ValueError, match="inline PTX"):
        Target("tpu", ptx=True)
    with pytest.raises(ValueError, match="inline PTX"):
        Target("gpu", interpret=True, ptx=True)


@pytest.mark.parametrize(("dtype", "asm"), [(jnp.bfloat16, "prmt.b32"), (jnp.int8, "and.b32"), (jnp.float32, None)])
def test_the_cuda_kernel_carries_the_ptx_decode(dtype, asm):
    """bf16 and int8 activations decode by inline PTX, one instance per plane; float32 keeps the jnp decode."""
    k, n = 1000, 300
    x_scale = jnp.ones((3,), jnp.float32) if dtype == jnp.int8 else None
    fn = lambda x, p: ternary_matmul(x, p, 0.5, k=k, x_scale=x_scale, implementation="pallas")
    (call,) = triton_kernels(export_for(fn, "cuda", S((3, k), dtype), S((packed_rows(k), n), jnp.uint8)))
    ttir = call["ttir"]
    if asm is None:
        assert "elementwise_inline_asm" not in ttir
    else:
        assert ttir.count("elementwise_inline_asm") == 4 and asm in ttir
        assert ("tt.dot" in ttir) and (dtype != jnp.int8 or "i8" in ttir)
