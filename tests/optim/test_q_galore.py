"""Q-GaLore against its float64 NumPy port of the official code (tests/optim/ports/q_galore.py): several steps,
random shapes, every option (INT4 / INT8 / float projectors, the adaptive interval); the quantizers' round trip
against the port's dequantized reference; stochastic rounding's unbiasedness; state, inject_hyperparams, errors."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from method_helpers import train_tiny
from ports import export_step, max_rel_error, random_tree, run, torch_view
from ports.q_galore import QGaLorePort, dequantize, quantize

from lowrank_jax.optim.q_galore import (
    GroupQuantized,
    QGaLoreState,
    dequantize_groups,
    q_galore,
    quantize_groups,
    quantize_stochastic,
    scale_by_q_galore,
)
from pallas_kernels.lowering import PLATFORMS

SHAPES = {"a": (6, 10), "b": (11, 5), "c": (7, 7), "stack": (2, 5, 8), "bias": (10,)}
LR, STEPS, RANK = 0.02, 8, 3
MATRICES = lambda p: jax.tree.map(lambda x: x.ndim >= 2, p)  # noqa: E731


def _torch_projectors(state: QGaLoreState) -> dict:
    """Our projectors after a step, dequantized, in the PyTorch layout (r × in or out × r), one per matrix."""
    st = next(x for x in jax.tree.leaves(state, is_leaf=lambda x: isinstance(x, QGaLoreState))
              if isinstance(x, QGaLoreState))  # fmt: skip
    out = {}
    for k, pq in st.proj.items():
        if isinstance(pq, optax.MaskedNode):
            continue
        if isinstance(pq, GroupQuantized):
            flat = jax.tree.map(lambda a: a.reshape((-1,) + a.shape[-2:]), pq)
            mats = np.asarray(jax.vmap(dequantize_groups)(flat), np.float64)
        else:
            p = np.asarray(pq, np.float64).reshape((-1,) + pq.shape[-2:])
            dim = st.first_vec[k].shape[-1]
            in_side = SHAPES[k][-2] == dim and SHAPES[k][-2] <= SHAPES[k][-1]
            mats = np.swapaxes(p, 1, 2) if in_side else p
        if pq is not None and len(SHAPES[k]) == 3:
            out.update({f"{k}{i}": mats[i] for i in range(mats.shape[0])})
        else:
            out[k] = mats[0]
    return out


OPTIONS = [
    {"update_proj_gap": 2, "proj_group_size": 8},
    {"update_proj_gap": 1, "queue_size": 2, "cos_threshold": -1.0, "proj_quant": False},
    {"update_proj_gap": 1, "queue_size": 2, "cos_threshold": -1.0, "proj_bits": 8, "proj_group_size": 6,
     "gamma_proj": 3, "scale": 1.0},
    {"update_proj_gap": 3, "b1": 0.8, "b2": 0.999, "eps": 1e-6},
]  # fmt: skip


@pytest.mark.parametrize("opts", OPTIONS, ids=lambda o: ",".join(f"{k}={v}" for k, v in o.items()))
def test_trajectory_matches_the_float64_port(opts: dict) -> None:
    rng = np.random.default_rng(len(str(opts)))
    params = random_tree(rng, SHAPES, 0.05)
    grads = [random_tree(rng, SHAPES) for _ in range(STEPS)]
    traj, probes = run(q_galore(LR, rank=RANK, mask=MATRICES, **opts), params, grads, _torch_projectors)
    port = QGaLorePort(torch_view(params), lr=LR, rank=RANK, **opts)
    err = max_rel_error(traj, port, grads, probes)
    print(f"q_galore {opts}: max relative error {err:.2e}; port intervals {[p.gap for p in port.proj.values()]}")
    assert err <= 1e-5


def test_the_interval_grows_while_projectors_stay_similar() -> None:
    rng = np.random.default_rng(0)
    g = {"w": jnp.asarray(rng.standard_normal((8, 12)), jnp.float32)}
    tx = scale_by_q_galore(rank=2, update_proj_gap=1, queue_size=2, cos_threshold=0.9, proj_group_size=8)
    st, update = tx.init(g), jax.jit(tx.update)
    for _ in range(6):  # the same gradient: cosine 1 from the second SVD on
        _, st = update(g, st)
    # SVDs at steps 0, 1, 2 (queue full: 1 → 2), 4 (→ 4); step 5 is not due
    assert int(st.gap["w"]) == 4 and int(st.svd_count) == 4 and int(st.queue_len["w"]) == 2
    _, st2 = jax.jit(scale_by_q_galore(rank=2, update_proj_gap=1, proj_group_size=8).update)(
        {"w": -g["w"]}, scale_by_q_galore(rank=2, update_proj_gap=1, proj_group_size=8).init(g)
    )
    assert int(st2.gap["w"]) == 1


@pytest.mark.parametrize(("bits", "group"), [(4, 256), (4, 8), (8, 6), (3, 10)])
def test_quantizer_round_trip_matches_the_ports_dequantized_reference(bits: int, group: int) -> None:
    rng = np.random.default_rng(bits * group)
    x = rng.standard_normal((13, 7)).astype(np.float32)
    q = quantize_groups(jnp.asarray(x), bits=bits, group_size=group)
    assert q.codes.dtype == jnp.uint8 and q.codes.shape[-1] == (group // 2 if bits <= 4 else group)
    ref = dequantize(*quantize(x.astype(np.float64), group, bits), x.shape)
    np.testing.assert_allclose(dequantize_groups(q), ref, rtol=1e-6, atol=1e-6)
    flat = np.pad(x.reshape(-1), (0, -x.size % group)).reshape(-1, group)
    both_signs = (flat.min(axis=1) < 0) & (flat.max(axis=1) > 0)  # the zero point is not clipped
    err = np.abs(np.pad(np.asarray(dequantize_groups(q)).reshape(-1) - x.reshape(-1), (0, -x.size % group)))
    step = (flat.max(axis=1) - flat.min(axis=1)) / (2**bits - 1)
    assert np.all(err.reshape(-1, group)[both_signs] <= step[both_signs, None] * 0.5 + 1e-6)


def test_stochastic_rounding_is_unbiased() -> None:
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.standard_normal((4, 256)), jnp.float32)
    draws = 2000
    keys = jax.random.split(jax.random.key(0), draws)
    deq = jax.jit(jax.vmap(lambda k: dequantize_groups(quantize_stochastic(x, k, bits=8, group_size=256))))(keys)
    mean = np.asarray(jnp.mean(deq, axis=0))
    step = np.asarray((x.max(axis=1) - x.min(axis=1)) / 255)[:, None]
    inside = (x > x.min(axis=1, keepdims=True)) & (x < x.max(axis=1, keepdims=True))  # away from the clipping
    assert np.all(np.abs(mean - np.asarray(x))[inside] <= 0.1 * np.broadcast_to(step, x.shape)[inside])
    nearest = np.asarray(dequantize_groups(quantize_groups(x, bits=8, group_size=256)))
    assert np.mean(np.abs(mean - np.asarray(x))) < 0.2 * np.mean(np.abs(nearest - np.asarray(x)))
    assert set(np.unique(np.round((np.asarray(deq[:50]) - nearest) / step[None], 3)).tolist()) <= {-1.0, 0.0, 1.0}


def test_state_layout_int4_codes_and_bf16() -> None:
    params = {"w": jnp.ones((16, 64)), "stack": jnp.ones((3, 32, 8)), "b": jnp.ones(8)}
    st = scale_by_q_galore(rank=4).init(params)
    assert isinstance(st.proj["w"], GroupQuantized) and st.proj["w"].codes.shape == (1, 128)  # 4·16 values, 2/byte
    assert st.proj["stack"].codes.shape == (3, 1, 128) and st.gap["stack"].shape == (3,)
    assert st.first_vec["w"].shape == (16,) and isinstance(st.proj["b"], optax.MaskedNode)
    bf = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.bfloat16), params)
    tx = scale_by_q_galore(rank=4)
    s0 = jax.eval_shape(tx.init, bf)
    u, s1 = jax.eval_shape(tx.update, bf, s0)
    sig = lambda t: [(x.shape, x.dtype) for x in jax.tree.leaves(t)]  # noqa: E731
    assert sig(s0) == sig(s1) and sig(u) == sig(bf)


def test_inject_hyperparams_matches_the_plain_optimizer() -> None:
    rng = np.random.default_rng(4)
    shapes = {"w": (6, 8), "b": (8,)}
    params = random_tree(rng, shapes)
    grads = [random_tree(rng, shapes) for _ in range(3)]
    kw = dict(
        rank=2, update_proj_gap=1, queue_size=2, cos_threshold=-1.0, proj_group_size=4, mask={"w": True, "b": False}
    )  # noqa: E501
    plain, _ = run(q_galore(0.01, **kw), params, grads)
    inj, _ = run(optax.inject_hyperparams(q_galore)(learning_rate=0.01, **kw), params, grads)
    for k in params:
        np.testing.assert_allclose(inj[-1][k], plain[-1][k], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [({"rank": 0}, "rank"), ({"update_proj_gap": 0}, "update_proj_gap"), ({"scale": 0.0}, "scale"),
     ({"proj_type": "both"}, "proj_type"), ({"proj_quant": 1}, "proj_quant"), ({"proj_bits": 9}, "proj_bits"),
     ({"proj_group_size": 1}, "proj_group_size"), ({"cos_threshold": 2.0}, "cos_threshold"),
     ({"gamma_proj": 0.5}, "gamma_proj"), ({"queue_size": 0}, "queue_size"), ({"base_optimizer": 1}, "base_optimizer")],
)  # fmt: skip
def test_bad_arguments_raise_naming_the_argument(kwargs: dict, name: str) -> None:
    with pytest.raises(ValueError, match=f"^{name}: "):
        scale_by_q_galore(**kwargs)


def test_odd_group_with_packed_codes_is_an_error() -> None:
    with pytest.raises(ValueError, match="^group_size: "):
        quantize_groups(jnp.ones(9), bits=4, group_size=3)


@pytest.mark.parametrize("platform", PLATFORMS)
def test_train_step_lowers_for_cuda_and_tpu(platform: str) -> None:
    exported = export_step(q_galore(0.01, rank=4, proj_group_size=16), platform)
    assert exported.platforms == (platform,)


@pytest.mark.parametrize("layerwise", [False, pytest.param(True, marks=pytest.mark.slow)], ids=["step", "per_layer"])
def test_trains_through_the_trainer(tmp_path, layerwise: bool) -> None:
    overrides = ["optim.name=q_galore_adamw8bit", "q_galore.rank=4", "q_galore.proj_group_size=16", "optim.lr=0.01"]
    state, _ = train_tiny(tmp_path, [*overrides, f"layerwise_update={str(layerwise).lower()}"], QGaLoreState)
    assert isinstance(state, QGaLoreState)
