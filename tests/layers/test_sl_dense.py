"""SLTrain sparse + low-rank linear: forward/VJP vs the materialised dense W, support, init, model wiring, memory."""

from __future__ import annotations

import dataclasses
import math
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowrank_jax.config import ModelConfig
from lowrank_jax.layers.dense import make_dense
from lowrank_jax.layers.sl_dense import (
    SLDense,
    SLFactor,
    SLSupport,
    SparseValues,
    check_sl_args,
    sl_nnz,
    sl_support,
)
from lowrank_jax.models import build_model, logical_axes, param_labels, split_model
from lowrank_jax.optim.relora import frozen_partition
from lowrank_jax.train.step import compiled_memory
from pallas_kernels.sl_matmul.reference import sl_matmul_reference
from pallas_kernels.sl_matmul.xla import sl_matmul_xla

BASE = ModelConfig(
    vocab_size=97, hidden=32, ffn=48, heads=4, layers=2, max_seq_len=16, dense="sl", sl_rank=4, sl_alpha=8.0
)
SL_LABELS = ("SLFactor", "SLFactor", "SLSupport", "SparseValues")


def _f64(x) -> np.ndarray:
    return np.asarray(x, np.float64)


def _layer(in_f, out_f, rank, density=0.1, seed=0, **kw) -> SLDense:
    return SLDense(
        in_f, out_f, rank=rank, alpha=2.0 * rank, density=density, axes=("embed", "mlp"), rngs=nnx.Rngs(seed), **kw
    )


def _randomise_b(layer: SLDense, rng) -> None:
    """B = 0 at init; test with B ≠ 0 so the low-rank path is exercised."""
    layer.sl_b.value = jnp.asarray(rng.standard_normal(layer.sl_b.value.shape), layer.sl_b.value.dtype)


def _dense_w64(layer: SLDense) -> np.ndarray:
    """W = A B s + S in float64, built independently with NumPy."""
    w = _f64(layer.sl_a[...]) @ _f64(layer.sl_b[...]) * layer.scaling
    rows, cols = np.divmod(np.asarray(layer.sl_support[...]), layer.out_features)
    w[rows, cols] += _f64(layer.sl_values[...])
    return w


SHAPES = [(7, 5, 2, 0.2), (33, 17, 4, 0.05), (64, 48, 8, 0.03), (20, 90, 3, 0.5)]


