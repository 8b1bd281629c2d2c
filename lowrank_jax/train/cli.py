"""Command line: ``lowrank-jax train CONFIG [key=value ...]`` and friends.

CONFIG is a named config (``lowrank-jax configs`` lists them) or a YAML path. Any problem with the
input is one line on stderr naming the field, exit status 2, and nothing written.
"""

from __future__ import annotations

import argparse
import json
import sys

from lowrank_jax.config import ConfigError, load_config, named_configs, to_dict
from lowrank_jax.data.shards import prepare_shards
from lowrank_jax.models import formula_param_count, param_report
from lowrank_jax.sharding import maybe_initialize_distributed
from lowrank_jax.train.checkpoint import CheckpointError
from lowrank_jax.train.loop import train
from lowrank_jax.train.memory import memory_command
from lowrank_jax.train.metrics import fmt_bytes


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="lowrank-jax", description=__doc__.splitlines()[0])
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("train", help="pretrain a model (writes results.json, metrics.jsonl, loss.png, checkpoints)")
    t.add_argument("config", help="named config or YAML file")
    t.add_argument("overrides", nargs="*", help="key=value, e.g. steps=100 model.hidden=128 out_dir=runs/x")
    r = sub.add_parser(
        "prepare", help="tokenize a config's corpus once into token shards (data.shards=DIR; default: the cache)"
    )
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="key=value, e.g. data.source=files data.paths=... data.shards=DIR")
    s = sub.add_parser("params", help="parameter count and bytes of a config, computed without allocating")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    c = sub.add_parser("config", help="print the resolved config as JSON")
    c.add_argument("config")
    c.add_argument("overrides", nargs="*")
    sub.add_parser("configs", help="list the named configs")
    m = sub.add_parser(
        "memory", help="per-device memory of the compiled train step (XLA memory analysis; nothing allocated)"
    )
    m.add_argument("config")
    m.add_argument("overrides", nargs="*", help="key=value overrides; method=NAME expands to a method's overrides")
    m.add_argument("--devices", type=int, default=None, help="number of fake CPU devices (for mesh=... on one host)")
    m.add_argument(
        "--no-licm", action="store_true", help="disable XLA loop-invariant code motion (see lowrank_jax.train.memory)"
    )
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "configs":
        print("\n".join(named_configs()))
        return 0
    try:
        if args.command == "memory":
            report = memory_command(args.config, args.overrides, args.devices, args.no_licm)
            mem = {k: fmt_bytes(v) for k, v in report["xla_memory"].items()}
            print(json.dumps(report, indent=2))
            print(
                f"{args.config} on {report['devices']} device(s) {report['mesh']}: peak estimate "
                f"{mem.get('peak_estimate_bytes', '?')}/device (arguments {mem.get('argument_size_in_bytes', '?')}, "
                f"temporaries {mem.get('temp_size_in_bytes', '?')})"
            )
            return 0
        cfg = load_config(args.config, args.overrides)
        if args.command == "config":
            print(json.dumps(to_dict(cfg), indent=2))
        elif args.command == "prepare":
            try:
                directory = prepare_shards(cfg.data, log=lambda msg: print(msg, file=sys.stderr))
            except (ValueError, OSError) as e:
                raise ConfigError(str(e).splitlines()[0] if str(e) else type(e).__name__) from None
            print(directory)
        elif args.command == "params":
            model = cfg.model
            if model.vocab_size == 0:
                raise ConfigError("model.vocab_size: set it (the tokenizer decides it only when training)")
            report = param_report(model)
            print(json.dumps({**report, "formula_params": formula_param_count(model)}))
        else:
            try:
                maybe_initialize_distributed()
            except ValueError as e:
                raise ConfigError(str(e)) from None
            try:
                train(cfg)
            except CheckpointError as e:
                raise ConfigError(str(e)) from None
    except ConfigError as e:
        print(f"lowrank-jax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
