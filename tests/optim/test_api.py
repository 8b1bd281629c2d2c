"""The optax convention of every method: ``scale_by_<method>`` composes, ``<method>(learning_rate, …)`` is complete.

The card's ``optax.chain(<method>(rank), optax.adamw(lr))`` must stop before the first update with a message naming
the right form (both spellings); the complete optimizers hold less state than AdamW, equal their composed chains
bitwise, and work under ``optax.inject_hyperparams``, ``optax.MultiSteps``, ``optax.apply_if_finite`` and
``nnx.Optimizer`` on an NNX model that is not this project's.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import lowrank_jax as lrj
from lowrank_jax.optim.complete import matrices

# complete optimizer, scale-by transform, the keywords both take in these tests
METHODS = {
    "galore": (lrj.galore, lrj.scale_by_galore, {"rank": 4, "update_proj_gap": 2}),
    "golore": (lrj.golore, lrj.scale_by_golore, {"rank": 4, "update_proj_gap": 2, "random_from": 2}),
    "apollo": (lrj.apollo, lrj.scale_by_apollo, {"rank": 4, "update_proj_gap": 2}),
    "apollo_mini": (lrj.apollo_mini, lrj.scale_by_apollo_mini, {"update_proj_gap": 2}),
    "fira": (lrj.fira, lrj.scale_by_fira, {"rank": 4, "update_proj_gap": 2}),
    "adamw_8bit": (lrj.adamw_8bit, lrj.scale_by_adam_8bit, {"block_size": 64, "min_size": 0}),
}
# the optax-tool tests run on these in the default suite and on every method with `-m slow`
DEFAULT_SUITE = ("galore", "apollo", "adamw_8bit")
EVERY = [n if n in DEFAULT_SUITE else pytest.param(n, marks=pytest.mark.slow) for n in METHODS]
SHAPES = {
    "embed": (64, 24),
    "layers": {"attn": {"q": {"kernel": (24, 24)}}, "mlp": {"up": {"kernel": (24, 40)}, "down": {"kernel": (40, 24)}}},
    "norm": {"scale": (24,)},
    "head": {"kernel": (24, 64)},
}


def _tree(rng: np.random.Generator, scale: float = 1.0) -> dict:
    return jax.tree.map(
        lambda s: jnp.asarray(rng.standard_normal(s) * scale, jnp.float32),
        SHAPES,
        is_leaf=lambda x: isinstance(x, tuple),
    )


def _bytes(tree) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree) if hasattr(x, "dtype"))


def _run(tx: optax.GradientTransformation, grads: list, params: dict, jit: bool = True) -> tuple[list, object]:
    state = tx.init(params)
    update = jax.jit(tx.update) if jit else tx.update
    out = []
    for g in grads:
        u, state = update(g, state, params)
        params = optax.apply_updates(params, u)
        out.append(u)
    return out, state


@pytest.mark.parametrize("name", list(METHODS))
def test_card_expression_without_learning_rate_stops_at_construction(name: str) -> None:
    complete, _, kw = METHODS[name]
    with pytest.raises(
        TypeError, match=rf"^{name}\(\) is a complete optimizer .* lrj\.{name}\(learning_rate, \.\.\.\)"
    ):
        optax.chain(complete(**kw), optax.adamw(1e-3))


@pytest.mark.parametrize("name", list(METHODS))
@pytest.mark.parametrize("spelling", ["complete", "scale_by", "named_chain"])
def test_card_expression_stops_before_the_first_update(name: str, spelling: str) -> None:
    complete, scale_by, kw = METHODS[name]
    params = _tree(np.random.default_rng(0))
    if spelling == "complete":
        tx = optax.chain(complete(1e-3, **kw), optax.adamw(1e-3))
    elif spelling == "scale_by":
        tx = optax.chain(scale_by(**METHODS[name][2]), optax.adamw(1e-3))
    else:
        tx = optax.named_chain(("method", complete(1e-3, **kw)), ("adamw", optax.adamw(1e-3)))
    with pytest.raises(
        ValueError, match=r"would run a second optimizer .* use lrj\.\w+\(learning_rate, \.\.\.\) on its"
    ):
        tx.init(params)


@pytest.mark.parametrize("name", list(METHODS))
def test_params_free_transforms_may_surround_the_method(name: str) -> None:
    complete, scale_by, kw = METHODS[name]
    params = _tree(np.random.default_rng(1))
    optax.chain(optax.clip_by_global_norm(1.0), complete(1e-3, **kw)).init(params)
    composed = optax.chain(scale_by(**METHODS[name][2]), optax.add_decayed_weights(0.1), optax.scale(-1e-3))
    composed.init(params)
    # the same optimizers in a plain list (not a combinator) are not a composition
    for tx in [complete(1e-3, **kw), optax.adamw(1e-3)]:
        tx.init(params)


@pytest.mark.parametrize("name", list(METHODS))
def test_complete_optimizer_holds_less_state_than_adamw(name: str) -> None:
    complete, _, kw = METHODS[name]
    params = _tree(np.random.default_rng(2))
    ours = _bytes(jax.eval_shape(complete(1e-3, **kw).init, params))
    adamw = _bytes(jax.eval_shape(optax.adamw(1e-3).init, params))
    assert ours < adamw, (ours, adamw)


def _composed(name: str, lr: float, wd: float) -> optax.GradientTransformation:
    """The complete optimizer spelled out: its scale-by transform, decoupled weight decay, the learning rate."""
    _, scale_by, kw = METHODS[name]
    if name == "adamw_8bit":
        scaling = scale_by(0.9, 0.999, 1e-8, **kw)
    elif name in ("galore", "golore"):
        scaling = scale_by(**kw, base_optimizer=lrj.scale_by_adam_hf(0.9, 0.999, 1e-6), mask=lrj.default_mask)
    else:
        scaling = scale_by(**kw, mask=lrj.default_mask)
    return optax.chain(scaling, optax.add_decayed_weights(wd, mask=matrices), optax.scale_by_learning_rate(lr))


@pytest.mark.parametrize("name", list(METHODS))
def test_complete_optimizer_equals_its_composed_chain_bitwise(name: str) -> None:
    complete, _, kw = METHODS[name]
    rng = np.random.default_rng(3)
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(5)]
    got, _ = _run(complete(0.01, weight_decay=0.1, **kw), grads, params)
    want, _ = _run(_composed(name, 0.01, 0.1), grads, params)
    jax.tree.map(np.testing.assert_array_equal, got, want)


@pytest.mark.parametrize("name", EVERY)
def test_inject_hyperparams_changes_the_learning_rate_mid_run(name: str) -> None:
    complete, _, kw = METHODS[name]
    rng = np.random.default_rng(4)
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(4)]
    tx = optax.inject_hyperparams(complete)(learning_rate=0.01, weight_decay=0.1, **kw)
    state = tx.init(params)
    update = jax.jit(tx.update)
    plain, _ = _run(complete(0.01, weight_decay=0.1, **kw), grads[:2], params)
    p = params
    for i in range(2):
        u, state = update(grads[i], state, p)
        jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u, plain[i])
        p = optax.apply_updates(p, u)
    state.hyperparams["learning_rate"] = jnp.asarray(0.02)
    u_double, _ = update(grads[2], state, p)
    state.hyperparams["learning_rate"] = jnp.asarray(0.0)
    u_zero, _ = update(grads[2], state, p)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u_zero))
    state.hyperparams["learning_rate"] = jnp.asarray(0.01)
    u_single, _ = update(grads[2], state, p)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, 2 * b, rtol=1e-5, atol=1e-8), u_double, u_single)


@pytest.mark.parametrize("name", EVERY)
def test_multisteps_accumulates_then_steps_like_the_mean_gradient(name: str) -> None:
    complete, _, kw = METHODS[name]
    rng = np.random.default_rng(5)
    params = _tree(rng)
    g1, g2 = _tree(rng), _tree(rng)
    tx = optax.MultiSteps(complete(0.01, **kw), every_k_schedule=2)
    state = tx.init(params)
    u1, state = tx.update(g1, state, params)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(u1))
    u2, state = tx.update(g2, state, params)
    mean = jax.tree.map(lambda a, b: (a + b) / 2, g1, g2)
    (want,), _ = _run(complete(0.01, **kw), [mean], params, jit=False)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u2, want)


@pytest.mark.parametrize("name", EVERY)
def test_apply_if_finite_skips_a_non_finite_step(name: str) -> None:
    complete, _, kw = METHODS[name]
    rng = np.random.default_rng(6)
    params = _tree(rng)
    grads = [_tree(rng) for _ in range(3)]
    bad = jax.tree.map(lambda x: x.at[(0,) * x.ndim].set(jnp.nan), grads[1])
    got, state = _run(optax.apply_if_finite(complete(0.01, **kw), 2), [grads[0], bad, grads[2]], params)
    want, _ = _run(complete(0.01, **kw), [grads[0], grads[2]], params)
    assert all(float(jnp.max(jnp.abs(x))) == 0.0 for x in jax.tree.leaves(got[1]))
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), got[2], want[1])
    assert int(state.total_notfinite) == 1


class _Block(nnx.Module):
    """A transformer-ish block named like Hugging Face's modules (not this project's model)."""

    def __init__(self, d: int, rngs: nnx.Rngs) -> None:
        self.self_attn = nnx.Linear(d, d, rngs=rngs)
        self.mlp = nnx.Linear(d, 2 * d, rngs=rngs)
        self.mlp_out = nnx.Linear(2 * d, d, rngs=rngs)


class _Foreign(nnx.Module):
    def __init__(self, rngs: nnx.Rngs, vocab: int = 32, d: int = 16) -> None:
        self.embed = nnx.Embed(vocab, d, rngs=rngs)
        self.block = _Block(d, rngs)
        self.norm = nnx.RMSNorm(d, rngs=rngs)
        self.lm_head = nnx.Linear(d, vocab, rngs=rngs)

    def __call__(self, tokens: jax.Array) -> jax.Array:
        x = self.embed(tokens)
        x = x + self.block.self_attn(x)
        x = x + self.block.mlp_out(jax.nn.gelu(self.block.mlp(x)))
        return self.lm_head(self.norm(x))


@pytest.mark.parametrize("name", EVERY)
def test_nnx_optimizer_trains_a_foreign_model(name: str) -> None:
    complete, _, kw = METHODS[name]
    model = _Foreign(nnx.Rngs(0))
    opt = nnx.Optimizer(model, complete(0.01, **kw), wrt=nnx.Param)
    tokens = jax.random.randint(jax.random.key(1), (4, 12), 0, 32)

    @nnx.jit
    def step(model: _Foreign, opt: nnx.Optimizer) -> jax.Array:
        def loss_fn(m: _Foreign) -> jax.Array:
            logits = m(tokens[:, :-1])
            return optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        opt.update(model, grads)
        return loss

    losses = [float(step(model, opt)) for _ in range(8)]
    assert losses[-1] < losses[0] - 0.05, losses
    if name in ("galore", "golore", "fira"):  # the default mask projected the attention and MLP kernels only
        projected = {lrj.optim.masks.path_str(p) for p, x in jax.tree_util.tree_leaves_with_path(opt.opt_state)
                     if "proj_" in lrj.optim.masks.path_str(p) and getattr(x, "ndim", 0) >= 2}  # fmt: skip
        assert projected and all("block" in p and "kernel" in p for p in projected), projected
