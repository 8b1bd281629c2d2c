"""CPU train-step time of lowrank-jax against PyTorch on the same model, batch and optimizer.

    pip install -e '.[bench-torch]'
    python experiments/bench_frameworks.py [--shapes tiny h256] [--steps 30] [--warmup 5] [--rounds 3]

For each shape, one LLaMA is built twice: lowrank-jax's trainer (``make_trainer``, the jitted step
every run uses: forward, backward, global-norm clipping, the optimizer) and Hugging Face's
``LlamaForCausalLM`` with the same dimensions (untied head, RMSNorm eps, rope theta, no biases),
float32, trained with ``torch.optim.AdamW`` or galore-torch's ``GaLoreAdamW`` on the same kernels
lowrank-jax's GaLore wraps (rank, gap, scale equal), after ``clip_grad_norm_``. Both see the same
random token batches. The variants run interleaved in one process, one at a time: every round runs
each variant for ``--warmup`` untimed then ``--steps`` timed steps; a variant's time is the median over
rounds of its per-round median. Ratios are lowrank-jax time / PyTorch time (below 1: lowrank-jax
faster). Writes ``results.json`` and ``table.md`` into ``--out``
(default ``experiments/results/bench_frameworks``).

Shapes: ``tiny`` is the ``tiny`` preset (hidden 128, 4 layers, 4 heads, ffn 352) with vocabulary 4096;
``h256`` is hidden 256, 4 layers, 4 heads, ffn 704. Batch 16 × 256 tokens for both.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from importlib import metadata
from pathlib import Path
from typing import Any

import jax
import numpy as np
from _report import cpu_info, markdown_table, write_results, write_table

from lowrank_jax import config as config_lib
from lowrank_jax.config import load_config
from lowrank_jax.train.metrics import git_commit
from lowrank_jax.train.step import compile_train_step, make_trainer

REPO = Path(__file__).resolve().parents[1]
SHAPES = {
    "tiny": [],
    "h256": ["model.hidden=256", "model.ffn=704", "model.heads=4", "model.layers=4"],
}
COMMON = ["model.vocab_size=4096", "batch_size=16", "seq_len=256"]
OPTIMIZERS = {"adamw": ["optim.name=adamw"], "galore": ["optim.name=galore_adamw", "galore.rank=32"]}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--optimizers", nargs="+", default=list(OPTIMIZERS), choices=list(OPTIMIZERS))
    p.add_argument(
        "--torch-attention",
        nargs="+",
        default=["sdpa", "eager"],
        choices=["sdpa", "eager"],
        help="HF attention implementations to time (sdpa: fused kernel; eager: plain matmuls + softmax)",
    )
    p.add_argument("--steps", type=int, default=30, help="timed steps per round (default 30)")
    p.add_argument("--warmup", type=int, default=5, help="untimed steps per round (default 5)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds per variant (default 3)")
    p.add_argument("--no-torch", action="store_true", help="time lowrank-jax only (no PyTorch installed)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="extra overrides for every shape")
    p.add_argument("--out", default=str(REPO / "experiments" / "results" / "bench_frameworks"))
    args = p.parse_args(argv)
    for name in ("steps", "warmup", "rounds"):
        if getattr(args, name) < (0 if name == "warmup" else 1):
            p.error(f"--{name} must be >= {0 if name == 'warmup' else 1}")
    return args


def overrides_of(shape: str, optimizer: str, extra: list[str]) -> list[str]:
    return [*COMMON, *SHAPES[shape], *OPTIMIZERS[optimizer], *extra]


class JaxRunner:
    """lowrank-jax's compiled train step on pre-placed batches."""

    def __init__(self, cfg: config_lib.Config, batches: list[np.ndarray]):
        trainer = make_trainer(cfg)
        self.step = compile_train_step(trainer)
        self.state = trainer.init_state()
        self.batches = [trainer.put_batch(b) for b in batches]
        self.loss = float("nan")

    def run(self, n: int, offset: int) -> list[float]:
        times = []
        for i in range(n):
            batch = self.batches[(offset + i) % len(self.batches)]
            t0 = time.perf_counter()
            self.state, m = self.step(self.state, batch)
            jax.block_until_ready((self.state, m))
            times.append(time.perf_counter() - t0)
        self.loss = float(m["loss"])
        return times