@pytest.mark.parametrize("implementation", ["xla", "pallas"])
@pytest.mark.parametrize("in_f,out_f,rank,density", SHAPES)
def test_forward_and_vjp_equal_dense_matmul_with_materialised_w(rng, in_f, out_f, rank, density, implementation):
    layer = _layer(in_f, out_f, rank, density, seed=int(rng.integers(1 << 30)), implementation=implementation)
    _randomise_b(layer, rng)
    x = jnp.asarray(rng.standard_normal((2, 3, in_f)), jnp.float32)
    dy = rng.standard_normal((2, 3, out_f))
    w = _dense_w64(layer)
    np.testing.assert_allclose(_f64(layer(x)), _f64(x) @ w, rtol=2e-5, atol=2e-5)

    graphdef, state = nnx.split(layer)
    params = state.to_pure_dict()

    def loss(p, x):
        return jnp.sum(nnx.merge(graphdef, p)(x) * jnp.asarray(dy, jnp.float32))

    grads, dx = jax.grad(loss, argnums=(0, 1), allow_int=True)(params, x)
    x2, dy2 = _f64(x).reshape(-1, in_f), dy.reshape(-1, out_f)
    g = x2.T @ dy2  # dense gradient of W
    s = layer.scaling
    np.testing.assert_allclose(_f64(dx), dy @ w.T, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(_f64(grads["sl_a"]), g @ _f64(params["sl_b"]).T * s, rtol=2e-5, atol=2e-5)
    np.testing.assert_allclose(_f64(grads["sl_b"]), _f64(params["sl_a"]).T @ g * s, rtol=2e-5, atol=2e-5)
    # the values' gradient is the dense gradient gathered at the support
    np.testing.assert_allclose(
        _f64(grads["sl_values"]), g.reshape(-1)[np.asarray(params["sl_support"])], rtol=2e-5, atol=2e-5
    )
    assert grads["sl_support"].dtype == jax.dtypes.float0  # integer leaf: no gradient


def test_values_gradient_equals_autodiff_dense_gradient_at_support(rng):
    """Independent of the closed forms: autodiff of ``x @ W`` w.r.t. a dense W, gathered at the support."""
    layer = _layer(24, 40, 3, 0.1, seed=int(rng.integers(1 << 30)))
    _randomise_b(layer, rng)
    x = jnp.asarray(rng.standard_normal((5, 24)), jnp.float32)
    c = jnp.asarray(rng.standard_normal((5, 40)), jnp.float32)
    gw = jax.grad(lambda w: jnp.sum(jnp.tanh(x @ w) * c))(jnp.asarray(_dense_w64(layer), jnp.float32))
    gv = jax.grad(lambda v: jnp.sum(jnp.tanh(sl_call(layer, x, v)) * c))(layer.sl_values[...])
    np.testing.assert_allclose(_f64(gv), _f64(gw).reshape(-1)[np.asarray(layer.sl_support[...])], rtol=1e-5, atol=1e-6)


def sl_call(layer: SLDense, x, values):
    return sl_matmul_xla(x, layer.sl_a[...], layer.sl_b[...], values, layer.sl_support[...], layer.scaling)


def test_bf16_compute_close_to_float64(rng):
    layer = _layer(48, 40, 4, 0.05, seed=3, dtype=jnp.bfloat16)
    _randomise_b(layer, rng)
    x = jnp.asarray(rng.standard_normal((6, 48)), jnp.float32)
    y = layer(x)
    assert y.dtype == jnp.bfloat16
    want = _f64(x) @ _dense_w64(layer)
    assert np.max(np.abs(_f64(y) - want)) / np.max(np.abs(want)) < 2e-2


def test_init_matches_paper():
    layer = _layer(300, 200, 16, 0.03, seed=1)
    a, b, v = _f64(layer.sl_a[...]), _f64(layer.sl_b[...]), _f64(layer.sl_values[...])
    bound = 1 / math.sqrt(300)
    assert a.shape == (300, 16) and np.all(np.abs(a) <= bound) and a.std() > 0.8 * bound / math.sqrt(3)
    assert b.shape == (16, 200) and not b.any()  # B = 0: W = S at init
    assert v.shape == (1800,) and np.all(np.abs(v) <= bound) and abs(v.std() - bound / math.sqrt(3)) < 0.1 * bound
    w = _dense_w64(layer)
    assert np.count_nonzero(w) == 1800  # W = S exactly
    assert isinstance(layer.sl_a, SLFactor) and isinstance(layer.sl_b, SLFactor)
    assert isinstance(layer.sl_values, SparseValues) and isinstance(layer.sl_support, SLSupport)
    assert not isinstance(layer.sl_support, nnx.Param)


@pytest.mark.parametrize(
    "in_f,out_f,density", [(10, 10, 0.03), (128, 344, 0.03), (33, 7, 0.5), (5, 5, 1.0), (3, 4, 0.01)]
)
def test_support_has_exactly_round_density_distinct_entries(in_f, out_f, density):
    idx = np.asarray(sl_support(jax.random.key(7), in_f, out_f, density))
    assert idx.dtype == np.int32
    assert len(idx) == max(1, round(density * in_f * out_f)) == sl_nnz(in_f, out_f, density)
    assert len(np.unique(idx)) == len(idx) and np.all(np.diff(idx) > 0)  # distinct, sorted
    assert idx.min() >= 0 and idx.max() < in_f * out_f


def test_support_is_uniform_over_entries(rng):
    """Inclusion frequency of every entry ≈ δ over many seeds (uniform sampling without replacement)."""
    in_f, out_f, density, draws = 12, 10, 0.25, 4000
    keys = jax.random.split(jax.random.key(rng.integers(1 << 30)), draws)
    idx = np.asarray(jax.jit(jax.vmap(lambda k: sl_support(k, in_f, out_f, density)))(keys))
    freq = np.bincount(idx.reshape(-1), minlength=in_f * out_f) / draws
    sd = math.sqrt(density * (1 - density) / draws)
    assert np.all(np.abs(freq - density) < 5 * sd)


def test_support_identical_across_processes(hermetic_cwd):
    code = textwrap.dedent(
        """
        import hashlib, jax, numpy as np
        from lowrank_jax.layers.sl_dense import sl_support
        idx = np.asarray(sl_support(jax.random.key(1234), 96, 80, 0.03))
        print(hashlib.sha256(idx.tobytes()).hexdigest())
        """
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120, cwd=hermetic_cwd
    )
    import hashlib

    here = hashlib.sha256(np.asarray(sl_support(jax.random.key(1234), 96, 80, 0.03)).tobytes()).hexdigest()
    assert out.stdout.strip().splitlines()[-1] == here
    other = np.asarray(sl_support(jax.random.key(1235), 96, 80, 0.03))
    assert hashlib.sha256(other.tobytes()).hexdigest() != here


@pytest.mark.parametrize("scan_layers", [True, False])
def test_model_wiring_labels_axes_and_per_layer_supports(scan_layers):
    cfg = dataclasses.replace(BASE, scan_layers=scan_layers)
    _, params = split_model(build_model(cfg, 0))
    labels, axes = param_labels(cfg), logical_axes(cfg)
    blocks = params["blocks"] if scan_layers else params["blocks"][0]
    lab = labels["blocks"] if scan_layers else labels["blocks"][0]
    ax = axes["blocks"] if scan_layers else axes["blocks"][0]
    lead = ("layers",) if scan_layers else ()
    for group, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
        for name in names:
            leaf, leaf_lab, leaf_ax = blocks[group][name], lab[group][name], ax[group][name]
            assert tuple(leaf_lab[k] for k in sorted(leaf_lab)) == SL_LABELS
            assert tuple(leaf_ax["sl_values"]) == (*lead, "nnz") and tuple(leaf_ax["sl_support"]) == (*lead, "nnz")
            assert tuple(leaf_ax["sl_a"])[-1] == "rank" and tuple(leaf_ax["sl_b"])[-2] == "rank"
            assert leaf["sl_support"].dtype == jnp.int32
    assert labels["embed"] == "Param" and labels["lm_head"]["kernel"] == "Param"  # only attn + MLP replaced
    if scan_layers:  # each stacked layer has its own support
        sup = np.asarray(params["blocks"]["mlp"]["up"]["sl_support"])
        assert sup.shape == (2, round(0.03 * 32 * 48)) and not np.array_equal(sup[0], sup[1])
    else:
        assert not np.array_equal(
            np.asarray(params["blocks"][0]["mlp"]["up"]["sl_support"]),
            np.asarray(params["blocks"][1]["mlp"]["up"]["sl_support"]),
        )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_train_steps_leave_support_fixed_without_optimizer_state(rng, dtype):
    """A hand-built AdamW step (frozen_partition over SLSupport, grads over the float leaves only)."""
    cfg = dataclasses.replace(BASE, dtype=dtype)
    graphdef, params = split_model(build_model(cfg, 0))
    labels = param_labels(cfg)
    tx = frozen_partition(optax.adamw(3e-3), labels, frozen_labels=("FrozenWeight", "SLSupport"))
    opt_state = tx.init(params)
    support_paths = [p for p, lab in jax.tree_util.tree_leaves_with_path(labels) if lab == "SLSupport"]
    assert len(support_paths) == 7
    n_state = sum(x.size for x in jax.tree.leaves(opt_state))
    n_float = sum(x.size for x in jax.tree.leaves(params) if jnp.issubdtype(x.dtype, jnp.floating))
    assert n_state == 2 * n_float + 1  # mu and nu for float leaves only (+ count), none for the int32 support
    tokens = jnp.asarray(rng.integers(0, 97, (2, 9)), jnp.int32)

    @jax.jit
    def step(params, opt_state):
        def loss(p):
            logits = nnx.merge(graphdef, p)(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), tokens[:, 1:]).mean()

        value, grads = jax.value_and_grad(loss, allow_int=True)(params)
        grads = jax.tree.map(lambda g, p: jnp.zeros_like(p) if g.dtype == jax.dtypes.float0 else g, grads, params)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, value

    p1, s1, l0 = step(params, opt_state)
    p2, _, l1 = step(p1, s1)
    assert np.isfinite(float(l0)) and np.isfinite(float(l1))
    up0, up2 = params["blocks"]["mlp"]["up"], p2["blocks"]["mlp"]["up"]
    np.testing.assert_array_equal(np.asarray(up2["sl_support"]), np.asarray(up0["sl_support"]))
    assert up2["sl_support"].dtype == jnp.int32
    assert not np.array_equal(np.asarray(up2["sl_values"]), np.asarray(up0["sl_values"]))
    assert not np.array_equal(np.asarray(up2["sl_b"]), np.asarray(up0["sl_b"]))  # B leaves 0 after step 1


