"""Command line: ``lowrank-jax train CONFIG [key=value ...]`` and friends.

CONFIG is a named config (``lowrank-jax configs`` lists them) or a YAML path. Any problem with the
input is one line on stderr naming the field, exit status 2, and nothing written.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback
from collections.abc import Iterator

from lowrank_jax.config import ConfigError, load_config, named_configs, to_dict
from lowrank_jax.data.shards import prepare_shards
from lowrank_jax.hf import cli as hf_cli
from lowrank_jax.models import formula_param_count, param_report
from lowrank_jax.sharding import maybe_initialize_distributed
from lowrank_jax.train.checkpoint import CheckpointError
from lowrank_jax.train.launch import launch
from lowrank_jax.train.loop import train
from lowrank_jax.train.memory import memory_command
from lowrank_jax.train.metrics import fmt_bytes
from lowrank_jax.train.preemption import PREEMPTED_EXIT, Preempted


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
    e = sub.add_parser("env", help="versions, backend, devices, the run's mesh, each kernel's implementation")
    e.add_argument("config", nargs="?", default=None, help="named config or YAML file whose mesh to resolve")
    e.add_argument("overrides", nargs="*")
    e.add_argument("--json", action="store_true", help="print the report as JSON")
    hf_cli.add_parsers(sub)  # import-hf, export-hf, generate, eval
    m = sub.add_parser(
        "memory", help="per-device memory of the compiled train step (XLA memory analysis; nothing allocated)"
    )
    m.add_argument("config")
    m.add_argument("overrides", nargs="*", help="key=value overrides; method=NAME expands to a method's overrides")
    m.add_argument("--devices", type=int, default=None, help="number of fake CPU devices (for mesh=... on one host)")
    m.add_argument(
        "--no-licm", action="store_true", help="disable XLA loop-invariant code motion (see lowrank_jax.train.memory)"
    )
    la = sub.add_parser(
        "launch",
        help="run a subcommand as several JAX processes on this machine (one multi-process run over CPU devices)",
        description="Start N local processes of `lowrank-jax COMMAND ...` that form one JAX distributed run "
        "(localhost coordinator, CPU devices, gloo collectives). Process 0's output is shown as is, the others' "
        "prefixed [process i] on stderr; if one process fails the rest are killed and its exit status is returned.",
    )
    la.add_argument("--local-processes", type=int, required=True, metavar="N", help="number of processes")
    la.add_argument("--devices-per-process", type=int, default=1, metavar="K", help="CPU devices each (default 1)")
    la.add_argument("--port", type=int, default=None, help="coordinator port on 127.0.0.1 (default: a free one)")
    la.add_argument(
        "--grace", type=float, default=10.0, metavar="S", help="seconds after Ctrl-C before processes are killed"
    )
    la.add_argument("subcommand", nargs=argparse.REMAINDER, help="the lowrank-jax subcommand, e.g. train tiny steps=10")
    p.set_defaults(subcommands=sub.choices)  # the live name -> parser dict, for `launch` to check against
    return p


def _launch(args: argparse.Namespace) -> int:
    names = args.subcommands
    if not args.subcommand or args.subcommand[0] not in names or args.subcommand[0] == "launch":
        choices = ", ".join(n for n in names if n != "launch")
        print(f"lowrank-jax: error: launch: give a subcommand to run ({choices}) after the options", file=sys.stderr)
        return 2
    try:
        return launch(args.subcommand, args.local_processes, args.devices_per_process, args.port, args.grace)
    except ValueError as e:
        print(f"lowrank-jax: error: {e}", file=sys.stderr)
        return 2


@contextlib.contextmanager
def _exit_at_once_on_failure(distributed: bool) -> Iterator[None]:
    """In a multi-process run, a process that fails reports and exits at once (``os._exit``).

    A normal exit would wait in JAX's shutdown barrier for processes that are themselves waiting in
    a collective for this one, and end minutes later in an abort that hides the real status; exiting
    at once lets the launcher (or the cluster's) see the failure and stop the others.
    """
    if not distributed:
        yield
        return
    try:
        yield
        return
    except ConfigError as e:
        print(f"lowrank-jax: error: {e}", file=sys.stderr)
        status = 2
    except BaseException as e:  # every failure leaves the same way
        traceback.print_exc()
        status = 130 if isinstance(e, KeyboardInterrupt) else 1
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(status)


def _env(args: argparse.Namespace) -> int:
    from lowrank_jax.train.env_report import env_report, format_report  # lazy: the env verb only

    try:
        mesh = load_config(args.config, args.overrides).mesh if args.config else None
    except ConfigError as e:
        print(f"lowrank-jax: error: {e}", file=sys.stderr)
        return 2
    report = env_report(mesh)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command == "launch":
        return _launch(args)
    if args.command in hf_cli.COMMANDS:
        return hf_cli.run(args)
    if args.command == "configs":
        print("\n".join(named_configs()))
        return 0
    if args.command == "env":
        return _env(args)
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
                raise ConfigError.from_exception(e) from None
            print(directory)
        elif args.command == "params":
            model = cfg.model
            if model.vocab_size == 0:
                raise ConfigError("model.vocab_size: set it (the tokenizer decides it only when training)")
            report = param_report(model)
            print(json.dumps({**report, "formula_params": formula_param_count(model)}))
        else:
            try:
                distributed = maybe_initialize_distributed()
            except ValueError as e:
                raise ConfigError(str(e)) from None
            with _exit_at_once_on_failure(distributed):
                try:
                    train(cfg)
                except CheckpointError as e:
                    raise ConfigError(str(e)) from None
                except Preempted as e:  # checkpointed; `resume=true` continues exactly
                    print(f"lowrank-jax: {e}", file=sys.stderr, flush=True)
                    return PREEMPTED_EXIT
    except ConfigError as e:
        print(f"lowrank-jax: error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
