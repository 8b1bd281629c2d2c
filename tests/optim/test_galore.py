"""GaLore as an optax citizen: argument validation, HF-Adam inner, dtypes, state stability, memory,
jit / inject_hyperparams / MultiSteps / apply_if_finite, no SVD outside a cond, sharded state."""

from __future__ import annotations

import inspect
import math
import os
import subprocess
import sys
import textwrap
from typing import Any

import jax
import jax.extend.core as jex
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.optim import GaLoreDims, GaLoreState, ScaleByAdamHFState, galore, scale_by_adam_hf, scale_by_galore
from lowrank_jax.optim.complete import matrices
from lowrank_jax.optim.galore.transform import galore_settings

SHAPES = {"w": (6, 10), "v": (9, 5), "stack": (3, 4, 7), "b": (10,)}
SMALL = {"w": (6, 10), "b": (10,)}  # for tests that compile: every extra leaf costs compile time


def _tree(rng: np.random.Generator, shapes: dict = SHAPES, dtype: Any = jnp.float32) -> dict:
    return {k: jnp.asarray(rng.standard_normal(s), dtype) for k, s in shapes.items()}


def _sig(tree: Any) -> Any:
    """Structure + shapes + dtypes of a pytree, for equality checks."""
    leaves, treedef = jax.tree.flatten(tree)
    return treedef, [(tuple(x.shape), jnp.dtype(x.dtype)) for x in leaves]


