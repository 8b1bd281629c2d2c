"""``implementation='auto'`` never falls back silently: decisions are recorded, accelerator fallbacks announced."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import selection
from pallas_kernels.selection import KernelFallbackWarning, implementation_record
from pallas_kernels.sl_matmul.api import sl_matmul
from pallas_kernels.sl_matmul.reference import sl_matmul_reference
from pallas_kernels.sl_matmul.xla import sl_matmul_bf16w
from pallas_kernels.ternary_matmul import pack_ternary, ternary_matmul

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def fresh_record():
    selection.clear_implementation_record()
    yield
    selection.clear_implementation_record()


def _sl_operands(rng, dtype, m=6, k=40, n=24, r=3):
    idx = jnp.asarray(rng.choice(k * n, 30, replace=False), jnp.int32)
    return (
        jnp.asarray(rng.standard_normal((m, k)), dtype),
        jnp.asarray(rng.standard_normal((k, r)), jnp.float32),
        jnp.asarray(rng.standard_normal((r, n)), jnp.float32),
        jnp.asarray(rng.standard_normal(30), jnp.float32),
        idx,
    )


def _fake_backend(monkeypatch, backend: str) -> None:
    monkeypatch.setattr(selection, "current_backend", lambda: backend)


def test_auto_on_cpu_is_xla_and_recorded_without_a_warning(rng, recwarn):
    ops = _sl_operands(rng, jnp.float32)
    sl_matmul(*ops, 0.5)
    [choice] = implementation_record()
    assert choice["implementation"] == "xla" and choice["backend"] == "cpu" and "interpreted" in choice["reason"]
    assert not [w for w in recwarn if issubclass(w.category, KernelFallbackWarning)]
    json.dumps(implementation_record())  # goes into results.json as is


def test_auto_on_a_gpu_runs_sl_as_bf16_materialise_and_says_so_once(monkeypatch):
    _fake_backend(monkeypatch, "gpu")
    rng = np.random.default_rng(0)
    ops = _sl_operands(rng, jnp.bfloat16)
    with pytest.warns(KernelFallbackWarning, match=r"sl_matmul: running the XLA path .*sl_matmul_bf16w"):
        y = sl_matmul(*ops, 0.5)
    np.testing.assert_array_equal(np.asarray(y, np.float32), np.asarray(sl_matmul_bf16w(*ops, 0.5), np.float32))
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        sl_matmul(*_sl_operands(rng, jnp.bfloat16, m=3, k=24, n=40), 0.5)  # another signature: no second message
        y_paper = sl_matmul(*ops, 0.5, implementation="xla")  # explicit xla: the paper's float32-W path
    np.testing.assert_array_equal(np.asarray(y_paper), np.asarray(sl_matmul_reference(*ops, 0.5)))
    packed = pack_ternary(jnp.asarray(rng.integers(-1, 2, (40, 8))))
    ternary_matmul(ops[0], packed, 0.1, k=40)
    rec = implementation_record()
    assert [(c["kernel"], c["implementation"]) for c in rec] == [("sl_matmul", "xla")] * 3 + [
        ("ternary_matmul", "pallas")
    ]
    assert "sl_matmul_bf16w" in rec[0]["reason"] and rec[2]["reason"] == "requested"


@pytest.mark.parametrize("backend", ["gpu", "tpu"])
def test_auto_on_an_accelerator_uses_the_kernel(rng, monkeypatch, backend, recwarn):
    _fake_backend(monkeypatch, backend)
    ops = _sl_operands(rng, jnp.float32)
    y = sl_matmul(*ops, 0.5, implementation="pallas" if backend == "gpu" else "auto")  # interpreted on CPU
    np.testing.assert_allclose(np.asarray(y), np.asarray(sl_matmul_reference(*ops, 0.5)), rtol=1e-5, atol=1e-5)
    packed = pack_ternary(jnp.asarray(rng.integers(-1, 2, (40, 8))))
    ternary_matmul(ops[0], packed, 0.1, k=40)
    kinds = {(c["kernel"], c["implementation"], c["reason"]) for c in implementation_record()}
    assert ("ternary_matmul", "pallas", f"auto on {backend}") in kinds
    if backend == "tpu":
        assert ("sl_matmul", "pallas", "auto on tpu") in kinds
        assert not [w for w in recwarn if issubclass(w.category, KernelFallbackWarning)]


def test_auto_fallback_on_an_accelerator_warns_once_and_is_recorded(rng, monkeypatch):
    _fake_backend(monkeypatch, "tpu")
    ops = _sl_operands(rng, jnp.float16)  # the kernels compute in bf16 / f32 only
    with pytest.warns(KernelFallbackWarning, match=r"sl_matmul: running the XLA path for x float16\[6,40\].*float16"):
        y = sl_matmul(*ops, 0.5)
    assert y.dtype == jnp.float16
    [choice] = implementation_record()
    assert choice["implementation"] == "xla" and choice["requested"] == "auto" and "float16" in choice["reason"]
    with warnings.catch_warnings():
        warnings.simplefilter("error", KernelFallbackWarning)
        sl_matmul(*ops, 0.5)  # the same signature again: no second message
    assert len(implementation_record()) == 1


def test_explicit_pallas_never_falls_back(rng, monkeypatch):
    ops = _sl_operands(rng, jnp.float16)
    with pytest.raises(ValueError, match=r"^implementation: 'pallas' cannot run sl_matmul .*float16"):
        sl_matmul(*ops, 0.5, implementation="pallas")
    with pytest.raises(ValueError, match=r"^implementation: must be one of"):
        sl_matmul(*ops, 0.5, implementation="triton")
    sl_matmul(*_sl_operands(rng, jnp.float32), 0.5, implementation="xla")
    assert implementation_record()[-1]["reason"] == "requested"


def test_fallback_message_reaches_stderr():
    """In a plain process (no pytest warning capture) the fallback is printed on stderr."""
    code = textwrap.dedent(
        """
        import jax.numpy as jnp
        from pallas_kernels import selection
        from pallas_kernels.sl_matmul import sl_matmul
        selection.current_backend = lambda: "gpu"
        x = jnp.ones((4, 8), jnp.float16)
        a, b = jnp.ones((8, 2)), jnp.ones((2, 8))
        for _ in range(3):
            sl_matmul(x, a, b, jnp.ones((5,)), jnp.arange(5, dtype=jnp.int32), 1.0)
        print(selection.implementation_record()[0]["implementation"])
        """
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONWARNINGS": "", "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "xla"
    assert out.stderr.count("KernelFallbackWarning: sl_matmul: running the XLA path") == 1, out.stderr