def _stacked_operands(rng, layers=6, m=64, k=256, rank=16, density=0.03):
    nnz = round(density * k * k)
    params = (
        jnp.asarray(rng.standard_normal((layers, k, rank)) / 16, jnp.float32),
        jnp.asarray(rng.standard_normal((layers, rank, k)) / 16, jnp.float32),
        jnp.asarray(rng.standard_normal((layers, nnz)), jnp.float32),
    )
    idx = jnp.asarray(np.stack([rng.choice(k * k, nnz, replace=False) for _ in range(layers)]), jnp.int32)
    return params, idx, jnp.asarray(rng.standard_normal((m, k)), jnp.float32)


def _scanned_loss(fn, idx):
    def loss(params, x):
        def body(h, p):
            a, b, v, i = p
            return jnp.tanh(fn(h, a, b, v, i, 0.5)), None

        h, _ = jax.lax.scan(body, x, (*params, idx))
        return jnp.sum(h)

    return loss


def test_custom_vjp_saves_memory_against_naive_autodiff(rng):
    """XLA memory_analysis of a 6-layer scanned stack: residuals (forward outputs) and the grad's temp bytes."""
    params, idx, x = _stacked_operands(rng)
    report = {}
    for name, fn in (("naive", sl_matmul_reference), ("custom_vjp", sl_matmul_xla)):
        loss = _scanned_loss(fn, idx)
        fwd = jax.jit(lambda p, x, loss=loss: jax.vjp(loss, p, x)).lower(params, x).compile()
        grad = jax.jit(jax.grad(loss)).lower(params, x).compile()
        report[name] = (compiled_memory(fwd)["output_size_in_bytes"], compiled_memory(grad)["temp_size_in_bytes"])
    w_bytes = 6 * 256 * 256 * 4
    (res_naive, tmp_naive), (res_custom, tmp_custom) = report["naive"], report["custom_vjp"]
    # naive autodiff keeps every layer's W (the custom VJP saves the inputs, which include the small
    # factors / values / indices naive autodiff partly does without)
    assert res_naive - res_custom > 0.9 * w_bytes
    assert tmp_custom < tmp_naive
    # and both give the same gradients
    g_naive = jax.grad(_scanned_loss(sl_matmul_reference, idx))(params, x)
    g_custom = jax.grad(_scanned_loss(sl_matmul_xla, idx))(params, x)
    for gn, gc in zip(g_naive, g_custom, strict=True):
        np.testing.assert_allclose(_f64(gc), _f64(gn), rtol=1e-4, atol=1e-5)


