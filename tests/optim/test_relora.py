"""ReLoRA: merge preserves the function, optimizer-state reset, jagged schedule, rank growth, state bytes."""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from lowrank_jax.config import ModelConfig
from lowrank_jax.layers.lora import LoRADense
from lowrank_jax.models import abstract_params, build_model, count_params, param_labels, split_model
from lowrank_jax.optim.adam_8bit import QuantizedArray, get_moments, scale_by_adam_8bit, set_moments
from lowrank_jax.optim.relora import (
    find_lora_layers,
    frozen_partition,
    jagged_cosine_schedule,
    merge_and_reinit,
    relora_restart,
    reset_optimizer_state,
)
from lowrank_jax.train.step import cross_entropy

RANK, ALPHA = 4, 8.0
S = ALPHA / RANK


CFG = ModelConfig(
    vocab_size=97, hidden=32, ffn=48, heads=4, layers=2, max_seq_len=16, dense="lora", lora_rank=RANK, lora_alpha=ALPHA
)


def _factor_mask(labels):
    return jax.tree.map(lambda lab: lab == "LoRAFactor", labels)


@pytest.fixture(scope="module")
def trained():
    """A scanned LoRA LLaMA after 6 Adam steps (so B ≠ 0), with its partitioned optimizer state."""
    graphdef, params = split_model(build_model(CFG, 0))
    labels = param_labels(CFG)
    tx = frozen_partition(optax.adam(1e-2), labels)
    tokens = jnp.asarray(np.random.default_rng(1).integers(0, 97, (4, 13)), jnp.int32)

    @jax.jit
    def step(p, s, t):
        """One Adam step; also returns the gradient at ``p`` and the logits of ``p``."""
        logits = nnx.merge(graphdef, p)(t[:, :-1])
        g = jax.grad(lambda q: cross_entropy(nnx.merge(graphdef, q)(t[:, :-1]), t[:, 1:]))(p)
        u, s = tx.update(g, s, p)
        return optax.apply_updates(p, u), s, g, logits

    initial = params
    opt_state = jax.jit(tx.init)(params)
    for _ in range(6):
        params, opt_state, _, _ = step(params, opt_state, tokens)
    return dict(initial=initial, params=params, opt_state=opt_state, labels=labels, tokens=tokens, step=step)


def test_lora_llama_scanned_labels_and_init(trained):
    """The ``lora`` kind under scan_layers: stacked FrozenWeight/LoRAFactor leaves, per-layer draws, B = 0."""
    labels, initial = trained["labels"], trained["initial"]
    assert labels["blocks"]["attn"]["q"] == {"kernel": "FrozenWeight", "lora_a": "LoRAFactor", "lora_b": "LoRAFactor"}
    assert labels["embed"] == "Param" and labels["lm_head"]["kernel"] == "Param"
    up = initial["blocks"]["mlp"]["up"]
    assert (
        up["kernel"].shape == (2, 32, 48)
        and up["lora_a"].shape == (2, 32, RANK)
        and up["lora_b"].shape == (2, RANK, 48)
    )
    assert not np.allclose(up["lora_a"][0], up["lora_a"][1]) and not np.any(np.asarray(up["lora_b"]))


# ---------------------------------------------------------------------------------------- merge


