"""``implementation='auto' | 'xla' | 'pallas'``: one decision per call signature, recorded, never silent.

Each kernel's ``api.py`` asks :func:`choose` when it is traced. ``'auto'`` (``None`` is the same) is
the Pallas kernel on a GPU or TPU backend whenever the kernel supports the operands (a static,
platform-independent rule the kernel states: dtypes, sizes) — unless the kernel names a backend on which
the evidence favours its XLA path (``prefer_xla``: the SL matmul on GPUs) — and the XLA path on CPU,
where Pallas only interprets. There is no compile probe and no ``except Exception``: a kernel that fails to lower raises
(the CPU test suite lowers every kernel for ``cuda`` and ``tpu`` to keep that from happening).

Every decision is kept in a process-wide record, :func:`implementation_record`, which a run writes into
its ``results.json``. When ``'auto'`` on an accelerator does *not* use the kernel, a
:class:`KernelFallbackWarning` says so on stderr once per kernel and signature, with the reason.
An explicit ``'pallas'`` for operands the kernel does not support is an error, not a fallback.
"""

from __future__ import annotations

import dataclasses
import threading
import warnings

import jax

IMPLEMENTATIONS = ("auto", "xla", "pallas")
ACCELERATORS = ("gpu", "cuda", "rocm", "tpu")


class KernelFallbackWarning(UserWarning):
    """``implementation='auto'`` ran the XLA path on an accelerator (the message says why)."""


@dataclasses.dataclass(frozen=True)
class Choice:
    kernel: str
    signature: str
    requested: str
    backend: str
    implementation: str
    reason: str


_LOCK = threading.Lock()
_RECORD: dict[tuple[str, str, str, str], Choice] = {}
_ANNOUNCED: dict[tuple[str, str], bool] = {}


def check_implementation(implementation: str | None, extra: tuple[str, ...] = ()) -> str:
    """``implementation`` as one of :data:`IMPLEMENTATIONS` or a kernel's ``extra`` ones (``None`` → ``'auto'``);
    ValueError naming them otherwise."""
    if implementation is None:
        return "auto"
    if implementation not in IMPLEMENTATIONS + extra:
        raise ValueError(f"implementation: must be one of {IMPLEMENTATIONS + extra}, got {implementation!r}")
    return implementation


def current_backend() -> str:
    """The backend computations run on (``jax.default_backend()``; tests replace this to fake one)."""
    return jax.default_backend()


def choose(
    kernel: str,
    implementation: str | None,
    signature: str,
    unsupported: str | None,
    backend: str | None = None,
    prefer_xla: dict[str, str] | None = None,
    explicit: dict[str, str | None] | None = None,
) -> str:
    """``'xla'``, ``'pallas'`` or one of ``explicit`` for one call of ``kernel``, recorded (see the module docstring).

    ``unsupported``: why the kernel cannot take these operands, or None. ``backend``: default
    :func:`current_backend`. ``prefer_xla``: backends on which ``'auto'`` takes the XLA path although
    the kernel would run, each with the evidence why; announced once per kernel and backend.
    ``explicit``: further implementations of this kernel that run only when asked for by name (never by
    ``'auto'``), each with why it cannot take these operands, or None.
    """
    explicit = explicit or {}
    requested = check_implementation(implementation, tuple(explicit))
    backend = backend or current_backend()
    on_accelerator = backend in ACCELERATORS
    if requested in explicit:
        if explicit[requested]:
            raise ValueError(f"implementation: {requested!r} cannot run {kernel} on {signature}: {explicit[requested]}")
        impl, reason = requested, "requested"
    elif requested == "pallas":
        if unsupported:
            raise ValueError(f"implementation: 'pallas' cannot run {kernel} on {signature}: {unsupported}")
        impl, reason = "pallas", "requested"
    elif requested == "xla":
        impl, reason = "xla", "requested"
    elif not on_accelerator:
        impl, reason = "xla", f"auto on {backend}: Pallas kernels only run interpreted there"
    elif unsupported:
        impl, reason = "xla", f"auto on {backend}: the kernel does not support these operands ({unsupported})"
    elif backend in (prefer_xla or {}):
        impl, reason = "xla", f"auto on {backend}: {prefer_xla[backend]}"
    else:
        impl, reason = "pallas", f"auto on {backend}"
    choice = Choice(kernel, signature, requested, backend, impl, reason)
    key = (kernel, signature, requested, backend)
    preferred = requested == "auto" and not unsupported and backend in (prefer_xla or {})
    with _LOCK:
        new = _RECORD.get(key) != choice
        _RECORD[key] = choice
        if preferred:  # one announcement per kernel and backend, not per signature
            new, _ANNOUNCED[(kernel, backend)] = (kernel, backend) not in _ANNOUNCED, True
    if new and requested == "auto" and on_accelerator and impl == "xla":
        warnings.warn(f"{kernel}: running the XLA path for {signature}: {reason}", KernelFallbackWarning, stacklevel=3)
    return impl


def implementation_record() -> list[dict[str, str]]:
    """Every decision taken in this process, as JSON-ready dicts (kernel, signature, requested, backend,
    implementation, reason), in the order first taken."""
    with _LOCK:
        return [dataclasses.asdict(c) for c in _RECORD.values()]


def clear_implementation_record() -> None:
    """Forget all decisions (the next fallback warns again)."""
    with _LOCK:
        _RECORD.clear()
        _ANNOUNCED.clear()


def signature(**operands: jax.Array) -> str:
    """``name dtype[shape]`` of each operand, e.g. ``'x bfloat16[2048,2048] a float32[2048,512]'``."""
    return " ".join(f"{k} {jax.numpy.dtype(v.dtype).name}[{','.join(map(str, v.shape))}]" for k, v in operands.items())
