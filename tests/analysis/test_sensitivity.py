"""Parameter sensitivity: exact zero at λ = 0, growth with λ, reproducibility, float64 hand references,
effective weights of factorised layers, and the error paths."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from lowrank_jax.analysis.sensitivity import densify, init_std_tree, parameter_sensitivity
from lowrank_jax.config import ModelConfig
from lowrank_jax.layers.dense import dense_kinds, register_effective_weight
from lowrank_jax.models import abstract_params, build_model, split_model

SEED = int(np.random.SeedSequence().entropy % 2**31)  # fresh inputs every run; printed on failure


def _rng(offset: int = 0) -> np.random.Generator:
    return np.random.default_rng(SEED + offset)


# --- a one-layer model: squared-error regression y ≈ x W ---------------------------------------


def _linear_problem(n=40, d_in=6, d_out=3, offset=0):
    r = _rng(offset)
    x = r.normal(size=(n, d_in))
    w_true = r.normal(size=(d_in, d_out))
    y = x @ w_true + 0.3 * r.normal(size=(n, d_out))
    return x, y


def _linear_loss_fn(x, y):
    xj, yj = jnp.asarray(x, jnp.float32), jnp.asarray(y, jnp.float32)

    def fn(params, batch):  # the batch holds sample indices: column 0 (column 1 is unused)
        idx = batch[:, 0]
        r = xj[idx] @ params["w"] - yj[idx]
        return jnp.sum(r * r), jnp.asarray(idx.shape[0], jnp.float32)

    return fn


def _index_batches(n):
    idx = np.arange(n, dtype=np.int32)
    return [np.stack([idx[:25], idx[:25]], 1), np.stack([idx[25:], idx[25:]], 1)]


def _ref_loss(x, y, w):
    r = x @ w - y
    return float(np.mean(np.sum(r * r, axis=1)))


def _noise(key, n_seeds, seed, shape):
    """The documented draw: leaf 0 of seed j uses normal(fold_in(split(key, n_seeds)[j], 0))."""
    k = jax.random.split(key, n_seeds)[seed]
    return np.asarray(jax.random.normal(jax.random.fold_in(k, 0), shape, jnp.float32), np.float64)


@pytest.mark.parametrize("relative", ["init", "rms"])
def test_one_layer_matches_float64_hand_computation(relative):
    x, y = _linear_problem()
    w = _rng(1).normal(size=(6, 3)).astype(np.float32)
    sigma0 = 0.37
    key = jax.random.key(SEED % 1000)
    lams, n_seeds = [0.0, 0.05, 0.2, 0.7], 4
    tab = parameter_sensitivity(
        {"w": jnp.asarray(w)},
        _index_batches(40),
        lams,
        n_seeds,
        key,
        loss_fn=_linear_loss_fn(x, y),
        init_std={"w": sigma0},
        relative=relative,
    )
    w64 = w.astype(np.float64)
    clean = _ref_loss(x, y, w64)
    assert tab.clean_loss == pytest.approx(clean, rel=1e-5), SEED
    scale = sigma0 if relative == "init" else float(np.sqrt(np.mean(w64 * w64)))
    for lam in lams:
        want = [_ref_loss(x, y, w64 + lam * scale * _noise(key, n_seeds, j, w.shape)) - clean for j in range(n_seeds)]
        row = tab.row(lam)
        np.testing.assert_allclose(row.per_seed, want, rtol=2e-4, atol=2e-5, err_msg=f"seed {SEED}")
        assert row.mean == pytest.approx(np.mean(want), rel=2e-4, abs=2e-5)
        if lam > 0:
            sd = np.std(want, ddof=1)
            assert row.std == pytest.approx(sd, rel=1e-3)
            half = 3.182446305284263 * sd / 2.0  # t_{0.975, 3} * sd / sqrt(4)
            assert row.ci95[0] == pytest.approx(row.mean - half, rel=1e-3, abs=1e-6)
            assert row.ci95[1] == pytest.approx(row.mean + half, rel=1e-3, abs=1e-6)


def test_one_layer_mean_matches_expected_increase():
    """E[ΔL] = λ²σ²·d_out·mean_n ||x_n||² for L = mean_n ||x_n W − y_n||² (the cross term has mean 0)."""
    x, y = _linear_problem(offset=2)
    w = _rng(3).normal(size=(6, 3)).astype(np.float32)
    sigma0, lam, n_seeds = 0.5, 0.3, 400
    tab = parameter_sensitivity(
        {"w": jnp.asarray(w)},
        _index_batches(40),
        [lam],
        n_seeds,
        jax.random.key(SEED % 997),
        loss_fn=_linear_loss_fn(x, y),
        init_std={"w": sigma0},
    )
    expected = (lam * sigma0) ** 2 * 3 * float(np.mean(np.sum(x * x, axis=1)))
    row = tab.row(lam)
    sem = row.std / np.sqrt(n_seeds)
    assert abs(row.mean - expected) < 5 * sem, (row.mean, expected, sem, SEED)


def test_at_the_least_squares_optimum_the_increase_is_exactly_quadratic_in_lambda():
    """At the optimum the gradient vanishes, so ΔL = λ²·σ²·zᵀHz: ΔL/λ² is the same for every λ, per seed."""
    x, y = _linear_problem(offset=4)
    w_opt = np.linalg.lstsq(x, y, rcond=None)[0].astype(np.float32)
    lams = [0.1, 0.4, 1.6]
    tab = parameter_sensitivity(
        {"w": jnp.asarray(w_opt)},
        _index_batches(40),
        lams,
        3,
        jax.random.key(7),
        loss_fn=_linear_loss_fn(x, y),
        init_std={"w": 0.2},
    )
    ratios = np.array([np.array(tab.row(lam).per_seed) / lam**2 for lam in lams])
    np.testing.assert_allclose(ratios[1:], np.broadcast_to(ratios[0], ratios[1:].shape), rtol=2e-2)
    means = [tab.row(lam).mean for lam in lams]
    assert all(m > 0 for m in means) and means[0] < means[1] < means[2]


# --- the LLaMA path ---------------------------------------------------------------------------------


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=61, hidden=32, ffn=48, heads=2, layers=2, max_seq_len=16, lora_rank=4, sl_rank=4)
    base.update(kw)
    return ModelConfig(**base)


def _forward(cfg, params, x):
    graphdef, _ = abstract_params(cfg)
    return jax.jit(lambda p, t: nnx.merge(graphdef, p)(t))(params, x)


def _trained_like(params, offset):
    """Move every float leaf off its init (so LoRA B ≠ 0) with fresh random noise."""
    r = _rng(offset)
    return jax.tree.map(
        lambda p: (
            p + jnp.asarray(0.02 * r.normal(size=p.shape), p.dtype) if jnp.issubdtype(p.dtype, jnp.floating) else p
        ),
        params,
    )


def _tokens(cfg, offset, n=2):
    return [_rng(offset + i).integers(0, cfg.vocab_size, (3, 9)).astype(np.int32) for i in range(n)]


def test_llama_zero_at_lambda_zero_grows_with_lambda_and_is_reproducible():
    cfg = _cfg()
    _, params = split_model(build_model(cfg, SEED % 100))
    params = _trained_like(params, 10)
    data = _tokens(cfg, 20)
    lams = [0.0, 1.0, 4.0, 16.0]
    key = jax.random.key(SEED % 313)
    tab = parameter_sensitivity(params, data, lams, 2, key, model_cfg=cfg)
    assert tab.row(0.0).per_seed == (0.0, 0.0)  # exactly
    assert tab.row(0.0).mean == 0.0
    means = [tab.row(lam).mean for lam in lams]
    assert means[1] < means[2] < means[3], (means, SEED)
    assert means[3] > 0.5
    assert tab.eval_tokens == 2 * 3 * 8
    again = parameter_sensitivity(params, data, lams, 2, key, model_cfg=cfg)
    assert again.to_dict() == tab.to_dict()
    other = parameter_sensitivity(params, data, lams, 2, jax.random.key(SEED % 313 + 1), model_cfg=cfg)
    assert other.row(4.0).per_seed != tab.row(4.0).per_seed
    assert other.clean_loss == tab.clean_loss


def test_init_std_tree_measures_the_initialisers():
    cfg = _cfg()
    stds = init_std_tree(cfg, 3)
    assert stds["embed"] == pytest.approx(cfg.init_std, rel=0.08)  # 61 x 32 draws
    assert stds["blocks"]["mlp"]["up"]["kernel"] == pytest.approx(cfg.init_std, rel=0.05)
    assert stds["blocks"]["attn_norm"]["scale"] == 0.0  # ones: not perturbed under the init protocol
    lora = init_std_tree(_cfg(dense="lora", lora_alpha=8.0), 0)
    q = lora["blocks"]["attn"]["q"]
    assert q["lora_b"] == 0.0
    assert q["lora_a"] == pytest.approx(1 / np.sqrt(3 * 32), rel=0.12)  # U(-1/sqrt(in), 1/sqrt(in)), 256 draws


def _np_lora_effective(layer, s):
    return (
        np.asarray(layer["kernel"], np.float64)
        + np.einsum(
            "...ir,...ro->...io", np.asarray(layer["lora_a"], np.float64), np.asarray(layer["lora_b"], np.float64)
        )
        * s
    )


def test_lora_is_perturbed_through_its_effective_weight():
    """A LoRA model and the dense model holding W + A B s (built in float64 NumPy) have the same table."""
    cfg = _cfg(dense="lora", lora_alpha=8.0)
    _, params = split_model(build_model(cfg, 1))
    params = _trained_like(params, 30)
    dense_cfg = dataclasses.replace(cfg, dense="dense")
    _, dense_params = split_model(build_model(dense_cfg, 2))
    s = cfg.lora_alpha / cfg.lora_rank

    def fill(dst, src):
        for k, v in src.items():
            if isinstance(v, dict) and "lora_a" in v:
                dst[k] = {"kernel": jnp.asarray(_np_lora_effective(v, s), jnp.float32)}
            elif isinstance(v, dict):
                fill(dst[k], v)
            else:
                dst[k] = v

    fill(dense_params, params)
    data = _tokens(cfg, 40)
    key = jax.random.key(5)
    a = parameter_sensitivity(params, data, [0.0, 0.5, 2.0], 2, key, model_cfg=cfg)
    b = parameter_sensitivity(dense_params, data, [0.0, 0.5, 2.0], 2, key, model_cfg=dense_cfg)
    assert a.clean_loss == pytest.approx(b.clean_loss, abs=1e-5)
    for lam in (0.5, 2.0):
        np.testing.assert_allclose(a.row(lam).per_seed, b.row(lam).per_seed, atol=5e-5)
    assert a.extra["model_dense_kind"] == "lora" and a.extra["eval_dense_kind"] == "dense"
    # densify keeps the function.
    dp, dcfg = densify(params, cfg)
    x = jnp.asarray(data[0][:, :-1])
    lora_logits = _forward(cfg, params, x)
    dense_logits = _forward(dcfg, dp, x)
    np.testing.assert_allclose(np.asarray(lora_logits), np.asarray(dense_logits), atol=2e-5)


@pytest.mark.skipif("sl" not in dense_kinds(), reason="the sl dense kind is not in this checkout")
def test_sl_effective_weight_is_low_rank_plus_scattered_values():
    cfg = _cfg(dense="sl", sl_alpha=8.0, sl_density=0.1)
    _, params = split_model(build_model(cfg, 3))
    params = _trained_like(params, 50)
    dp, _ = densify(params, cfg)
    layer = params["blocks"]["mlp"]["down"]
    a, b = np.asarray(layer["sl_a"], np.float64), np.asarray(layer["sl_b"], np.float64)
    want = np.einsum("lir,lro->lio", a, b) * (cfg.sl_alpha / cfg.sl_rank)
    for i in range(cfg.layers):
        flat = want[i].reshape(-1)
        flat[np.asarray(layer["sl_support"][i])] += np.asarray(layer["sl_values"][i], np.float64)
    np.testing.assert_allclose(np.asarray(dp["blocks"]["mlp"]["down"]["kernel"]), want, atol=1e-6)
    x = jnp.asarray(_tokens(cfg, 60, 1)[0][:, :-1])
    got = _forward(dataclasses.replace(cfg, dense="dense"), dp, x)
    ref = _forward(cfg, params, x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ref), atol=5e-5)
    tab = parameter_sensitivity(params, _tokens(cfg, 61), [0.0, 8.0], 2, jax.random.key(0), model_cfg=cfg)
    assert tab.row(0.0).mean == 0.0 and tab.row(8.0).mean > 0


def test_native_rms_perturbs_every_stored_tensor_by_its_per_layer_rms():
    """Reference: the documented draws, scaled by the RMS of each stacked layer's slice, built in NumPy."""
    cfg = _cfg(dense="lora", lora_alpha=8.0)
    graphdef, params = split_model(build_model(cfg, 4))
    params = _trained_like(params, 70)
    data = _tokens(cfg, 80, 1)
    key, n_seeds, lam = jax.random.key(SEED % 71), 2, 0.3
    tab = parameter_sensitivity(
        params, data, [0.0, lam], n_seeds, key, model_cfg=cfg, parameterisation="native", relative="rms"
    )
    assert tab.row(0.0).per_seed == (0.0, 0.0)
    assert tab.parameterisation == "native" and tab.extra["eval_dense_kind"] == "lora"
    paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)

    forward = jax.jit(lambda q, t: nnx.merge(graphdef, q)(t))

    def loss(p):
        logits = np.asarray(forward(p, data[0][:, :-1]), np.float64)
        logits -= logits.max(-1, keepdims=True)
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        return -np.mean(np.take_along_axis(logp, data[0][:, 1:, None], -1))

    clean = loss(params)
    for j in range(n_seeds):
        kj = jax.random.split(key, n_seeds)[j]
        leaves = []
        for k, (path, x) in enumerate(paths_leaves):
            x64 = np.asarray(x, np.float64)
            z = np.asarray(jax.random.normal(jax.random.fold_in(kj, k), x.shape, jnp.float32), np.float64)
            if path[0].key == "blocks" and x.ndim >= 2:  # stacked layers: one RMS per layer
                rms = np.sqrt(np.mean(x64 * x64, axis=tuple(range(1, x.ndim)), keepdims=True))
            else:
                rms = np.sqrt(np.mean(x64 * x64))
            leaves.append(jnp.asarray(x64 + lam * rms * z, jnp.float32))
        want = loss(jax.tree.unflatten(treedef, leaves)) - clean
        assert tab.row(lam).per_seed[j] == pytest.approx(want, abs=2e-4), (j, SEED)


