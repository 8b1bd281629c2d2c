"""The command-line verbs ``import-hf``, ``export-hf``, ``generate`` and ``eval`` (wired in lowrank_jax.train.cli).

Any bad input is one line on stderr naming the problem, exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np

from lowrank_jax.config import ConfigError
from lowrank_jax.hf.evaluate import perplexity, read_documents
from lowrank_jax.hf.generate import generate
from lowrank_jax.hf.model_dir import load_model
from lowrank_jax.hf.transfer import export_hf, import_hf

COMMANDS = ("import-hf", "export-hf", "generate", "eval")
EVAL_KEYS = {"data": str, "seq_len": int, "batch_size": int, "field": str}


def add_parsers(sub: Any) -> None:
    """Add the four verbs to the ``lowrank-jax`` subparsers."""
    i = sub.add_parser("import-hf", help="a Hugging Face LLaMA checkpoint (safetensors) -> a model directory")
    i.add_argument("source", help="directory with config.json, *.safetensors (sharded or not), tokenizer.json")
    i.add_argument("out", help="the model directory to write (must not exist or be empty)")
    e = sub.add_parser("export-hf", help="a run or model directory -> a Hugging Face checkpoint (factors merged)")
    e.add_argument("source", help="a run directory (RUN or RUN/checkpoints/STEP) or a model directory")
    e.add_argument("out", help="the directory to write (must not exist or be empty)")
    e.add_argument("--dtype", default="float32", help="float32 (default) or bfloat16")
    g = sub.add_parser("generate", help="decode text with a KV cache (a run, model or Hugging Face directory)")
    g.add_argument("source")
    prompt = g.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (encoded with the model's tokenizer.json)")
    prompt.add_argument("--prompt-ids", help="prompt as comma-separated token ids")
    g.add_argument("--max-new-tokens", type=int, default=32)
    g.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    g.add_argument("--top-p", type=float, default=1.0)
    g.add_argument("--seed", type=int, default=0)
    v = sub.add_parser("eval", help="perplexity on a local text or jsonl file")
    v.add_argument("source")
    v.add_argument("settings", nargs="+", help="data=FILE [seq_len=N batch_size=N field=text]")


def _tokenizer(path: str | None, source: str):
    if path is None:
        raise ValueError(f"{source}: no tokenizer.json (give --prompt-ids, or import a checkpoint with one)")
    import tokenizers

    return tokenizers.Tokenizer.from_file(path)


def _eos_id(tok: Any, directory: Path) -> int | None:
    cfg_path = directory / "tokenizer_config.json"
    names = []
    if cfg_path.is_file():
        eos = json.loads(cfg_path.read_text()).get("eos_token")
        names.append(eos.get("content") if isinstance(eos, dict) else eos)
    names += ["</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>"]
    ids = [tok.token_to_id(n) for n in names if isinstance(n, str)]
    return next((i for i in ids if i is not None), None)


def _generate(args: argparse.Namespace) -> None:
    model = load_model(args.source)
    tok = None
    if args.prompt is not None:
        tok = _tokenizer(model.tokenizer, args.source)
        ids = tok.encode(args.prompt).ids
    else:
        try:
            ids = [int(t) for t in args.prompt_ids.split(",") if t.strip()]
        except ValueError:
            raise ValueError(f"--prompt-ids: expected comma-separated integers, got {args.prompt_ids!r}") from None
    if any(not 0 <= t < model.cfg.vocab_size for t in ids):
        raise ValueError(f"--prompt-ids: token ids must be in [0, {model.cfg.vocab_size})")
    eos = _eos_id(tok, model.directory) if tok is not None else None
    out, timing = generate(
        model.cfg,
        model.params,
        np.asarray([ids]),
        args.max_new_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        seed=args.seed,
        eos_id=eos,
    )
    new = out[0].tolist()
    print(tok.decode(ids + new) if tok is not None else " ".join(map(str, new)))
    print(
        f"{len(new)} new tokens: {timing['tokens_per_s']:,.1f} tokens/s decoding "
        f"(prefill {len(ids)} tokens {timing['prefill_s'] * 1e3:.1f} ms)",
        file=sys.stderr,
    )


def _eval_settings(items: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {"seq_len": 0, "batch_size": 8, "field": "text"}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or key not in EVAL_KEYS:
            raise ValueError(f"{item}: expected key=value with key one of {', '.join(EVAL_KEYS)}")
        try:
            out[key] = EVAL_KEYS[key](value)
        except ValueError:
            raise ValueError(f"{key}: expected an integer, got {value!r}") from None
    if "data" not in out:
        raise ValueError("data: give the file to evaluate on (data=FILE)")
    return out


def _eval(args: argparse.Namespace) -> None:
    s = _eval_settings(args.settings)
    docs = read_documents(s["data"], s["field"])  # a bad file fails before the model is read
    model = load_model(args.source)
    tok = _tokenizer(model.tokenizer, args.source)
    eos = _eos_id(tok, model.directory)
    stream: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        stream += enc.ids + ([eos] if eos is not None else [])
    seq_len = s["seq_len"] or min(model.cfg.max_seq_len, 1024)
    result = perplexity(model.cfg, model.params, np.asarray(stream), seq_len, s["batch_size"])
    print(json.dumps({"data": s["data"], "seq_len": seq_len, **result}))
    print(f"perplexity {result['perplexity']:.3f} (loss {result['loss']:.4f}) on {result['tokens']:,} tokens")


def run(args: argparse.Namespace) -> int:
    """Run one of :data:`COMMANDS`; exit status 2 with one line on stderr for bad input."""
    try:
        if args.command == "import-hf":
            print(import_hf(args.source, args.out))
        elif args.command == "export-hf":
            print(export_hf(args.source, args.out, args.dtype))
        elif args.command == "generate":
            _generate(args)
        else:
            _eval(args)
    except (ValueError, ConfigError, OSError) as e:
        line = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"lowrank-jax: error: {args.command}: {line}", file=sys.stderr)
        return 2
    return 0