# --------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        (dict(rank=0), "rank"),
        (dict(rank=-3), "rank"),
        (dict(rank=2.5), "rank"),
        (dict(rank=True), "rank"),
        (dict(update_proj_gap=0), "update_proj_gap"),
        (dict(update_proj_gap=-1), "update_proj_gap"),
        (dict(scale=0.0), "scale"),
        (dict(scale=-0.25), "scale"),
        (dict(proj_type="left"), "proj_type"),
        (dict(proj_type="sideways"), "proj_type"),
        (dict(refresh="sometimes"), "refresh"),
        (dict(svd="qr"), "svd"),
        (dict(moments="rotate"), "moments"),
        (dict(power_iters=-1), "power_iters"),
        (dict(oversample=-2), "oversample"),
        (dict(canonical_signs="yes"), "canonical_signs"),
        (dict(base_optimizer="adam"), "base_optimizer"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    kwargs = {"rank": 2, **kwargs}
    with pytest.raises(ValueError, match=f"^{name}"):
        scale_by_galore(kwargs.pop("rank"), **kwargs)


def test_pytorch_projection_names_get_a_hint() -> None:
    with pytest.raises(ValueError, match="'left' is PyTorch orientation: use 'output'"):
        scale_by_galore(2, proj_type="left")


@pytest.mark.parametrize(
    "inner",
    [
        optax.add_decayed_weights(0.1),
        optax.adamw(1e-3),
        optax.chain(optax.scale_by_adam(), optax.add_decayed_weights(1.0)),
    ],
)
def test_inner_that_needs_params_is_rejected_at_init(inner: optax.GradientTransformation) -> None:
    tx = scale_by_galore(2, base_optimizer=inner)
    with pytest.raises(ValueError, match="^base_optimizer: must be a gradient transformation that needs no params"):
        jax.eval_shape(tx.init, _tree(np.random.default_rng(0)))


def test_inner_with_unknown_moments_is_rejected_for_reproject_and_reset() -> None:
    params = _tree(np.random.default_rng(0))
    for inner in (optax.scale_by_amsgrad(), optax.sgd(1.0)):
        jax.eval_shape(scale_by_galore(2, base_optimizer=inner).init, params)  # fine with moments='keep'
        for mode in ("reproject", "reset"):
            with pytest.raises(ValueError, match=f"^moments={mode!r}"):
                jax.eval_shape(scale_by_galore(2, base_optimizer=inner, moments=mode).init, params)
    # moments are found inside chains and inject_hyperparams; RMSprop's nu is a second moment
    inner = optax.chain(optax.clip(1.0), optax.inject_hyperparams(optax.scale_by_adam)(b1=0.8))
    jax.eval_shape(scale_by_galore(2, base_optimizer=inner, moments="reproject").init, params)
    jax.eval_shape(scale_by_galore(2, base_optimizer=optax.scale_by_rms(), moments="reset").init, params)


def test_bad_mask_and_dimension_numbers() -> None:
    params = _tree(np.random.default_rng(0))
    with pytest.raises(ValueError, match="^mask: selects a leaf of shape \\(10,\\)"):
        jax.eval_shape(scale_by_galore(2, mask=lambda p: jax.tree.map(lambda _: True, p)).init, params)
    with pytest.raises(ValueError, match="^mask: must be a pytree prefix"):
        jax.eval_shape(scale_by_galore(2, mask={"w": True}).init, params)
    with pytest.raises(ValueError, match="^dimension_numbers"):
        jax.eval_shape(
            scale_by_galore(2, dimension_numbers=GaLoreDims(rows=(0,), cols=(1,))).init, params
        )  # 'stack' has 3 axes
    bad = {"w": GaLoreDims(rows=(0,), cols=(0,)), "v": None, "stack": None, "b": None}
    with pytest.raises(ValueError, match="^dimension_numbers"):
        jax.eval_shape(scale_by_galore(2, dimension_numbers=bad).init, params)
    with pytest.raises(TypeError, match="base_optimizer"):  # the complete optimizer fixes its HF-style Adam
        galore(1e-3, rank=2, base_optimizer=optax.scale_by_adam())


def test_rank_must_be_static_at_init() -> None:
    tx = optax.inject_hyperparams(scale_by_galore)(rank=2)
    with pytest.raises(ValueError, match="^rank: must be static"):
        jax.jit(tx.init)(_tree(np.random.default_rng(0)))
    static = optax.inject_hyperparams(scale_by_galore, static_args=("rank",))(rank=2)
    jax.jit(static.init)(_tree(np.random.default_rng(0)))


# --------------------------------------------------------------------------------------------
# HF-style Adam
# --------------------------------------------------------------------------------------------


def test_scale_by_adam_hf_matches_numpy_formula() -> None:
    rng = np.random.default_rng(1)
    b1, b2, eps = 0.8, 0.95, 1e-3
    tx = scale_by_adam_hf(b1, b2, eps)
    x = _tree(rng, {"a": (5, 3)})
    state = tx.init(x)
    assert isinstance(state, ScaleByAdamHFState) and state._fields[0] == "count"
    m = v = np.zeros((5, 3))
    for t in range(1, 6):
        g = rng.standard_normal((5, 3)) * 10.0 ** (-t)
        u, state = jax.jit(tx.update)({"a": jnp.asarray(g, jnp.float32)}, state)
        m = b1 * m + (1 - b1) * g
        v = b2 * v + (1 - b2) * g * g
        want = m / (np.sqrt(v) + eps) * np.sqrt(1 - b2**t) / (1 - b1**t)
        np.testing.assert_allclose(u["a"], want, rtol=2e-5, atol=1e-7)
        assert int(state.count) == t
    # eps enters before the bias correction, unlike optax.scale_by_adam
    u_optax, _ = optax.scale_by_adam(b1, b2, eps).update(
        {"a": jnp.ones((5, 3))}, optax.scale_by_adam(b1, b2, eps).init(x)
    )
    u_hf, _ = tx.update({"a": jnp.ones((5, 3))}, tx.init(x))
    assert not np.allclose(u_optax["a"], u_hf["a"], rtol=1e-4)


def test_bad_adam_hf_arguments() -> None:
    for kwargs, name in ((dict(b1=1.0), "b1"), (dict(b2=-0.1), "b2"), (dict(eps=-1.0), "eps")):
        with pytest.raises(ValueError, match=f"^{name}"):
            scale_by_adam_hf(**kwargs)


# --------------------------------------------------------------------------------------------
# State layout, dtypes, memory
# --------------------------------------------------------------------------------------------


def test_state_layout_and_default_selection() -> None:
    st = jax.eval_shape(scale_by_galore(3).init, _tree(np.random.default_rng(0)))
    assert isinstance(st, GaLoreState) and st._fields[0] == "count"
    mu = st.inner_state.mu
    assert mu["w"].shape == (3, 10)  # std: in=6 < out=10 -> input side
    assert mu["v"].shape == (9, 3)  # in=9 > out=5 -> output side
    assert mu["stack"].shape == (3, 3, 7)  # one projector per leading-axis matrix
    assert mu["b"].shape == (10,)  # not selected: full size
    assert st.proj_in["stack"].shape == (3, 4, 3) and isinstance(st.proj_out["stack"], optax.MaskedNode)
    assert st.last_refresh["stack"].shape == (3,) and st.last_refresh["w"].dtype == jnp.int32
    assert isinstance(st.last_refresh["b"], optax.MaskedNode)
    # a mask restricts projection; the unselected matrix gets the inner at full size
    mask = {"w": True, "v": False, "stack": False, "b": False}
    st = jax.eval_shape(scale_by_galore(3, mask=mask).init, _tree(np.random.default_rng(0)))
    assert st.inner_state.mu["v"].shape == (9, 5) and isinstance(st.proj_out["v"], optax.MaskedNode)


def test_state_memory_of_a_60m_mlp_kernel() -> None:
    params = {"up": jax.ShapeDtypeStruct((512, 1376), jnp.float32)}
    st = jax.eval_shape(scale_by_galore(128).init, params)
    assert st.inner_state.mu["up"].shape == (128, 1376)
    assert st.inner_state.nu["up"].shape == (128, 1376)
    assert st.proj_in["up"].shape == (512, 128)
    nbytes = sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(st))
    # + count, adam count, last_refresh, failures and the (offset, stride) numbering of the matrices
    assert nbytes == 4 * (2 * 128 * 1376 + 512 * 128) + 4 * 4 + 4 * 2
    assert nbytes < 0.55 * 2 * 512 * 1376 * 4  # vs full Adam moments


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(),
        dict(proj_type="both", refresh="staggered", moments="reproject", canonical_signs=True),
        dict(svd="randomized", moments="reset", base_optimizer=optax.scale_by_adam()),
    ],
)
def test_update_keeps_state_structure_shapes_and_dtypes(kwargs: dict) -> None:
    params = _tree(np.random.default_rng(0), dtype=jnp.bfloat16)
    tx = scale_by_galore(3, update_proj_gap=2, **kwargs)
    st = tx.init(params)
    new_updates, new_st = jax.eval_shape(tx.update, params, st)
    assert _sig(new_st) == _sig(st)
    assert _sig(new_updates) == _sig(params)


