"""Sparse plus low-rank matmul ``y = x · (A B · s + S)`` (SLTrain); see :mod:`pallas_kernels.sl_matmul.api`."""

from pallas_kernels.sl_matmul.api import sl_matmul

__all__ = ["sl_matmul"]
