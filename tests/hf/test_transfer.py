"""import-hf / export-hf against transformers' own LlamaForCausalLM (float32 logits within 1e-4)."""

from __future__ import annotations

import dataclasses
import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import VARIANTS, hf_logits, make_checkpoint, read_json, torch, transformers
from flax import nnx

from lowrank_jax.config import ModelConfig
from lowrank_jax.hf import export_hf, import_hf, load_model
from lowrank_jax.hf import safetensors_io as st
from lowrank_jax.hf.model_dir import save_model_dir
from lowrank_jax.hf.transfer import dense_params
from lowrank_jax.models import abstract_params, build_model, split_model
from lowrank_jax.train.cli import main

TOL = 1e-4


def our_logits(cfg, params, tokens):
    graphdef, _ = abstract_params(cfg)
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    return np.asarray(forward(jax.tree.map(jnp.asarray, params), jnp.asarray(tokens)))


def tokens(seed=0, shape=(2, 19)):
    return np.random.default_rng(seed).integers(0, 96, shape)


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_import_export_logits_and_round_trip(checkpoints, tmp_path, variant):
    src, hf_model = checkpoints[variant]
    x = tokens(1)
    import_hf(src, tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    assert ours.cfg.kv_heads == hf_model.config.num_key_value_heads
    assert ours.cfg.tie_embeddings == hf_model.config.tie_word_embeddings
    logits = our_logits(ours.cfg, ours.params, x)
    err_in = np.abs(logits - hf_logits(hf_model, x)).max()

    export_hf(tmp_path / "ours", tmp_path / "exported")
    back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "exported").eval()
    err_out = np.abs(logits - hf_logits(back, x)).max()
    print(f"{variant}: import max abs err {err_in:.2e}, export max abs err {err_out:.2e}")
    assert err_in <= TOL and err_out <= TOL

    import_hf(tmp_path / "exported", tmp_path / "again")
    again = load_model(tmp_path / "again")
    assert again.cfg == ours.cfg
    flat, flat2 = jax.tree.leaves_with_path(ours.params), jax.tree.leaves_with_path(again.params)
    assert [p for p, _ in flat] == [p for p, _ in flat2]
    assert all(a.dtype == b.dtype and np.array_equal(a, b) for (_, a), (_, b) in zip(flat, flat2, strict=True))


def test_sharded_bfloat16_checkpoint(tmp_path):
    hf_model = make_checkpoint(tmp_path / "f32", "gqa_tied_llama3", seed=5)
    hf_model.to(torch.bfloat16).save_pretrained(tmp_path / "bf16", max_shard_size="20KB")
    assert (tmp_path / "bf16" / "model.safetensors.index.json").is_file()
    import_hf(tmp_path / "bf16", tmp_path / "ours")
    ours = load_model(tmp_path / "ours")
    assert ours.cfg.param_dtype == "bfloat16"
    ref = {k: v.float().numpy() for k, v in hf_model.state_dict().items()}
    np.testing.assert_array_equal(np.asarray(ours.params["embed"], np.float32), ref["model.embed_tokens.weight"])
    q = np.asarray(ours.params["blocks"]["attn"]["q"]["kernel"][1], np.float32)
    np.testing.assert_array_equal(q, ref["model.layers.1.self_attn.q_proj.weight"].T)


def _random_factored(kind: str, seed: int) -> tuple[ModelConfig, dict]:
    cfg = ModelConfig(
        vocab_size=96, hidden=32, ffn=48, heads=4, layers=2, num_kv_heads=2, dense=kind, lora_rank=4, sl_rank=4,
        sl_density=0.1, sl_implementation="xla",
    )  # fmt: skip
    _, params = split_model(build_model(cfg, seed))
    keys = iter(jax.random.split(jax.random.key(seed + 1), 64))

    def perturb(path, x):  # B = 0 at init: make every factor non-zero so the merge is exercised
        name = str(path[-1])
        if jnp.issubdtype(x.dtype, jnp.floating) and ("lora_b" in name or "sl_b" in name):
            return jax.random.normal(next(keys), x.shape, x.dtype) * 0.05
        return x

    return cfg, jax.tree_util.tree_map_with_path(perturb, params)