def test_merge_preserves_function_and_restarts_factors(trained):
    params, labels, tokens, step = trained["params"], trained["labels"], trained["tokens"], trained["step"]
    q = params["blocks"]["attn"]["q"]
    assert np.abs(np.asarray(q["lora_b"])).max() > 1e-3  # training moved B
    new = merge_and_reinit(params, jax.random.key(7), alpha_over_rank=S, labels=labels)
    state = reset_optimizer_state(trained["opt_state"], labels, "zero")
    _, _, _, logits_before = step(params, state, tokens)
    assert bool(jnp.all(jnp.isfinite(logits_before)))
    stepped, _, g, logits_after = step(new, state, tokens)
    np.testing.assert_allclose(logits_after, logits_before, rtol=1e-4, atol=1e-5)
    nq = new["blocks"]["attn"]["q"]
    # W += A B s (per stacked layer), computed independently in float64
    w, a, b = (np.asarray(q[k], np.float64) for k in ("kernel", "lora_a", "lora_b"))
    np.testing.assert_allclose(nq["kernel"], w + S * a @ b, rtol=1e-5, atol=1e-7)
    assert not np.any(np.asarray(nq["lora_b"]))
    new_a = np.asarray(nq["lora_a"])
    assert np.abs(new_a).max() <= 1 / math.sqrt(32) and not np.allclose(new_a, a)
    assert not np.allclose(new_a[0], new_a[1])  # every stacked layer has its own key
    assert not np.allclose(new_a, np.asarray(new["blocks"]["attn"]["k"]["lora_a"]))  # and every layer
    np.testing.assert_array_equal(new["embed"], params["embed"])
    np.testing.assert_array_equal(new["blocks"]["attn_norm"]["scale"], params["blocks"]["attn_norm"]["scale"])
    # next step: B = 0 makes ∂L/∂A exactly 0 while ∂L/∂B ≠ 0; one update later A learns
    up = g["blocks"]["mlp"]["up"]
    assert not np.any(np.asarray(up["lora_a"]))
    assert np.all(np.abs(np.asarray(up["lora_b"])).max(axis=(1, 2)) > 0)
    assert not np.any(np.asarray(up["kernel"]))  # frozen W: zero cotangent
    _, _, g2, _ = step(stepped, state, tokens)
    assert np.all(np.abs(np.asarray(g2["blocks"]["mlp"]["up"]["lora_a"])).max(axis=(1, 2)) > 0)


def test_merge_with_trainable_scale_and_raw_key():
    # shapes as tests/layers/test_lora.py's small layer (shared compiled ops when run together)
    layer = LoRADense(7, 5, rank=3, alpha=99.0, axes=("embed", "mlp"), rngs=nnx.Rngs(0), trainable_scale=True)
    graphdef, p = split_model(layer)
    params = {"blk": p, "other": jnp.ones(3)}
    rng = np.random.default_rng(1)
    params["blk"]["lora_b"] = jnp.asarray(rng.standard_normal((3, 5), np.float32))
    params["blk"]["lora_scale"] = jnp.asarray(0.6)
    x = jnp.asarray(rng.standard_normal((2, 4, 7), np.float32))
    raw_key = jax.random.key_data(jax.random.key(3))  # TrainState.rng form
    new = merge_and_reinit(params, raw_key, alpha_over_rank=123.0)  # unused: the scale is tanh(σ)
    np.testing.assert_allclose(
        nnx.merge(graphdef, new["blk"])(x), nnx.merge(graphdef, params["blk"])(x), rtol=1e-5, atol=1e-6
    )
    w, a, b = (np.asarray(x, np.float64) for x in (p["kernel"], p["lora_a"], params["blk"]["lora_b"]))
    np.testing.assert_allclose(new["blk"]["kernel"], w + math.tanh(0.6) * a @ b, rtol=1e-5, atol=1e-7)
    assert float(new["blk"]["lora_scale"]) == 0.0
    assert float(merge_and_reinit(params, raw_key, alpha_over_rank=1.0, scale_reset=0.5)["blk"]["lora_scale"]) == 0.5


def test_find_lora_layers_unstacked_and_errors():
    cfg = dataclasses.replace(CFG, scan_layers=False)
    _, params = abstract_params(cfg)
    labels = param_labels(cfg)
    paths = find_lora_layers(params, labels)
    assert len(paths) == 2 * 7 and paths[0][:2] == ("blocks", 0)
    # traces on the unstacked structure (int keys of nnx.List), nothing allocated
    out = jax.eval_shape(
        functools.partial(merge_and_reinit, alpha_over_rank=S, labels=labels), params, jax.random.key(0)
    )
    assert jax.tree.structure(out) == jax.tree.structure(params)
    bad = jax.tree.map(lambda lab: "Param", labels)
    with pytest.raises(ValueError, match="labels"):
        find_lora_layers(params, bad)
    with pytest.raises(ValueError, match="no LoRA layers"):
        merge_and_reinit({"w": {"kernel": jnp.ones((2, 2))}}, jax.random.key(0), alpha_over_rank=1.0)
    with pytest.raises(ValueError, match="alpha_over_rank"):
        merge_and_reinit(params, jax.random.key(0), alpha_over_rank=float("inf"))
    with pytest.raises(ValueError, match="key"):
        merge_and_reinit(params, None, alpha_over_rank=1.0)