def test_register_effective_weight_extension_point():
    cfg = _cfg(dense="lowrank")
    _, params = split_model(build_model(cfg, 0))
    dp, dcfg = densify(params, cfg)
    layer = params["blocks"]["attn"]["o"]
    want = np.einsum(
        "lir,lro->lio", np.asarray(layer["lowrank_a"], np.float64), np.asarray(layer["lowrank_b"], np.float64)
    )
    np.testing.assert_allclose(np.asarray(dp["blocks"]["attn"]["o"]["kernel"]), want, atol=1e-6)
    assert dcfg.dense == "dense"
    register_effective_weight(
        "my_kind_for_test", ("lowrank_a", "lowrank_b"), lambda layer, c: 2 * layer["lowrank_a"] @ layer["lowrank_b"]
    )
    dp2, _ = densify(params, dataclasses.replace(cfg, dense="my_kind_for_test"))
    np.testing.assert_allclose(np.asarray(dp2["blocks"]["attn"]["o"]["kernel"]), 2 * want, atol=1e-5)


def test_errors_name_the_argument():
    cfg = _cfg()
    _, params = split_model(build_model(cfg, 0))
    data = _tokens(cfg, 90)
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="n_seeds"):
        parameter_sensitivity(params, data, [1.0], 0, key, model_cfg=cfg)
    with pytest.raises(ValueError, match="lambdas"):
        parameter_sensitivity(params, data, [-1.0], 2, key, model_cfg=cfg)
    with pytest.raises(ValueError, match="lambdas"):
        parameter_sensitivity(params, data, [], 2, key, model_cfg=cfg)
    with pytest.raises(ValueError, match="relative"):
        parameter_sensitivity(params, data, [1.0], 2, key, model_cfg=cfg, relative="abs")
    with pytest.raises(ValueError, match="parameterisation"):
        parameter_sensitivity(params, data, [1.0], 2, key, model_cfg=cfg, parameterisation="factors")
    with pytest.raises(ValueError, match="data"):
        parameter_sensitivity(params, [], [1.0], 2, key, model_cfg=cfg)
    with pytest.raises(ValueError, match="data"):
        parameter_sensitivity(params, [np.ones((2, 5), np.float32)], [1.0], 2, key, model_cfg=cfg)
    with pytest.raises(ValueError, match="model_cfg"):
        parameter_sensitivity(params, data, [1.0], 2, key)
    with pytest.raises(ValueError, match="key"):
        parameter_sensitivity(params, data, [1.0], 2, 0, model_cfg=cfg)
    with pytest.raises(ValueError, match="init_std"):
        parameter_sensitivity({"w": jnp.ones((2, 2))}, data, [1.0], 2, key, loss_fn=lambda p, b: (0.0, 1.0))
    with pytest.raises(ValueError, match="model_cfg.dense"):
        densify(params, dataclasses.replace(cfg, dense="no_such_kind"))
    with pytest.raises(ValueError, match="kind"):
        register_effective_weight("", ("kernel",), lambda layer, c: layer["kernel"])