class TorchRunner:
    """HF ``LlamaForCausalLM`` with torch AdamW / galore-torch GaLoreAdamW, same dims and hyperparameters."""

    def __init__(self, cfg: config_lib.Config, batches: list[np.ndarray], attention: str):
        import torch  # lazy: the optional bench-torch extra
        import transformers  # lazy: the optional bench-torch extra

        self.torch = torch
        m, o = cfg.model, cfg.optim
        torch.manual_seed(cfg.seed)
        hf_cfg = transformers.LlamaConfig(
            vocab_size=m.vocab_size,
            hidden_size=m.hidden,
            intermediate_size=m.ffn,
            num_hidden_layers=m.layers,
            num_attention_heads=m.heads,
            num_key_value_heads=m.heads,
            max_position_embeddings=m.max_seq_len,
            rms_norm_eps=m.norm_eps,
            rope_theta=m.rope_theta,
            initializer_range=m.init_std,
            tie_word_embeddings=False,
            attention_bias=False,
            mlp_bias=False,
            attn_implementation=attention,
        )
        self.model = transformers.LlamaForCausalLM(hf_cfg).float().train()
        if cfg.optim.name == "adamw":
            self.opt = torch.optim.AdamW(
                self.model.parameters(), lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
            )
        else:
            import galore_torch  # lazy: the optional bench-torch extra

            lowrank = [p for n, p in self.model.named_parameters() if ".layers." in n and p.ndim == 2]
            ids = {id(p) for p in lowrank}
            rest = [p for p in self.model.parameters() if id(p) not in ids]
            g = cfg.galore
            groups = [
                {"params": rest},
                {
                    "params": lowrank,
                    "rank": g.rank,
                    "update_proj_gap": g.update_proj_gap,
                    "scale": g.scale,
                    "proj_type": g.proj_type,
                },
            ]
            self.opt = galore_torch.GaLoreAdamW(
                groups, lr=o.lr, betas=(o.b1, o.b2), eps=o.eps, weight_decay=o.weight_decay
            )
        self.clip = o.grad_clip
        self.batches = [torch.from_numpy(b.astype(np.int64)) for b in batches]
        self.loss = float("nan")

    def _step(self, tokens: Any) -> Any:
        torch = self.torch
        self.opt.zero_grad(set_to_none=True)
        logits = self.model(input_ids=tokens[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), tokens[:, 1:].reshape(-1))
        loss.backward()
        if self.clip:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.opt.step()
        return loss

    def run(self, n: int, offset: int) -> list[float]:
        times = []
        for i in range(n):
            batch = self.batches[(offset + i) % len(self.batches)]
            t0 = time.perf_counter()
            loss = self._step(batch)
            self.loss = loss.item()  # synchronises (eager CPU already is)
            times.append(time.perf_counter() - t0)
        return times


def versions(with_torch: bool) -> dict[str, str]:
    out = {"jax": jax.__version__, "python": platform.python_version()}
    if with_torch:
        import torch  # lazy: the optional bench-torch extra

        out |= {name: metadata.version(name) for name in ("torch", "transformers", "galore-torch")}
        out["torch_threads"] = str(torch.get_num_threads())
    return out


def bench(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Every (shape, optimizer, framework) variant timed in interleaved rounds; one row each."""
    rows = []
    for shape in args.shapes:
        for optimizer in args.optimizers:
            overrides = overrides_of(shape, optimizer, args.set)
            cfg = load_config("tiny", overrides)
            rng = np.random.default_rng(cfg.seed)
            dims = (cfg.batch_size, cfg.seq_len + 1)
            batches = [rng.integers(0, cfg.model.vocab_size, dims) for _ in range(args.warmup + args.steps)]
            runners = {"lowrank-jax": JaxRunner(cfg, batches)}
            if not args.no_torch:
                for attention in args.torch_attention:
                    runners[f"pytorch eager ({attention} attention)"] = TorchRunner(cfg, batches, attention)
            medians: dict[str, list[float]] = {name: [] for name in runners}
            for r in range(args.rounds):
                for name, runner in runners.items():
                    runner.run(args.warmup, 0)
                    times = runner.run(args.steps, args.warmup)
                    medians[name].append(statistics.median(times))
                    print(f"{shape} {optimizer} round {r + 1}: {name}: {1e3 * medians[name][-1]:.1f} ms", flush=True)
            jax_s = statistics.median(medians["lowrank-jax"])
            for name, runner in runners.items():
                s = statistics.median(medians[name])
                rows.append(
                    {
                        "shape": shape,
                        "optimizer": optimizer,
                        "framework": name,
                        "step_ms": 1e3 * s,
                        "round_medians_ms": [1e3 * x for x in medians[name]],
                        "tokens_per_s": cfg.batch_size * cfg.seq_len / s,
                        "jax_over_this": jax_s / s,
                        "last_loss": runner.loss,
                        "config_overrides": overrides,
                    }
                )
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    return markdown_table(
        "shape | optimizer | framework | median ms / step | tokens / s | lowrank-jax time ÷ this",
        [
            (
                r["shape"],
                r["optimizer"],
                r["framework"],
                f"{r['step_ms']:.0f}",
                f"{r['tokens_per_s']:,.0f}",
                f"{r['jax_over_this']:.2f}",
            )
            for r in rows
        ],
    )


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    rows = bench(args)
    info = {
        "cpu": cpu_info()[0],
        "cpu_count": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
        "versions": versions(not args.no_torch),
    }
    caption = ", ".join(f"{k} {v}" for k, v in info["versions"].items() if k != "python")
    md = f"lowrank-jax {git_commit()[:7]}, {caption}; {info['cpu']}, {info['cpu_count']} cores.\n\n{table(rows)}"
    print(md)
    out = Path(args.out)
    protocol = {"steps": args.steps, "warmup": args.warmup, "rounds": args.rounds, "batch": "16 x 256 tokens"}
    write_results(out, {"benchmark": "bench_frameworks", "protocol": protocol, **info, "rows": rows})
    write_table(out, md)
    print(f"wrote {out / 'results.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
