"""path_mask selects matrices by regexes over parameter paths, alike on Flax linen, NNX and plain dicts."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import pytest
from flax import nnx

from lowrank_jax.optim import masks
from lowrank_jax.optim.masks import DEFAULT_TARGETS, default_mask, path_mask, path_str, resolve_mask


def _selected(tree) -> set[str]:
    return {path_str(p) for p, v in jax.tree_util.tree_leaves_with_path(tree) if v}


class _LinenBlock(nn.Module):
    @nn.compact
    def __call__(self, x):
        x = x + nn.Dense(8, name="q_proj")(x)
        return nn.Dense(8, name="down_proj")(nn.Dense(16, name="up_proj")(x))


class _Linen(nn.Module):
    @nn.compact
    def __call__(self, tokens):
        x = nn.Embed(20, 8, name="embed_tokens")(tokens)
        x = x + _LinenBlock(name="self_attn")(x)
        x = x + nn.Dense(8, name="mlp")(x)
        x = nn.RMSNorm(name="norm")(x)
        return nn.Dense(20, name="lm_head")(x)


class _NnxBlock(nnx.Module):
    def __init__(self, rngs):
        self.q_proj = nnx.Linear(8, 8, rngs=rngs)
        self.up_proj = nnx.Linear(8, 16, rngs=rngs)
        self.down_proj = nnx.Linear(16, 8, rngs=rngs)


class _Nnx(nnx.Module):
    def __init__(self, rngs):
        self.embed_tokens = nnx.Embed(20, 8, rngs=rngs)
        self.self_attn = _NnxBlock(rngs)
        self.mlp = nnx.Linear(8, 8, rngs=rngs)
        self.norm = nnx.RMSNorm(8, rngs=rngs)
        self.lm_head = nnx.Linear(8, 20, rngs=rngs)


def _trees() -> dict:
    linen = _Linen().init(jax.random.key(0), jnp.zeros((1, 3), jnp.int32))["params"]
    nnx_state = nnx.state(_Nnx(nnx.Rngs(0)), nnx.Param)
    plain = jax.tree.map(lambda x: jnp.zeros(x.shape), nnx.to_pure_dict(nnx_state))
    return {"linen": linen, "nnx": nnx_state, "dict": plain}


def test_default_mask_selects_the_same_attention_and_mlp_kernels_everywhere(capsys) -> None:
    want = {"self_attn/q_proj/kernel", "self_attn/up_proj/kernel", "self_attn/down_proj/kernel", "mlp/kernel"}
    for kind, tree in _trees().items():
        assert _selected(default_mask(tree)) == want, kind
    assert capsys.readouterr().err == ""


def test_patterns_exclusions_and_min_ndim() -> None:
    for kind, tree in _trees().items():
        got = _selected(path_mask(r"proj", exclude=[r"down"])(tree))
        assert got == {"self_attn/q_proj/kernel", "self_attn/up_proj/kernel"}, kind
        assert _selected(path_mask(r"q_proj", min_ndim=1)(tree)) == {"self_attn/q_proj/kernel", "self_attn/q_proj/bias"}
    assert _selected(resolve_mask(("lm_head",))(_trees()["dict"])) == {"lm_head/kernel"}
    assert resolve_mask(None) is default_mask


def test_a_mask_that_selects_nothing_or_everything_warns_once(capsys) -> None:
    masks._warned.clear()
    tree = _trees()["dict"]
    nothing = path_mask(r"no_such_module")
    for _ in range(3):
        assert not _selected(nothing(tree))
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "selects no leaf of" in err[0] and "plain Adam" in err[0], err
    everything = path_mask(r".", min_ndim=0)
    everything(tree), everything(tree)
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1 and "selects every leaf of" in err[0], err


def test_bad_patterns_are_value_errors() -> None:
    with pytest.raises(ValueError, match="^patterns: give at least one"):
        path_mask()
    with pytest.raises(ValueError, match="^patterns: not a regular expression"):
        path_mask("(")


def test_default_targets_select_this_projects_llama_method_kernels() -> None:
    from lowrank_jax.config import load_config
    from lowrank_jax.models import abstract_params

    cfg = load_config("tiny", ["model.vocab_size=64"])
    params = abstract_params(cfg.model)[1]
    got = _selected(default_mask(params))
    assert got == {f"blocks/attn/{k}/kernel" for k in "qkvo"} | {
        f"blocks/mlp/{k}/kernel" for k in ("gate", "up", "down")
    }
    assert len(DEFAULT_TARGETS) == 2