# ---------------------------------------------------------------------------------------- reset


# A small stacked LoRA layer (2 layers) plus a norm: enough entries for binomial bounds, few shapes.
SMALL_SHAPES = {"blk": {"kernel": (2, 128, 96), "lora_a": (2, 128, 16), "lora_b": (2, 16, 96)}, "norm": (96,)}
SMALL_LABELS = {"blk": {"kernel": "FrozenWeight", "lora_a": "LoRAFactor", "lora_b": "LoRAFactor"}, "norm": "Param"}


def _is_shape(x) -> bool:
    return isinstance(x, tuple) and all(isinstance(d, int) for d in x)


@pytest.fixture(scope="module")
def random_adam_state():
    """optax.adam state on *all* leaves (frozen included) with random non-zero moments (NumPy-filled)."""
    params = jax.tree.map(lambda sh: jax.ShapeDtypeStruct(sh, jnp.float32), SMALL_SHAPES, is_leaf=_is_shape)
    abstract = jax.eval_shape(optax.adam(1e-3).init, params)
    rng = np.random.default_rng(11)
    return jax.tree.map(
        lambda x: np.abs(rng.standard_normal(x.shape, np.float32)) + 0.01 if x.shape else np.full((), 7, x.dtype),
        abstract,
    )


def _moments(state):
    adam = state[0]
    assert isinstance(adam, optax.ScaleByAdamState)
    return adam


@pytest.mark.parametrize("ratio", [0.7, 0.999])
def test_random_reset_prunes_ratio_of_factor_moments_only(random_adam_state, ratio):
    new = reset_optimizer_state(random_adam_state, SMALL_LABELS, "random", ratio, jax.random.key(5))
    old_m, new_m = _moments(random_adam_state), _moments(new)
    assert int(new_m.count) == int(old_m.count) == 7
    n_zero = n_total = 0
    for field in ("mu", "nu"):
        before, after = getattr(old_m, field), getattr(new_m, field)
        for name in ("lora_a", "lora_b"):
            a, b = np.asarray(after["blk"][name]), np.asarray(before["blk"][name])
            kept = a != 0
            np.testing.assert_array_equal(a[kept], b[kept])
            n_zero += int((~kept).sum())
            n_total += a.size
        # frozen W and the norm: identical
        np.testing.assert_array_equal(after["blk"]["kernel"], before["blk"]["kernel"])
        np.testing.assert_array_equal(after["norm"], before["norm"])
    p = ratio
    tol = 5 * math.sqrt(p * (1 - p) / n_total) + 1 / n_total
    assert abs(n_zero / n_total - p) < tol, (n_zero, n_total)
    # mu and nu draw independent masks (official: one torch.rand_like per state tensor)
    if ratio == 0.7:
        assert not np.array_equal(
            np.asarray(new_m.mu["blk"]["lora_a"]) != 0, np.asarray(new_m.nu["blk"]["lora_a"]) != 0
        )


def test_magnitude_reset_keeps_exact_top_fraction_per_matrix(random_adam_state):
    ratio = 0.9
    new = reset_optimizer_state(random_adam_state, SMALL_LABELS, mode="magnitude", ratio=ratio)
    assert int(_moments(new).count) == 7
    checked = 0
    for field in ("mu", "nu"):
        before_t, after_t = getattr(_moments(random_adam_state), field), getattr(_moments(new), field)
        np.testing.assert_array_equal(after_t["blk"]["kernel"], before_t["blk"]["kernel"])
        np.testing.assert_array_equal(after_t["norm"], before_t["norm"])
        for name in ("lora_a", "lora_b"):
            b, a = np.asarray(before_t["blk"][name]), np.asarray(after_t["blk"][name])
            for layer_b, layer_a in zip(b, a, strict=True):  # stacked: one threshold per layer's matrix
                n = layer_b.size
                kept = layer_a != 0
                # |x| > linear-interpolated quantile: sorted positions above floor(ratio·(n−1)) survive
                assert kept.sum() == n - 1 - math.floor(ratio * (n - 1)), (name, kept.sum(), n)
                assert np.abs(layer_b[kept]).min() > np.abs(layer_b[~kept]).max()
                np.testing.assert_array_equal(layer_a[kept], layer_b[kept])
                checked += 1
    assert checked == 2 * 2 * 2  # mu, nu × 2 factors × 2 layers