def test_bf16_params_keep_bf16_updates_projectors_and_moments() -> None:
    rng = np.random.default_rng(2)
    params = _tree(rng, SMALL, dtype=jnp.bfloat16)
    tx = scale_by_galore(3, update_proj_gap=2)
    st = tx.init(params)
    update = jax.jit(tx.update)
    for _ in range(3):
        u, st = update(_tree(rng, SMALL, dtype=jnp.bfloat16), st)
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
    assert st.proj_in["w"].dtype == jnp.bfloat16 and st.inner_state.mu["w"].dtype == jnp.bfloat16
    assert all(bool(jnp.all(jnp.isfinite(x.astype(jnp.float32)))) for x in jax.tree.leaves(u))
    # the bf16 projector is the f32 SVD's rounded to bf16: nearly orthonormal
    p = st.proj_in["w"].astype(jnp.float32)
    np.testing.assert_allclose(p.T @ p, np.eye(3), atol=2e-2)


# --------------------------------------------------------------------------------------------
# jit, optax wrappers
# --------------------------------------------------------------------------------------------


def _run(tx: optax.GradientTransformation, grads: list, params: Any = None, jit_init: bool = True) -> tuple[list, Any]:
    params = grads[0] if params is None else params
    st = jax.jit(tx.init)(params) if jit_init else tx.init(params)
    update = jax.jit(tx.update)
    out = []
    for g in grads:
        u, st = update(g, st, params)
        out.append(u)
    return out, st


def test_jitted_init_and_update_match_eager_init() -> None:
    rng = np.random.default_rng(3)
    grads = [_tree(rng, SMALL) for _ in range(4)]
    tx = scale_by_galore(3, update_proj_gap=2)
    st_eager, st_jit = tx.init(grads[0]), jax.jit(tx.init)(grads[0])
    assert _sig(st_eager) == _sig(st_jit)
    u1, _ = jax.jit(tx.update)(grads[0], st_eager)
    u2, _ = jax.jit(tx.update)(grads[0], st_jit)
    jax.tree.map(np.testing.assert_array_equal, u1, u2)


def test_inject_hyperparams_scale_change_takes_effect() -> None:
    rng = np.random.default_rng(4)
    grads = [_tree(rng, SMALL) for _ in range(5)]
    plain, _ = _run(scale_by_galore(3, update_proj_gap=2, scale=0.25), grads)
    tx = optax.inject_hyperparams(scale_by_galore)(rank=3, update_proj_gap=2, scale=0.25)
    st = tx.init(grads[0])  # rank is concrete outside jit; traced rank in update is read from the state
    update = jax.jit(tx.update)
    for t, g in enumerate(grads):
        if t == 3:
            st.hyperparams["scale"] = jnp.asarray(0.5)
        u, st = update(g, st)
        factor = 2.0 if t >= 3 else 1.0  # scale only multiplies the output: the state is unaffected
        np.testing.assert_allclose(u["w"], factor * plain[t]["w"], rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(u["b"], plain[t]["b"], rtol=1e-6)


def test_inject_hyperparams_update_proj_gap_traced() -> None:
    rng = np.random.default_rng(5)
    grads = [_tree(rng, SMALL) for _ in range(5)]
    plain, st_plain = _run(scale_by_galore(3, update_proj_gap=2, refresh="staggered"), grads)
    tx = optax.inject_hyperparams(scale_by_galore)(rank=3, update_proj_gap=2, refresh="staggered")
    injected, st = _run(tx, grads, jit_init=False)  # under inject_hyperparams rank is only static outside jit
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), injected, plain)
    jax.tree.map(np.testing.assert_array_equal, st.inner_state.last_refresh, st_plain.last_refresh)