def test_factory_kind_uses_config_fields():
    cfg = dataclasses.replace(BASE, sl_rank=3, sl_alpha=12.0, sl_density=0.25, sl_implementation="xla")
    layer = make_dense("sl", 20, 8, axes=("embed", "mlp"), rngs=nnx.Rngs(0), config=cfg)
    assert isinstance(layer, SLDense)
    assert (layer.rank, layer.scaling, layer.implementation) == (3, 4.0, "xla")
    assert layer.sl_values[...].shape == (40,) and layer.sl_a[...].shape == (20, 3)


@pytest.mark.parametrize(
    "kw,arg",
    [
        (dict(rank=0), "rank"),
        (dict(rank=9), "rank"),  # > min(in, out) = 8
        (dict(rank=2.0), "rank"),
        (dict(density=0.0), "density"),
        (dict(density=1.5), "density"),
        (dict(density=True), "density"),
        (dict(alpha=float("inf")), "alpha"),
        (dict(implementation="cuda"), "implementation"),
        (dict(axes=("embed",)), "axes"),
    ],
)
def test_errors_name_the_argument(kw, arg):
    args = dict(rank=2, alpha=4.0, density=0.1, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    args.update(kw)
    with pytest.raises(ValueError, match=rf"^{arg}:"):
        SLDense(10, 8, **args)


def test_shape_errors_name_the_argument():
    with pytest.raises(ValueError, match="^in_features:"):
        check_sl_args(0, 4, 1, 1.0, 0.1)
    with pytest.raises(ValueError, match="^out_features:"):
        check_sl_args(4, -1, 1, 1.0, 0.1)
    with pytest.raises(ValueError, match="^in_features:"):
        check_sl_args(65536, 65536, 1, 1.0, 0.1)  # in*out overflows int32 flat indices
    with pytest.raises(ValueError, match="^x:"):
        _layer(7, 5, 2)(jnp.ones((3, 6)))
