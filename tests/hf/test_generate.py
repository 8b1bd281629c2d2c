"""generate: greedy decoding with the KV cache equals transformers' generate; sampling; the CLI."""

from __future__ import annotations

import dataclasses

import jax
import numpy as np
import pytest
from conftest import torch

from lowrank_jax.hf import load_model
from lowrank_jax.hf.generate import generate, sample_token
from lowrank_jax.train.cli import main


@pytest.mark.parametrize("variant", ["gqa_tied_llama3", "head_dim"])
def test_greedy_equals_transformers_generate(checkpoints, variant):
    src, hf_model = checkpoints[variant]
    model = load_model(src)
    prompt = np.random.default_rng(5).integers(0, 96, (2, 6))
    out, timing = generate(model.cfg, model.params, prompt, 24)
    with torch.no_grad():
        ref = hf_model.generate(
            torch.tensor(prompt),
            attention_mask=torch.ones(prompt.shape, dtype=torch.long),
            max_new_tokens=24,
            min_new_tokens=24,
            do_sample=False,
            pad_token_id=0,
        ).numpy()
    np.testing.assert_array_equal(out, ref[:, 6:])
    assert timing["tokens_per_s"] > 0
    if variant == "head_dim":  # the per-layer (unscanned) model decodes the same tokens
        cfg = dataclasses.replace(model.cfg, scan_layers=False)
        blocks = {i: jax.tree.map(lambda x, i=i: x[i], model.params["blocks"]) for i in range(cfg.layers)}
        out2, _ = generate(cfg, {**model.params, "blocks": blocks}, prompt, 24)
        np.testing.assert_array_equal(out2, out)


def test_sampling_top_p_and_temperature():
    rng = np.random.default_rng(0)
    logits = jax.numpy.asarray(rng.normal(size=(4, 50)).astype(np.float32) * 3)
    key = jax.random.key(1)
    sample = jax.jit(sample_token, static_argnums=(2, 3))
    greedy = np.asarray(sample_token(logits, key, 0.0, 1.0))
    np.testing.assert_array_equal(greedy, np.argmax(np.asarray(logits), -1))
    # a nucleus smaller than the top token's probability keeps only the top token
    np.testing.assert_array_equal(np.asarray(sample(logits, key, 1.0, 1e-6)), greedy)
    # with top_p=0.5 every draw lies in the smallest prefix of the sorted probabilities reaching 0.5
    probs = np.asarray(jax.nn.softmax(logits, -1), np.float64)
    draws = np.stack([np.asarray(sample(logits, k, 1.0, 0.5)) for k in jax.random.split(key, 200)])
    for row in range(4):
        order = np.argsort(-probs[row])
        keep = order[: int(np.searchsorted(np.cumsum(probs[row][order]), 0.5) + 1)]
        assert set(draws[:, row]) <= set(keep.tolist())
    # plain temperature sampling follows the softmax (frequency of the top token)
    many = np.stack([np.asarray(sample(logits, k, 1.0, 1.0)) for k in jax.random.split(key, 400)])
    assert abs((many[:, 0] == greedy[0]).mean() - probs[0].max()) < 0.1


def test_generate_cli_and_errors(checkpoints, capsys):
    src = str(checkpoints["mha"][0])
    assert main(["generate", src, "--prompt-ids", "3,5,7", "--max-new-tokens", "5"]) == 0
    cap = capsys.readouterr()
    assert len(cap.out.split()) == 5 and "tokens/s" in cap.err
    assert main(["generate", src, "--prompt-ids", "1,2", "--max-new-tokens", "5", "--temperature", "0.7",
                 "--top-p", "0.9", "--seed", "3"]) == 0  # fmt: skip
    capsys.readouterr()
    for argv, msg in [
        (["--prompt-ids", "1,2", "--max-new-tokens", "100"], "exceed model.max_seq_len"),
        (["--prompt-ids", "1,x"], "--prompt-ids"),
        (["--prompt-ids", "1,999"], "token ids must be in"),
        (["--prompt", "hi"], "no tokenizer.json"),
        (["--prompt-ids", "1", "--top-p", "0"], "--top-p"),
    ]:
        assert main(["generate", src, *argv]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and msg in err, err