def test_multisteps_accumulates_before_galore() -> None:
    rng = np.random.default_rng(6)
    grads = [_tree(rng, SMALL) for _ in range(4)]
    tx = scale_by_galore(3, update_proj_gap=1)
    means = [jax.tree.map(lambda a, b: (a + b) / 2, grads[i], grads[i + 1]) for i in (0, 2)]
    want, _ = _run(tx, means)
    got, st = _run(optax.MultiSteps(tx, every_k_schedule=2), grads)
    for i, t in enumerate((1, 3)):
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), got[t], want[i])
        jax.tree.map(lambda a: np.testing.assert_array_equal(a, 0), got[t - 1])
    assert int(st.inner_opt_state.count) == 2


def test_apply_if_finite_skips_a_nan_step_without_touching_the_state() -> None:
    rng = np.random.default_rng(7)
    grads = [_tree(rng, SMALL) for _ in range(4)]
    bad = dict(grads[2], w=grads[2]["w"].at[0, 0].set(jnp.nan))
    tx = optax.apply_if_finite(scale_by_galore(3, update_proj_gap=2), max_consecutive_errors=3)
    got, st = _run(tx, [grads[0], grads[1], bad, grads[3]])
    jax.tree.map(lambda a: np.testing.assert_array_equal(a, 0), got[2])
    want, st_want = _run(scale_by_galore(3, update_proj_gap=2), [grads[0], grads[1], grads[3]])
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7), got[3], want[2])
    assert int(st.inner_state.count) == 3 and int(st.total_notfinite) == 1


def test_galore_adamw_chain_and_extra_args() -> None:
    rng = np.random.default_rng(8)
    params = _tree(rng, SMALL)
    lr, wd = optax.linear_schedule(0.1, 0.0, 10), 0.1
    tx = galore(lr, rank=3, weight_decay=wd, update_proj_gap=2, mask=matrices)
    ref = optax.chain(
        scale_by_galore(3, update_proj_gap=2, base_optimizer=scale_by_adam_hf()),
        optax.add_decayed_weights(wd, mask={"w": True, "b": False}),  # default weight_decay_mask: ndim >= 2
        optax.scale_by_learning_rate(lr),
    )
    grads = [_tree(rng, SMALL) for _ in range(2)]
    got, _ = _run(tx, grads, params)
    want, _ = _run(ref, grads, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-8), got, want)
    # extra args are forwarded to an inner that takes them
    tx2 = scale_by_galore(3, base_optimizer=optax.chain(optax.scale_by_adam()))
    u2, _ = jax.eval_shape(lambda g, s: tx2.update(g, s, None, value=jnp.asarray(1.0)), params, tx2.init(params))
    assert _sig(u2) == _sig(params)


# --------------------------------------------------------------------------------------------
# Refreshes compute no SVD outside a cond (no vmapped cond that evaluates both branches)
# --------------------------------------------------------------------------------------------

_LINALG = {"svd", "qr", "geqrf", "geqp3", "householder_product", "eigh"}


def _subjaxprs(eqn: Any) -> list:
    subs = []
    for v in eqn.params.values():
        for x in v if isinstance(v, tuple | list) else (v,):
            if isinstance(x, jex.ClosedJaxpr):
                subs.append(x.jaxpr)
            elif isinstance(x, jex.Jaxpr):
                subs.append(x)
    return subs


def _count_linalg(jaxpr: Any, inside_cond: bool = False) -> tuple[int, int]:
    """(decompositions outside any cond, inside a cond)."""
    out = ins = 0
    for eqn in jaxpr.eqns:
        if eqn.primitive.name in _LINALG:
            ins, out = (ins + 1, out) if inside_cond else (ins, out + 1)
        for sub in _subjaxprs(eqn):
            o, i = _count_linalg(sub, inside_cond or eqn.primitive.name == "cond")
            out, ins = out + o, ins + i
    return out, ins


