"""Pallas kernels for the layers of lowrank_jax, one package per op, each with the same file roles.

Every op package (``sl_matmul``, ``ternary_matmul``) holds exactly these modules, each with one job:

``api.py``
    The public op: operand checks, ``implementation='auto' | 'xla' | 'pallas'`` dispatch
    (:mod:`pallas_kernels.selection`), and a ``custom_vjp`` when one gradient serves both
    implementations.
``reference.py``
    The plain-XLA reference (naive autodiff): the independent answer tests compare against.
``xla.py``
    The XLA implementation behind ``implementation='xla'`` (with its own VJP where it has one).
``kernel.py``
    The Pallas implementation behind ``implementation='pallas'``: the kernels for the platform being
    lowered (:func:`pallas_kernels.platforms.per_platform`) on operands of any shape — block choice,
    layout and padding around the calls, corrections, and its VJP where it has one.
``tiles.py``
    The kernels themselves: what one program computes on its tile, for both structures (Triton on
    GPUs, Mosaic on TPUs), and the ``pallas_call`` on block-multiple shapes.
``blocks.py``
    Block sizes per target and shape, and the on-chip memory (shared memory, VMEM) they need.
``layout.py``
    How the kernels see their operands: tile layout or packing of the weights, padding to blocks.

Where an op has one, also:

``decode.py`` (optional)
    Unpacking compressed weights inside a tile, per backend (inline PTX where Triton compiles for CUDA).
``mosaic_gpu.py`` (optional)
    A Pallas Mosaic GPU port of the kernel for Hopper, run when named (``implementation='mosaic_gpu'``).

Shared by every op: :mod:`pallas_kernels.platforms` (targets, compiler parameters, per-platform
lowering, tiling arithmetic), :mod:`pallas_kernels.selection` (the recorded ``'auto'`` decision) and
:mod:`pallas_kernels.lowering` (lowering for ``cuda`` and ``tpu`` without the device).
"""