def test_zero_reset_and_partitioned_state(trained):
    """On the real (trained, optax.partition) state: factor moments zero, others identical, structure kept."""
    state, labels = trained["opt_state"], trained["labels"]
    new = reset_optimizer_state(state, labels, "zero")
    assert jax.tree.structure(new) == jax.tree.structure(state)
    inner_old = state.inner_states["trainable"].inner_state[0]
    inner_new = new.inner_states["trainable"].inner_state[0]
    assert int(inner_new.count) == int(inner_old.count) == 6
    for field in ("mu", "nu"):
        old, cur = getattr(inner_old, field), getattr(inner_new, field)
        assert isinstance(old["blocks"]["attn"]["q"]["kernel"], optax.MaskedNode)  # frozen: no state at all
        assert np.abs(np.asarray(old["blocks"]["attn"]["q"]["lora_b"])).max() > 0
        assert not np.any(np.asarray(cur["blocks"]["attn"]["q"]["lora_b"]))
        assert not np.any(np.asarray(cur["blocks"]["mlp"]["down"]["lora_a"]))
        np.testing.assert_array_equal(cur["embed"], old["embed"])
        np.testing.assert_array_equal(cur["lm_head"]["kernel"], old["lm_head"]["kernel"])
    # a bool mask works like the labels
    by_mask = reset_optimizer_state(state, _factor_mask(labels), "zero")
    for x, y in zip(jax.tree.leaves(by_mask), jax.tree.leaves(new), strict=True):
        np.testing.assert_array_equal(x, y)


def test_reset_of_8bit_moments_dequantizes_prunes_requantizes():
    shape = (16, 24)  # one shape for every leaf: few eager compiles
    params = {"l": {k: jnp.ones(shape) for k in ("kernel", "lora_a", "lora_b")}, "norm": jnp.ones(shape[1:])}
    labels = {"l": {"kernel": "FrozenWeight", "lora_a": "LoRAFactor", "lora_b": "LoRAFactor"}, "norm": "Param"}
    tx = scale_by_adam_8bit(min_size=64, block_size=64)
    rng = np.random.default_rng(0)
    mu = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32), params)
    nu = jax.tree.map(lambda x: rng.standard_normal(x.shape, np.float32) ** 2, params)
    state = set_moments(tx.init(params), mu, nu)._replace(count=jnp.asarray(2, jnp.int32))  # quantizes
    assert isinstance(state.mu["l"]["lora_a"], QuantizedArray)
    new = reset_optimizer_state(state, labels, "magnitude", 0.5)
    assert isinstance(new.nu["l"]["lora_b"], QuantizedArray) and int(new.count) == 2
    old_moments, new_moments = get_moments(state), get_moments(new)
    for i, field in enumerate(("mu", "nu")):
        for name in ("lora_a", "lora_b"):
            before, after = np.asarray(old_moments[i]["l"][name]), np.asarray(new_moments[i]["l"][name])
            kept = np.abs(before) > np.quantile(np.abs(before), 0.5)
            assert 0 < kept.sum() < kept.size
            assert not np.any(after[~kept])  # pruned entries are exactly 0 after requantization
            np.testing.assert_allclose(after[kept], before[kept], rtol=0.02, atol=0.01 * np.abs(before).max())
        old_f, new_f = getattr(state, field), getattr(new, field)
        np.testing.assert_array_equal(new_f["l"]["kernel"].codes, old_f["l"]["kernel"].codes)
        np.testing.assert_array_equal(new_f["norm"], old_f["norm"])


def test_none_reset_keeps_every_moment(random_adam_state):
    """``mode='none'``: restarts without optimizer reset (Table 6 ablation) leave the state untouched."""
    new = reset_optimizer_state(random_adam_state, SMALL_LABELS, "none")
    for x, y in zip(jax.tree.leaves(new), jax.tree.leaves(random_adam_state), strict=True):
        np.testing.assert_array_equal(x, y)
    assert np.abs(np.asarray(_moments(new).mu["blk"]["lora_a"])).min() > 0


