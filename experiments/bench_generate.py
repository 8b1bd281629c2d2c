"""Decode speed of ``lowrank-jax generate`` against transformers' ``generate`` on the same model (CPU).

    python experiments/bench_generate.py [--shape small|smollm2_135m] [--prompt 32] [--new 64] [--repeats 3]
                                         [--out DIR]

A random LLaMA checkpoint of the chosen shape is written by transformers (float32), imported, and both
sides decode greedily from the same prompt: this project's jitted KV-cache decoder
(:func:`lowrank_jax.hf.generate.generate`, compile excluded) and ``LlamaForCausalLM.generate`` (eager
PyTorch with its dynamic KV cache, ``torch.no_grad``, the same thread count). Time per new token is the
median over ``--repeats`` generations of the decode phase (prefill excluded on both sides: for
transformers the time of a 1-token generation is subtracted). The tokens are checked equal. Prints the
ratio ours/transformers (the goal is ≤ 1.0) and writes ``results.json`` and ``generate_speed.png``
into ``--out`` (default ``experiments/results/bench_generate``).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import transformers
from _report import save_figure, subplots, write_results

from lowrank_jax.hf import import_hf, load_model
from lowrank_jax.hf.generate import generate

SHAPES = {
    "small": dict(
        vocab_size=8192, hidden_size=512, intermediate_size=1376, num_attention_heads=8, num_key_value_heads=4,
        num_hidden_layers=8,
    ),
    "smollm2_135m": dict(
        vocab_size=49152, hidden_size=576, intermediate_size=1536, num_attention_heads=9, num_key_value_heads=3,
        num_hidden_layers=30, tie_word_embeddings=True, rope_theta=100000.0,
    ),
}  # fmt: skip


def hf_decode_seconds(model, prompt: torch.Tensor, new: int) -> tuple[float, np.ndarray]:
    kw = dict(do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))
    with torch.no_grad():
        t0 = time.perf_counter()
        model.generate(prompt, max_new_tokens=1, min_new_tokens=1, **kw)
        t1 = time.perf_counter()
        out = model.generate(prompt, max_new_tokens=new, min_new_tokens=new, **kw)
        t2 = time.perf_counter()
    return (t2 - t1) - (t1 - t0), out[:, prompt.shape[1] :].numpy()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="small")
    p.add_argument("--prompt", type=int, default=32)
    p.add_argument("--new", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default="experiments/results/bench_generate")
    args = p.parse_args()

    torch.manual_seed(0)
    hf_cfg = transformers.LlamaConfig(max_position_embeddings=args.prompt + args.new, **SHAPES[args.shape])
    hf_model = transformers.LlamaForCausalLM(hf_cfg).eval()
    with tempfile.TemporaryDirectory() as tmp:
        hf_model.save_pretrained(Path(tmp) / "hf")
        import_hf(Path(tmp) / "hf", Path(tmp) / "ours")
        model = load_model(Path(tmp) / "ours")
    prompt = np.random.default_rng(0).integers(0, hf_cfg.vocab_size, (1, args.prompt))

    ours, theirs, same = [], [], True
    for _ in range(args.repeats):
        out, timing = generate(model.cfg, model.params, prompt, args.new)
        ours.append(timing["decode_s"] / args.new)
        seconds, ref = hf_decode_seconds(hf_model, torch.tensor(prompt), args.new)
        theirs.append(seconds / (args.new - 1))
        same &= bool(np.array_equal(out, ref))
    ours_s, theirs_s = statistics.median(ours), statistics.median(theirs)
    ratio = ours_s / theirs_s
    print(
        f"{args.shape}: lowrank-jax {ours_s * 1e3:.2f} ms/token ({1 / ours_s:,.0f} tokens/s), transformers "
        f"{theirs_s * 1e3:.2f} ms/token ({1 / theirs_s:,.0f} tokens/s), ratio {ratio:.2f}x (goal <= 1.0), "
        f"greedy tokens equal: {same}; torch threads {torch.get_num_threads()}"
    )
    results = {
        "shape": args.shape,
        "prompt_tokens": args.prompt,
        "new_tokens": args.new,
        "repeats": args.repeats,
        "ours_s_per_token": ours_s,
        "transformers_s_per_token": theirs_s,
        "ratio": ratio,
        "greedy_equal": same,
        "torch_version": torch.__version__,
        "transformers_version": transformers.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    write_results(args.out, results)
    fig, ax = subplots(figsize=(5, 3))
    ax.bar(["lowrank-jax", "transformers"], [ours_s * 1e3, theirs_s * 1e3], color=["C0", "C1"])
    ax.set_ylabel("ms per new token (CPU)")
    ax.set_title(f"greedy decode, {args.shape}, ratio {ratio:.2f}x")
    save_figure(fig, Path(args.out) / "generate_speed.png", [ax], grid=True)


if __name__ == "__main__":
    main()
