"""Packed ternary (1.58-bit) matmul: 2-bit weights, per-tensor scale, bf16 or int8 activations."""

from pallas_kernels.ternary_matmul.api import IMPLEMENTATIONS, choose_blocks, ternary_matmul
from pallas_kernels.ternary_matmul.layout import check_ternary, pack_ternary, packed_rows, unpack_ternary
from pallas_kernels.ternary_matmul.reference import ternary_matmul_reference

__all__ = [
    "IMPLEMENTATIONS",
    "check_ternary",
    "choose_blocks",
    "pack_ternary",
    "packed_rows",
    "ternary_matmul",
    "ternary_matmul_reference",
    "unpack_ternary",
]