def test_reset_errors(random_adam_state):
    labels = SMALL_LABELS
    with pytest.raises(ValueError, match="mode"):
        reset_optimizer_state(random_adam_state, labels, "prune")
    with pytest.raises(ValueError, match="ratio"):
        reset_optimizer_state(random_adam_state, labels, "magnitude", 1.5)
    with pytest.raises(ValueError, match="key"):
        reset_optimizer_state(random_adam_state, labels, "random", 0.9)
    with pytest.raises(ValueError, match="not shaped like"):
        reset_optimizer_state(random_adam_state, {"norm": "LoRAFactor"}, "zero")
    with pytest.raises(ValueError, match="no moment"):
        reset_optimizer_state(optax.sgd(0.1).init({"norm": jnp.ones(3)}), {"norm": "LoRAFactor"}, "zero")
    with pytest.raises(ValueError, match="labels_or_mask"):
        reset_optimizer_state(random_adam_state, jax.tree.map(lambda _: 1.0, labels), "zero")


# ------------------------------------------------------------------------------------- schedule


def _closed_form(t, *, peak, warmup, restart_every, restart_warmup, total, min_ratio, first_restart=None):
    def f(u):
        progress = min(max((u - warmup) / (total - warmup), 0.0), 1.0)
        return peak * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))

    first = restart_every if first_restart is None else first_restart
    if t < warmup:
        return peak * t / warmup
    k, j = divmod(t - first, restart_every)
    if t >= first and j < restart_warmup:
        return j / restart_warmup * f(first + k * restart_every + restart_warmup)
    return f(t)


def test_jagged_schedule_first_restart_at_the_warm_start_switch():
    kw = dict(peak=2e-3, warmup=30, restart_every=100, restart_warmup=20, total=700, min_ratio=0.1, first_restart=250)
    sched = jagged_cosine_schedule(**kw)
    ts = [0, 15, 30, 100, 200, 249, 250, 260, 270, 300, 350, 360, 370, 450, 699, 700, 900]
    got = np.asarray(jax.jit(jax.vmap(sched))(jnp.asarray(ts)))
    for t, value in zip(ts, got, strict=True):
        assert value == pytest.approx(_closed_form(t, **kw), rel=1e-5, abs=1e-9), t
    # no drop before the switch (plain warmup + cosine), drops at the switch and every 100 after it
    plain = jagged_cosine_schedule(**{**kw, "first_restart": 10_000, "restart_every": 10_000})
    for t in (100, 200, 249):
        assert float(sched(t)) == pytest.approx(float(plain(t)), rel=1e-6)
    assert float(sched(250)) == 0.0 and float(sched(350)) == 0.0 and float(sched(450)) == 0.0
    assert float(sched(260)) == pytest.approx(0.5 * float(plain(270)), rel=1e-5)
    with pytest.raises(ValueError, match="^warmup"):
        jagged_cosine_schedule(**{**kw, "first_restart": 20})
    with pytest.raises(ValueError, match="^first_restart"):
        jagged_cosine_schedule(**{**kw, "first_restart": 0})


def test_jagged_schedule_matches_closed_form():
    kw = dict(peak=3e-3, warmup=40, restart_every=100, restart_warmup=20, total=990, min_ratio=0.1)
    sched = jagged_cosine_schedule(**kw)
    cases = {
        0: 0.0,  # start of warmup
        20: 1.5e-3,  # mid warmup
        40: 3e-3,  # end of warmup = peak
        100: 0.0,  # first restart
        300: 0.0,  # later restart
        310: None,  # mid re-warm
        320: None,  # end of re-warm: back on the curve
        355: None,  # mid-cycle
        950: None,
        990: 3e-4,  # end: min_ratio · peak
        1250: 3e-4,  # stays at the floor (off the re-warms)
    }
    got = jax.jit(jax.vmap(sched))(jnp.asarray(list(cases)))
    for (t, exact), value in zip(cases.items(), np.asarray(got), strict=True):
        ref = _closed_form(t, **kw)
        if exact is not None:
            assert ref == pytest.approx(exact, abs=1e-12)
        assert value == pytest.approx(ref, rel=1e-5, abs=1e-9), t
    # mid re-warm is half of the curve's value where the re-warm ends, which is then continuous
    assert float(sched(310)) == pytest.approx(0.5 * float(sched(320)), rel=1e-5)
    assert float(sched(355)) < float(sched(320)) and float(sched(321)) < float(sched(320))
    assert sched(5).dtype == jnp.float32


