"""noise_step: forward-mode directional derivatives, ternary update, memory, seed checkpoints and replay."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from lowrank_jax.noise_step import (
    Layout,
    NoiseStepConfig,
    SeedCheckpoint,
    apply_update,
    checkpoint_sizes,
    directional_derivatives,
    init_state,
    init_ternary,
    make_checkpoint,
    median_threshold,
    next_stage,
    no_perturb,
    noise_step_update,
    pack_terns,
    perturbations,
    replay,
    ternarize,
    unpack_terns,
)
from lowrank_jax.train.step import compiled_memory


def _layer_norm(h):
    return (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)


def mlp_loss(sizes):
    """Loss of a ternary MLP (LayerNorm + ReLU between layers) written against the perturb hook."""
    names = [f"w{i}" for i in range(len(sizes) - 1)]

    def loss_fn(params, batch, perturb):
        x, y = batch
        h = x
        for i, n in enumerate(names):
            w = params[n].astype(x.dtype)
            h = perturb(n, h, h @ w)
            if i < len(names) - 1:
                h = jax.nn.relu(_layer_norm(h))
        logits = h / np.sqrt(sizes[-2])
        return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))

    shapes = {n: (sizes[i], sizes[i + 1]) for i, n in enumerate(names)}
    return loss_fn, shapes


def _dense_nu(layout, pos, val):
    """ν_i as dense float64 arrays per kernel (NumPy, independent of the sparse code path)."""
    out = []
    for p, v in zip(np.asarray(pos), np.asarray(val), strict=True):
        flat = np.zeros(layout.size)
        np.add.at(flat, p[v != 0], v[v != 0])
        nu, o = {}, 0
        for name, (a, b) in zip(layout.names, layout.shapes, strict=True):
            nu[name] = flat[o : o + a * b].reshape(a, b)
            o += a * b
        out.append(nu)
    return out


def test_directional_derivative_equals_reverse_mode_and_finite_difference_float64(rng):
    sizes = [int(rng.integers(5, 12)), 9, 7, 4]
    loss_fn, shapes = mlp_loss(sizes)
    with jax.enable_x64(True):
        params = {n: jnp.asarray(rng.standard_normal(s), jnp.float64) for n, s in shapes.items()}
        x = jnp.asarray(rng.standard_normal((13, sizes[0])), jnp.float64)
        y = jnp.asarray(rng.integers(0, sizes[-1], 13))
        layout = Layout.of(params)
        cfg = NoiseStepConfig(num_perturbations=12, chunk_size=4, densities=(0.05,), loss_thresholds=())
        pos, val = jax.jit(lambda s: perturbations(cfg, layout, s, 0))(int(rng.integers(100)))
        assert int(jnp.sum(val != 0)) > 12  # non-trivial perturbations
        dd = jax.jit(directional_derivatives, static_argnums=0, static_argnames="chunk_size")
        loss, alpha = dd(loss_fn, params, (x, y), pos, val, chunk_size=4)
        _, alpha1 = dd(loss_fn, params, (x, y), pos, val, chunk_size=1)
        grads = jax.jit(jax.grad(lambda p: loss_fn(p, (x, y), no_perturb)))(params)
        plain = loss_fn(params, (x, y), no_perturb)
        assert alpha.dtype == jnp.float64
        np.testing.assert_allclose(float(loss), float(plain), rtol=1e-12)
        h = 1e-6
        at = jax.jit(lambda p: loss_fn(p, (x, y), no_perturb))
        for i, nu in enumerate(_dense_nu(layout, pos, val)):
            rev = sum(float(np.sum(np.asarray(grads[n]) * nu[n])) for n in layout.names)
            plus = float(at({n: params[n] + h * nu[n] for n in params}))
            minus = float(at({n: params[n] - h * nu[n] for n in params}))
            fd = (plus - minus) / (2 * h)
            msg = f"i={i}"
            np.testing.assert_allclose(float(alpha[i]), rev, rtol=1e-9, atol=1e-12, err_msg=msg)
            np.testing.assert_allclose(float(alpha[i]), fd, rtol=1e-5, atol=1e-8, err_msg=msg)
        np.testing.assert_allclose(np.asarray(alpha1), np.asarray(alpha), rtol=1e-12, atol=1e-14)


def test_perturbations_are_sparse_ternary_deterministic_and_bernoulli_dense():
    shapes = {"a": (300, 200), "b": (200, 50)}
    layout = Layout.of({n: jnp.zeros(s, jnp.int8) for n, s in shapes.items()})
    cfg = NoiseStepConfig(num_perturbations=64, chunk_size=8, densities=(2e-3, 5e-4), loss_thresholds=(1.0,))
    gen = jax.jit(lambda step, stage: perturbations(cfg, layout, step, stage))
    pos, val = gen(7, 0)
    pos2, val2 = gen(7, 0)
    np.testing.assert_array_equal(np.asarray(pos), np.asarray(pos2))
    np.testing.assert_array_equal(np.asarray(val), np.asarray(val2))
    pos3, _ = gen(8, 0)
    assert not np.array_equal(np.asarray(pos), np.asarray(pos3))
    p, v = np.asarray(pos), np.asarray(val)
    assert set(np.unique(v)) <= {-1, 0, 1} and p.min() >= 0 and p.max() < layout.size
    for row_p, row_v in zip(p, v, strict=True):
        used = row_p[row_v != 0]
        assert len(np.unique(used)) == len(used)  # distinct coordinates within a perturbation
    counts = (v != 0).sum(1)
    mean, sd = layout.size * 2e-3, np.sqrt(layout.size * 2e-3)
    assert abs(counts.mean() - mean) < 4 * sd / np.sqrt(64) + 1, counts.mean()
    assert 0.35 < (v == 1).sum() / (v != 0).sum() < 0.65
    _, val_low = gen(7, 1)  # stage 1: 4x sparser
    assert (np.asarray(val_low) != 0).sum() < 0.5 * counts.sum()


def test_median_threshold_and_ternarize_match_numpy(rng):
    alpha = rng.standard_normal(128)
    t = np.asarray(median_threshold(jnp.asarray(alpha, jnp.float32)))
    a = np.abs(alpha.astype(np.float32))
    np.testing.assert_array_equal(t, (np.sign(alpha) * (a >= np.median(a))).astype(np.int8))
    assert (t == 0).sum() == 64
    z = rng.uniform(-3, 3, 500)
    expected = np.where(z >= 1 / 3, 1, np.where(z <= -1 / 3, -1, 0))
    np.testing.assert_array_equal(np.asarray(ternarize(jnp.asarray(z, jnp.float32))), expected)


@pytest.mark.parametrize("dtype", [jnp.int8, jnp.float32])
def test_update_matches_numpy_and_touches_only_perturbed_coordinates(rng, dtype):
    shapes = {"a": (int(rng.integers(3, 30)), 17), "b": (17, int(rng.integers(2, 9)))}
    params = {n: jnp.asarray(rng.integers(-1, 2, s), dtype) for n, s in shapes.items()}
    layout = Layout.of(params)
    cfg = NoiseStepConfig(num_perturbations=40, chunk_size=8, densities=(0.02,), loss_thresholds=())
    pos, val = jax.jit(lambda s: perturbations(cfg, layout, s, 0))(int(rng.integers(1000)))
    terns = jnp.asarray(rng.integers(-1, 2, 40), jnp.int8)
    new = jax.jit(lambda p, pos, val, t: apply_update(p, layout, pos, val, t))(params, pos, val, terns)
    # NumPy reference: dense ĝ = Σ ν_i α_τ,i, θ ← T(θ − T(ĝ))
    nus = _dense_nu(layout, pos, val)
    t_np = np.asarray(terns, np.float64)
    for name in layout.names:
        g = sum(nu[name] * t_np[i] for i, nu in enumerate(nus))
        theta = np.asarray(params[name], np.float64)
        tg = np.where(g >= 1 / 3, 1, np.where(g <= -1 / 3, -1, 0))
        z = theta - tg
        expected = np.where(z >= 1 / 3, 1, np.where(z <= -1 / 3, -1, 0))
        assert new[name].dtype == dtype
        np.testing.assert_array_equal(np.asarray(new[name], np.float64), expected)
        changed = np.asarray(new[name]) != np.asarray(params[name])
        support = sum(np.abs(nu[name]) * abs(t_np[i]) for i, nu in enumerate(nus)) > 0
        assert not np.any(changed & ~support)  # only coordinates perturbed with α_τ ≠ 0 move
        assert np.any(changed)


def test_step_memory_has_no_parameter_sized_buffer():
    """XLA memory_analysis: noise_step's temporaries stay far below one float32 copy of the weights.

    Wide layers, small batch (the regime of large models: parameters dominate activations). The
    Adam+backprop step of the same net is compiled for comparison.
    """
    sizes, batch = [256, 512, 512, 10], 8
    loss_fn, shapes = mlp_loss(sizes)
    p_bytes = 4 * sum(a * b for a, b in shapes.values())
    b_abs = (jax.ShapeDtypeStruct((batch, sizes[0]), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32))
    cfg = NoiseStepConfig(num_perturbations=64, chunk_size=4)
    params = {n: jax.ShapeDtypeStruct(s, jnp.float32) for n, s in shapes.items()}
    state = jax.eval_shape(lambda p: init_state(cfg, p), params)
    noise = jax.jit(lambda s, b: noise_step_update(cfg, loss_fn, s, b), donate_argnums=0)
    m_noise = compiled_memory(noise.lower(state, b_abs).compile())
    tx = optax.adam(1e-3)

    def backprop(p, o, b):
        loss, g = jax.value_and_grad(lambda p: loss_fn(p, b, no_perturb))(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    opt = jax.eval_shape(tx.init, params)
    m_bp = compiled_memory(jax.jit(backprop, donate_argnums=(0, 1)).lower(params, opt, b_abs).compile())
    assert m_noise["temp_size_in_bytes"] < 0.25 * p_bytes, (m_noise, p_bytes)
    assert m_noise["temp_size_in_bytes"] < 0.5 * m_bp["temp_size_in_bytes"], (m_noise, m_bp)
    assert m_noise["peak_estimate_bytes"] < 0.5 * m_bp["peak_estimate_bytes"], (m_noise, m_bp)


def _train(cfg, loss_fn, shapes, batches):
    state = init_state(cfg, init_ternary(cfg, shapes))
    step = jax.jit(lambda s, b: noise_step_update(cfg, loss_fn, s, b), donate_argnums=0)
    terns, stages, losses = [], [], []
    for b in batches:
        state, t, m = step(state, b)
        terns.append(np.asarray(t))
        stages.append(int(m["stage"]))
        losses.append(float(m["loss"]))
    return state, np.stack(terns), np.asarray(stages), losses


def test_training_learns_and_seed_checkpoint_replays_bit_exactly(rng):
    sizes = [12, 32, 32, 3]
    loss_fn, shapes = mlp_loss(sizes)
    teacher = rng.standard_normal((12, 3))
    x = rng.standard_normal((128, 12)).astype(np.float32)
    y = np.argmax(x @ teacher, 1).astype(np.int32)
    # thresholds placed so that the density stage changes during the run (recorded in the checkpoint)
    cfg = NoiseStepConfig(
        num_perturbations=32,
        chunk_size=8,
        densities=(0.02, 0.01, 0.005),
        loss_thresholds=(1.0, 0.9),
        seed=int(rng.integers(1 << 20)),
    )
    batches = [(jnp.asarray(x), jnp.asarray(y))] * 80
    state, terns, stages, losses = _train(cfg, loss_fn, shapes, batches)
    assert np.mean(losses[-10:]) < np.mean(losses[:5]) - 0.1, (losses[:5], losses[-10:])
    assert stages[0] == 0 and stages.max() >= 1, stages
    ckpt = make_checkpoint(cfg, state.params, terns, stages)
    restored = SeedCheckpoint.from_bytes(ckpt.to_bytes())
    np.testing.assert_array_equal(restored.stages(), stages)
    rebuilt = replay(restored)
    for n in shapes:
        np.testing.assert_array_equal(np.asarray(rebuilt[n]), np.asarray(state.params[n]))
    # one flipped tern at step 0 changes the replayed one-step weights: the log is not ignored
    tampered = terns[:1].copy()
    tampered[0, np.flatnonzero(tampered[0])[0]] *= -1
    one = replay(make_checkpoint(cfg, state.params, terns[:1], stages[:1]))
    other = replay(make_checkpoint(cfg, state.params, tampered, stages[:1]))
    assert any(not np.array_equal(np.asarray(other[n]), np.asarray(one[n])) for n in shapes)
    sizes_ = checkpoint_sizes(ckpt)
    assert sizes_["seed_checkpoint_bytes"] == len(ckpt.to_bytes())
    assert sizes_["seed_checkpoint_bytes"] < 80 * 7 + 400  # 32 terns → 7 bytes per step, + header


def test_next_stage_is_monotone():
    cfg = NoiseStepConfig(num_perturbations=4, chunk_size=2)
    assert int(next_stage(cfg, jnp.asarray(0), jnp.asarray(2.5))) == 0
    assert int(next_stage(cfg, jnp.asarray(0), jnp.asarray(1.5))) == 1
    assert int(next_stage(cfg, jnp.asarray(0), jnp.asarray(0.5))) == 2
    assert int(next_stage(cfg, jnp.asarray(2), jnp.asarray(3.0))) == 2


@pytest.mark.parametrize("n", [1, 4, 5, 6, 128, 131])
def test_pack_terns_round_trip(rng, n):
    t = rng.integers(-1, 2, (7, n)).astype(np.int8)
    packed = pack_terns(t)
    assert packed.dtype == np.uint8 and packed.shape == (7, -(-n // 5)) and packed.max() <= 242
    np.testing.assert_array_equal(unpack_terns(packed, n), t)
    # base-3 digits, least significant first: (1, 0, -1, 0, 1) -> 2 + 1·3 + 0·9 + 1·27 + 2·81
    assert pack_terns(np.array([1, 0, -1, 0, 1]))[0] == 2 + 3 + 27 + 162


def test_errors():
    with pytest.raises(ValueError, match="num_perturbations"):
        NoiseStepConfig(num_perturbations=1)
    with pytest.raises(ValueError, match="chunk_size"):
        NoiseStepConfig(num_perturbations=10, chunk_size=4)
    with pytest.raises(ValueError, match="densities"):
        NoiseStepConfig(densities=(0.0, 1e-3, 1e-4))
    with pytest.raises(ValueError, match="loss_thresholds"):
        NoiseStepConfig(densities=(1e-3, 1e-4), loss_thresholds=(2.0, 1.0))
    with pytest.raises(ValueError, match="loss_thresholds"):
        NoiseStepConfig(loss_thresholds=(1.0, 2.0))
    with pytest.raises(ValueError, match="seed"):
        NoiseStepConfig(seed=-1)
    with pytest.raises(ValueError, match="capacity"):
        NoiseStepConfig(capacity=-3)
    with pytest.raises(ValueError, match="params"):
        Layout.of({"w": jnp.zeros((2, 3, 4))})
    with pytest.raises(ValueError, match="params"):
        init_state(NoiseStepConfig(), {"w": jnp.zeros((2, 3), jnp.int32)})
    with pytest.raises(ValueError, match="terns"):
        pack_terns(np.array([0, 2]))
    with pytest.raises(ValueError, match="packed"):
        unpack_terns(np.array([243], np.uint8), 5)
    with pytest.raises(ValueError, match="n:"):
        unpack_terns(np.array([1], np.uint8), 6)
    cfg = NoiseStepConfig(num_perturbations=4, chunk_size=2)
    with pytest.raises(ValueError, match="terns"):
        make_checkpoint(cfg, {"w": jnp.zeros((2, 2))}, np.zeros((3, 5)), np.zeros(3))
    with pytest.raises(ValueError, match="stages"):
        make_checkpoint(cfg, {"w": jnp.zeros((2, 2))}, np.zeros((3, 4)), np.array([0, 1, 0]))
    with pytest.raises(ValueError, match="chunk_size"):
        layout = Layout.of({"w": jnp.zeros((3, 3))})
        pos, val = perturbations(cfg, layout, jnp.asarray(0), jnp.asarray(0))
        directional_derivatives(lambda p, b, f: jnp.sum(p["w"]), {"w": jnp.zeros((3, 3))}, None, pos, val, chunk_size=3)