@pytest.mark.parametrize("kind", ["lora", "lowrank", "sl"])
def test_factored_layers_export_merged(tmp_path, kind):
    cfg, params = _random_factored(kind, seed=3)
    save_model_dir(tmp_path / "m", cfg, jax.tree.map(np.asarray, params), None, None)
    export_hf(tmp_path / "m", tmp_path / "hf")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = tokens(2)
    err = np.abs(our_logits(cfg, params, x) - hf_logits(hf_model, x)).max()
    print(f"{kind}: exported merged max abs err {err:.2e}")
    assert err <= TOL


def test_bitlinear_exports_dequantised_ternary_weights(tmp_path):
    cfg, params = _random_factored("bitlinear", seed=4)
    save_model_dir(tmp_path / "m", cfg, jax.tree.map(np.asarray, params), None, None)
    export_hf(tmp_path / "m", tmp_path / "hf")
    tensors = st.load_file(tmp_path / "hf" / "model.safetensors")
    for layer in range(cfg.layers):
        w = tensors[f"model.layers.{layer}.mlp.up_proj.weight"]
        latent = np.asarray(params["blocks"]["mlp"]["up"]["kernel"][layer], np.float64)
        gamma = np.abs(latent).mean() + 1e-5
        want = np.clip(np.round(latent / gamma), -1, 1) * gamma  # BitNet b1.58's absmean RoundClip
        np.testing.assert_allclose(w, want.T, rtol=1e-6, atol=1e-7)
        assert len(np.unique(np.round(w / gamma))) <= 3


def test_random_model_of_ours_exports_to_transformers(tmp_path):
    cfg = ModelConfig(vocab_size=96, hidden=32, ffn=40, heads=2, layers=3, num_kv_heads=1, tie_embeddings=True)
    cfg = dataclasses.replace(cfg, scan_layers=False)
    _, params = split_model(build_model(cfg, 7))
    save_model_dir(tmp_path / "m", cfg, jax.tree.map(np.asarray, params), None, None)
    assert main(["export-hf", str(tmp_path / "m"), str(tmp_path / "hf")]) == 0
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    x = tokens(3)
    assert np.abs(our_logits(cfg, params, x) - hf_logits(hf_model, x)).max() <= TOL
    assert dense_params(params, cfg)[0] is params


def _expect_error(capsys, argv, out, pattern):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("lowrank-jax: error:"), err
    assert pattern in err, err
    assert not out.exists()
    return err.strip()


def test_bad_inputs_one_line_exit_2_nothing_written(checkpoints, tmp_path, capsys):
    src = checkpoints["mha"][0]
    out = tmp_path / "out"
    messages = []

    def case(setup, pattern):
        bad = tmp_path / f"bad{len(messages)}"
        shutil.copytree(src, bad)
        setup(bad)
        messages.append(_expect_error(capsys, ["import-hf", str(bad), str(out)], out, pattern))

    messages.append(_expect_error(capsys, ["import-hf", str(tmp_path / "nope"), str(out)], out, "no such directory"))
    case(lambda d: (d / "config.json").unlink(), "no config.json")
    case(lambda d: (d / "model.safetensors").unlink(), "no *.safetensors")

    def arch(d):
        cfg = read_json(d / "config.json")
        (d / "config.json").write_text(json.dumps({**cfg, "model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))

    case(arch, "not a LLaMA causal LM")

    def shape(d):
        cfg = read_json(d / "config.json")
        (d / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 40}))

    case(shape, "config.json implies")

    def truncate(d):
        f = d / "model.safetensors"
        f.write_bytes(f.read_bytes()[:-100])

    case(truncate, "truncated safetensors")
    case(lambda d: (d / "config.json").write_text(json.dumps({**read_json(d / "config.json"), "mlp_bias": True})),
         "mlp_bias")  # fmt: skip
    import_hf(src, tmp_path / "ours")
    messages.append(
        _expect_error(capsys, ["export-hf", str(tmp_path / "ours"), str(tmp_path / "ours")], tmp_path / "x", "already")
    )
    messages.append(
        _expect_error(capsys, ["export-hf", str(tmp_path / "ours"), str(out), "--dtype", "int8"], out, "--dtype")
    )
    print("\n".join(messages))
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no half-written temporary directory