@pytest.mark.parametrize(
    "change, name",
    [
        (dict(peak=0.0), "peak"),
        (dict(peak=-1.0), "peak"),
        (dict(warmup=-1), "warmup"),
        (dict(restart_every=0), "restart_every"),
        (dict(restart_warmup=0), "restart_warmup"),
        (dict(restart_warmup=100), "restart_warmup"),
        (dict(total=0), "total"),
        (dict(warmup=1001, restart_every=2000), "warmup"),
        (dict(warmup=150), "warmup"),
        (dict(min_ratio=1.5), "min_ratio"),
        (dict(min_ratio=-0.1), "min_ratio"),
        (dict(restart_every=2.5), "restart_every"),
    ],
)
def test_jagged_schedule_rejects_bad_arguments(change, name):
    kw = dict(peak=1e-3, warmup=40, restart_every=100, restart_warmup=20, total=1000, min_ratio=0.1)
    with pytest.raises(ValueError, match=name):
        jagged_cosine_schedule(**{**kw, **change})


# ------------------------------------------------------------------------------ rank & memory


def test_restarts_accumulate_high_rank_update():
    """Least squares to a full-rank 16×16 target with rank-2 LoRA: ΔW has rank > 2 only with restarts."""
    n, r, cycles, steps = 16, 2, 5, 60
    layer = LoRADense(n, n, rank=r, alpha=2.0, axes=("embed", "mlp"), rngs=nnx.Rngs(0))
    graphdef, params0 = split_model(layer)
    labels = param_labels(nnx.state(layer))
    rng = np.random.default_rng(3)
    x, target = (jnp.asarray(rng.standard_normal(shape, np.float32)) for shape in ((64, n), (n, n)))
    tx = frozen_partition(optax.adam(0.05), labels)

    def loss(p):
        return jnp.mean((nnx.merge(graphdef, p)(x) - x @ target) ** 2)

    def train(p, s):
        def body(carry, _):
            p, s = carry
            u, s = tx.update(jax.grad(loss)(p), s, p)
            return (optax.apply_updates(p, u), s), None

        return jax.lax.scan(body, (p, s), None, length=steps)[0]

    @jax.jit
    def run(p, key, restarts, ratio):  # one compile for both runs: traced ``restarts`` and ``ratio``
        def cycle(carry, c):
            p, s = train(*carry)
            restarted = relora_restart(
                p, s, jax.random.fold_in(key, c), labels=labels, alpha_over_rank=1.0, reset_ratio=ratio
            )
            return jax.tree.map(lambda new, old: jnp.where(restarts, new, old), restarted, (p, s)), None

        p, _ = jax.lax.scan(cycle, (p, tx.init(p)), jnp.arange(cycles))[0]
        return p, loss(p)

    def delta_rank(p):
        w = np.asarray(p["kernel"], np.float64) + np.asarray(p["lora_a"], np.float64) @ np.asarray(p["lora_b"])
        sv = np.linalg.svd(w - np.asarray(params0["kernel"], np.float64), compute_uv=False)
        return int((sv > 1e-3 * sv[0]).sum())

    relora, relora_loss = run(params0, jax.random.key(4), jnp.asarray(True), 0.999)  # official random reset
    lora, lora_loss = run(params0, jax.random.key(4), jnp.asarray(False), 0.999)
    assert delta_rank(lora) <= r
    assert delta_rank(relora) > r
    assert float(relora_loss) < float(lora_loss)


def test_frozen_partition_state_bytes_exclude_frozen_weights():
    _, params = abstract_params(CFG)
    labels = param_labels(CFG)
    trainable = sum(
        math.prod(x.shape)
        for x, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels), strict=True)
        if lab != "FrozenWeight"
    )
    assert 0 < trainable < count_params(params)

    def state_bytes(tx):
        state = jax.eval_shape(tx.init, params)
        return sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state) if x.ndim)

    adamw = optax.adamw(1e-3, weight_decay=0.1, mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p))
    assert state_bytes(frozen_partition(adamw, labels)) == 2 * trainable * 4
    assert state_bytes(adamw) == 2 * count_params(params) * 4
    # labels may also be given as a function of the params
    assert state_bytes(frozen_partition(adamw, lambda p: labels)) == 2 * trainable * 4