@pytest.mark.parametrize(
    "kwargs", [dict(), dict(refresh="staggered"), dict(refresh="staggered", svd="randomized", moments="reproject")]
)
def test_decompositions_only_inside_cond(kwargs: dict) -> None:
    params = _tree(np.random.default_rng(0))
    tx = scale_by_galore(3, **kwargs)
    st = tx.init(params)
    jaxpr = jax.make_jaxpr(tx.update)(params, st).jaxpr
    outside, inside = _count_linalg(jaxpr)
    assert outside == 0 and inside > 0
    if kwargs.get("refresh") == "staggered":  # the batched leaf loops (scan) with a cond per matrix
        text = str(jaxpr)
        assert "scan" in text and "cond" in text


# --------------------------------------------------------------------------------------------
# Sharded state on an 8-device CPU mesh (own process: the device count is fixed at jax start-up)
# --------------------------------------------------------------------------------------------

_SHARDED = textwrap.dedent(
    """
    import os
    os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    os.environ["JAX_PLATFORMS"] = "cpu"
    import jax, jax.numpy as jnp, numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    from lowrank_jax.optim import scale_by_galore
    assert jax.device_count() == 8
    mesh = Mesh(np.array(jax.devices()), ("x",))
    rng = np.random.default_rng(0)
    shapes = {"w": (16, 24), "stack": (8, 16, 12)}
    grads = [{k: jnp.asarray(rng.standard_normal(s), jnp.float32) for k, s in shapes.items()} for _ in range(3)]
    refresh = os.environ["REFRESH"]
    tx = scale_by_galore(4, update_proj_gap=2, refresh=refresh)
    def spec(x):
        return NamedSharding(mesh, P("x") if x.ndim >= 1 and x.shape[0] % 8 == 0 else P())
    st = tx.init(grads[0])
    st_sh = jax.tree.map(spec, st)
    g_sh = jax.tree.map(spec, grads[0])
    st_s = jax.device_put(st, st_sh)
    upd_s = jax.jit(tx.update, in_shardings=(g_sh, st_sh), out_shardings=(g_sh, st_sh))
    upd = jax.jit(tx.update)
    for g in grads:
        u_s, st_s = upd_s(jax.device_put(g, g_sh), st_s)
        u, st = upd(g, st)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5), u_s, u)
    same = jax.tree.map(lambda a, b: a.shape == b.shape and a.dtype == b.dtype, st_s, st)
    assert all(jax.tree.leaves(same))
    assert st_s.proj_out["stack"].sharding.spec == P("x"), st_s.proj_out["stack"].sharding
    assert len(st_s.inner_state.mu["stack"].sharding.device_set) == 8
    print("SHARDED-OK")
    """
)


@pytest.mark.parametrize("refresh", ["staggered", "all"])
def test_state_sharded_on_8_cpu_devices_keeps_shapes(refresh: str) -> None:
    """(The deadlock of the batched CPU SVD on 8 devices needs a whole train step to show: test_sharded.py.)"""
    env = {**os.environ, "REFRESH": refresh}
    res = subprocess.run([sys.executable, "-c", _SHARDED], capture_output=True, text=True, timeout=300, env=env)
    assert res.returncode == 0 and "SHARDED-OK" in res.stdout, res.stderr[-3000:]


@pytest.mark.parametrize("svd", ["exact", "randomized"])
def test_vmapped_refresh_of_accelerators_equals_the_cpu_map(svd: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """``refresh='all'`` maps one matrix at a time on CPU and vmaps elsewhere; both give the same state."""
    rng = np.random.default_rng(1)
    grads = {"stack": jnp.asarray(rng.standard_normal((5, 16, 12)), jnp.float32)}
    tx = scale_by_galore(4, update_proj_gap=2, svd=svd, moments="reproject")

    def run() -> Any:
        st, outs = tx.init(grads), []
        for k in range(3):
            u, st = tx.update(jax.tree.map(lambda g: g * (k + 1) + k, grads), st)  # noqa: B023
            outs.append(u)
        return outs, st

    on_cpu = run()
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    vmapped = run()
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), on_cpu, vmapped)


def test_galore_settings_take_galore_keywords_and_defaults() -> None:
    """galore_settings() validates scale_by_galore()'s keywords with the same defaults (``inner`` is
    ``base_optimizer``, ``svd_fn`` is ``_svd_fn``), so scale_by_fira() and the rest build on it alike."""
    public = {n: p.default for n, p in inspect.signature(scale_by_galore).parameters.items()}
    settings = {n: p.default for n, p in inspect.signature(galore_settings).parameters.items()}
    assert public.pop("_svd_fn") is settings.pop("svd_fn") is None
    assert public.pop("base_optimizer") is settings.pop("inner") is None
    assert public.pop("rank") == 128 and settings.pop("rank") is inspect.Parameter.empty  # galore-torch's default
    assert public == settings
