"""The comparison harness: every method's learning-rate grid, best of grid, the winner at 4x tokens with 3 seeds.

    python experiments/sweep.py all                 # every recipe: run what is missing or stale, write the table
    python experiments/sweep.py adamw galore        # some recipes
    python experiments/sweep.py all --stage short   # only the grids
    python experiments/sweep.py all --table-only    # the table from the runs on record, nothing trained

The protocol (``experiments/recipes/protocol.yaml``) is the same for every method: the preset, data, tokens
per step, schedule shape, eps, clipping, weight decay, the evaluation, the grid seed and the long-budget seeds,
and the learning rate of the groups every method trains with plain Adam (embeddings, lm_head, norms). A recipe
(``experiments/recipes/NAME.yaml``) adds only the method's own settings and its grid of exactly
``grid_size`` log-spaced learning rates for the method's parameters (``optim.lr``: the block kernels or the
method's factors; when the best is at an edge of the grid, the grid grows by one log-step on that side, up to
three times, the same rule for every method), or ``lr_from: OTHER`` (run at OTHER's chosen lr, e.g. 8-bit
GaLore at GaLore's) or ``lrs: []`` (a control without a learning rate to tune). The short stage runs the grid
at ``short_steps``; the grid point with the lowest final validation loss is re-run at ``long_steps`` (>= 4x
the tokens) with each of ``seeds``; step-valued settings listed in a recipe's ``scale_with_steps`` scale with
the budget.

Every run is one in-process ``lowrank_jax.train.loop.train`` (one at a time: two CPU cores). A finished run
is filed into its recipe's pack of records, ``experiments/results/sweep/runs/NAME.json.xz``
(``experiments/records.py``: its ``results.json``, its ``metrics.jsonl`` records, and the commit it ran at,
the config it asked for and the equivalent ``lowrank-jax train`` command); a run killed before it finished
is not in the pack and is redone. Runs start only from a clean checkout of the packages, the harness, the
recipe and the protocol (``--allow-dirty`` records them as dirty, for testing the harness).

A run on record is valid while the library still computes what it computed for it, judged by evidence
(``experiments/canary.py``): each recipe keeps a canary in ``experiments/results/sweep/canaries.json``, the
first ``canary_steps`` training losses of the seed-0 run at its chosen lr of the recipe's first stage (the
grid's; for ``lr_from`` recipes, which have no grid, the first long run), with the commit and a fingerprint
of the machine they came from. When the sweep trains that run, the canary is recorded from it.

    python experiments/sweep.py --check             # re-run every canary with the library as it is
    python experiments/sweep.py --check galore lora # some recipes
    python experiments/sweep.py all --record-canaries  # record the canaries with this library (runs on record)

``--check`` trains each canary's steps in this process (the shards loaded once) and compares: on the
machine it was recorded on the losses must be equal bit for bit, on another machine within
``canary.TOLERANCE``. The verdict (commit, machine, max abs diff, first differing step) goes into
``canaries.json``, the table is regenerated, and the exit status is 1 if any canary differs. A run is stale
when its recipe's canary failed its last check, or when its recorded config differs from the one the
harness builds now; a stale or missing run is (re-)run.

The table (``experiments/results/sweep/table.md``, README ``<!-- table:sweep -->``) has one row per recipe:
grid, chosen lr, short-budget ppl, long-budget ppl mean ± std over the seeds, trainable parameters,
optimizer-state bytes, the ratio to the baseline recipe's long-budget ppl, and the largest block-output RMS
over the embedding RMS seen at any evaluation (of the long runs; of the chosen grid point until they exist:
a blow-up shows here). A stale row says so; a row still waiting for runs counts them.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import io
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import canary as canary_lib
import records
import yaml
from _report import markdown_table, write_record, write_table
from make_tables import main as make_tables

from lowrank_jax.config import ConfigError, load_config, to_dict
from lowrank_jax.train.loop import train
from lowrank_jax.train.metrics import git_commit, read_metrics

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPES = HERE / "recipes"
RESULTS = HERE / "results" / "sweep"
CANARIES = "canaries.json"
# what a run executes besides its recipe and the protocol (a run starts only from a clean checkout of these)
SOURCES = ("lowrank_jax", "pallas_kernels", "experiments/sweep.py", "experiments/canary.py", "experiments/records.py")
STAGES = ("short", "long")
MAX_EXTENSIONS = 3  # grid points the edge rule may add on each side of a recipe's grid


@dataclass(frozen=True)
class Protocol:
    preset: str
    grid_size: int
    short_steps: int
    long_steps: int
    grid_seed: int
    seeds: tuple[int, ...]
    baseline: str
    canary_steps: int
    overrides: dict[str, Any]
    path: Path


@dataclass(frozen=True)
class Recipe:
    name: str
    description: str
    overrides: tuple[tuple[str, Any], ...]  # (key, value) pairs, in order
    lrs: tuple[float, ...]
    lr_from: str | None
    scale_with_steps: tuple[str, ...]
    path: Path


@dataclass(frozen=True)
class Run:
    """One training run of the sweep: a recipe at one stage, learning rate and seed."""

    recipe: Recipe
    stage: str
    lr: float | None
    seed: int

    @property
    def name(self) -> str:
        return f"{'lr' + format(self.lr, 'g') if self.lr is not None else 'fixed'}_seed{self.seed}"

    @property
    def key(self) -> str:
        """The run's name in its recipe's pack of records: ``STAGE/RUN``."""
        return f"{self.stage}/{self.name}"

    def out_dir(self, runs: Path) -> Path:
        """Where the training run itself writes (checkpoints included; not kept in git)."""
        return runs / self.recipe.name / self.stage / self.name


def _read_yaml(path: Path) -> dict[str, Any]:
    try:
        data = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"{path}: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: expected a mapping")
    return data


def _expect(data: dict[str, Any], path: Path, keys: set[str], required: set[str]) -> None:
    unknown, missing = set(data) - keys, required - set(data)
    if unknown or missing:
        raise ConfigError(f"{path}: unknown keys {sorted(unknown)}, missing keys {sorted(missing)}")


def load_protocol(path: Path) -> Protocol:
    d = _read_yaml(path)
    keys = {"preset", "grid_size", "short_steps", "long_steps", "grid_seed", "seeds", "baseline", "overrides"}
    keys |= {"canary_steps"}
    _expect(d, path, keys, keys)
    p = Protocol(**{**d, "seeds": tuple(d["seeds"]), "overrides": dict(d["overrides"] or {}), "path": path})
    if p.grid_size < 1 or p.short_steps < 1 or p.long_steps < p.short_steps or not p.seeds:
        raise ConfigError(f"{path}: needs grid_size >= 1, long_steps >= short_steps >= 1 and at least one seed")
    if not 1 <= p.canary_steps <= p.short_steps:
        raise ConfigError(f"{path}: needs 1 <= canary_steps <= short_steps")
    return p


def load_recipe(path: Path, protocol: Protocol) -> Recipe:
    d = _read_yaml(path)
    keys = {"description", "overrides", "lrs", "lr_from", "scale_with_steps"}
    _expect(d, path, keys, {"description", "overrides"})
    lrs = tuple(float(x) for x in d.get("lrs") or ())
    r = Recipe(
        name=path.stem,
        description=d["description"],
        overrides=tuple((d["overrides"] or {}).items()),
        lrs=lrs,
        lr_from=d.get("lr_from"),
        scale_with_steps=tuple(d.get("scale_with_steps") or ()),
        path=path,
    )
    if r.lrs and r.lr_from:
        raise ConfigError(f"{path}: lrs and lr_from exclude each other")
    if "optim.lr" in dict(r.overrides) and (r.lrs or r.lr_from):
        raise ConfigError(f"{path}: optim.lr comes from the grid (lrs / lr_from), not from overrides")
    if r.lrs:
        if len(r.lrs) != protocol.grid_size:
            raise ConfigError(f"{path}: lrs has {len(r.lrs)} values, the protocol's grid_size is {protocol.grid_size}")
        steps = [math.log(b / a) for a, b in zip(r.lrs, r.lrs[1:], strict=False)]
        if any(s <= 0 for s in steps) or (steps and max(steps) - min(steps) > 1e-6 * max(steps)):
            raise ConfigError(f"{path}: lrs must be increasing and log-spaced, got {list(r.lrs)}")
    for key in r.scale_with_steps:
        if not isinstance(dict(r.overrides).get(key), int):
            raise ConfigError(f"{path}: scale_with_steps names {key!r}, which is not an integer override")
    return r


def recipe_names(recipes: Path = RECIPES) -> list[str]:
    return sorted(p.stem for p in recipes.glob("*.yaml") if p.stem != "protocol")


def run_overrides(run: Run, protocol: Protocol, extra: list[str]) -> list[str]:
    """The ``key=value`` overrides of ``run`` on top of the protocol's preset (the protocol's, the recipe's,
    the stage's steps and seed, the learning rate, then ``extra``)."""
    steps = protocol.short_steps if run.stage == "short" else protocol.long_steps
    factor = steps // protocol.short_steps
    recipe = {k: v * factor if k in run.recipe.scale_with_steps else v for k, v in run.recipe.overrides}
    items = {**protocol.overrides, **recipe, "steps": steps, "seed": run.seed}
    if run.lr is not None:
        items["optim.lr"] = run.lr
    fmt = lambda v: "null" if v is None else str(v).lower() if isinstance(v, bool) else str(v)
    return [f"{k}={fmt(v)}" for k, v in items.items()] + list(extra)


def _dirty(paths: list[str]) -> bool:
    out = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=ROOT, capture_output=True, text=True)
    return bool(out.stdout.strip())


def sources(recipe: Recipe, protocol: Protocol) -> list[str]:
    """What a run executes and reads: the packages, the harness, its recipe and the protocol."""
    return [*SOURCES, str(recipe.path), str(protocol.path)]


# config fields that say where and how a run reports, not what it computes
_NOT_COMPARED = ("out_dir", "progress")


def run_status(
    run: Run, protocol: Protocol, extra: list[str], results: Path, canaries: dict[str, Any] | None = None
) -> tuple[str, dict | None]:
    """``('done' | 'missing' | 'stale: why', results)`` of a run on record.

    A run on record is stale when its recorded config is not the one the harness builds now, or when its
    recipe's canary (``canaries[recipe]``) failed its last check.
    """
    rec = records.run_record(results, run.recipe.name, run.key)
    if rec is None:
        return "missing", None
    res = rec["results"]
    if rec["meta"].get("config") != _requested(run, protocol, extra):
        return "stale: its config differs from the recipe's", res
    why = canary_failure((canaries or {}).get(run.recipe.name))
    if why:
        return f"stale: {why}", res
    return "done", res


def canary_failure(entry: dict[str, Any] | None) -> str | None:
    """Why a recipe's canary condemns its runs (its last check failed), or None."""
    check = (entry or {}).get("check")
    if not check or check["verdict"] != "differs":
        return None
    return f"canary differs from step {check['first_differing_step']} at {check['commit'][:8]}"


def _requested(run: Run, protocol: Protocol, extra: list[str]) -> dict[str, Any]:
    """The config the harness asks for (as JSON reads it back), before training fills in e.g. the vocab size."""
    config = to_dict(load_config(protocol.preset, run_overrides(run, protocol, extra)))
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in _NOT_COMPARED}))


@contextlib.contextmanager
def held(lock: Path | None) -> Iterator[None]:
    """An exclusive ``flock`` on ``lock`` for the duration (nothing if None): other heavy jobs wait between runs."""
    if lock is None:
        yield
        return
    with open(lock, "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def execute(
    run: Run, protocol: Protocol, extra: list[str], results: Path, runs: Path, allow_dirty: bool, lock: Path | None
) -> dict:
    """Train ``run`` (holding ``lock``, if given) and file its record into its recipe's pack; returns its results."""
    watched = sources(run.recipe, protocol)
    dirty = _dirty(watched)
    if dirty and not allow_dirty:
        raise ConfigError(f"uncommitted changes in {' '.join(watched)}: commit them first (or --allow-dirty)")
    out = run.out_dir(runs)
    shutil.rmtree(out, ignore_errors=True)  # a stale or killed run's checkpoints: it is redone from the start
    overrides = [*run_overrides(run, protocol, extra), f"out_dir={out}", "progress=false"]
    with held(lock):
        res = train(load_config(protocol.preset, overrides))
    meta = {
        "command": "lowrank-jax train " + " ".join([protocol.preset, *overrides]),
        "dirty": dirty,
        "commit": git_commit(),
        "config": _requested(run, protocol, extra),
    }
    # JSON's view of the results (as a record reads back), filed only once the run has finished
    res = json.loads(json.dumps(res))
    record = {"results": res, "metrics": read_metrics(out / "metrics.jsonl"), "meta": meta}
    records.put_run(results, run.recipe.name, run.key, record)
    return res


def _loss(res: dict | None) -> float:
    v = (res or {}).get("final_val_loss", float("nan"))
    return v if math.isfinite(v) else math.inf


class Sweep:
    """The runs of some recipes, executed in order (grid, then winners), skipping what is valid on record."""

    def __init__(
        self,
        protocol: Protocol,
        recipes: dict[str, Recipe],
        extra: list[str],
        results: Path,
        runs: Path,
        lock: Path | None = None,  # --lock: a file flock-ed while each run trains
    ) -> None:
        self.protocol, self.recipes, self.extra, self.results, self.runs = protocol, recipes, extra, results, runs
        self.lock = lock
        self.done: dict[Run, dict] = {}
        self.stale: dict[Run, str] = {}
        self.trained: set[Run] = set()
        self.canaries: dict[str, Any] = read_canaries(results)

    def grid(self, r: Recipe) -> list[Run]:
        """The recipe's grid, extended by the edge rule as far as the runs on record call for.

        The same rule for every method: while the best finished grid point is the lowest (highest) learning rate,
        one more log-step below (above) it joins the grid, at most :data:`MAX_EXTENSIONS` per side.
        """
        lrs = r.lrs if r.lrs else (None,) if not r.lr_from else ()
        runs = [Run(r, "short", lr, self.protocol.grid_seed) for lr in lrs]
        if len(r.lrs) < 2:
            return runs
        step, added = r.lrs[1] / r.lrs[0], {"low": 0, "high": 0}
        while all(run in self.done for run in runs):
            best = min(runs, key=lambda run: _loss(self.done[run]))
            side = "low" if best is runs[0] else "high" if best is runs[-1] else None
            if side is None or added[side] == MAX_EXTENSIONS:
                break
            added[side] += 1
            lr = float(f"{(runs[0].lr / step if side == 'low' else runs[-1].lr * step):.6g}")
            new = Run(r, "short", lr, self.protocol.grid_seed)
            runs = [new, *runs] if side == "low" else [*runs, new]
        return runs

    def chosen_lr(self, r: Recipe) -> float | None:
        """The grid point with the lowest short-budget validation loss (``lr_from``: the other recipe's)."""
        if r.lr_from:
            return self.chosen_lr(self.recipes[r.lr_from])
        runs = self.grid(r)
        if not all(run in self.done for run in runs):
            raise LookupError(f"{r.name}: grid incomplete")
        return min(runs, key=lambda run: _loss(self.done[run])).lr

    def long(self, r: Recipe) -> list[Run]:
        lr = self.chosen_lr(r)
        return [Run(r, "long", lr, s) for s in self.protocol.seeds]

    def canary_run(self, r: Recipe) -> Run:
        """The run a recipe's canary stands for: the first seed's run at the chosen lr of the recipe's first
        stage (the grid's; ``lr_from`` recipes have no grid: their first long run)."""
        if r.lr_from:
            return self.long(r)[0]
        return Run(r, "short", self.chosen_lr(r), self.protocol.grid_seed)

    def record_canaries(self, names: list[str]) -> None:
        """Re-record the canary of every recipe whose canary run trained in this process, from its metrics."""
        for name in names:
            try:
                run = self.canary_run(self.recipes[name])
            except LookupError:
                continue
            if run not in self.trained:
                continue
            rec = records.run_record(self.results, name, run.key)
            try:
                losses = canary_losses(rec["metrics"], self.protocol.canary_steps)
            except ValueError as e:
                print(f"{name}: no canary from {run.key}: {e} (record one with --record-canaries)", flush=True)
                continue
            commit = rec["results"].get("git_commit", "unknown")
            self.canaries[name] = canary_entry(run, losses, commit, canary_lib.fingerprint())
            write_canaries(self.results, self.canaries)
            print(f"{name}: canary recorded from {run.key} ({len(losses)} steps)", flush=True)

    def visit(self, run: Run, *, train_it: bool, allow_dirty: bool, counter: list[int]) -> None:
        if run in self.done:
            return
        status, res = run_status(run, self.protocol, self.extra, self.results, self.canaries)
        counter[0] += 1
        head = f"[{counter[0]}] {run.recipe.name} {run.stage} {run.name}"
        if status == "done":
            self.done[run] = res
            print(f"{head}: on record ({res['git_commit'][:8]}), val_loss {res['final_val_loss']:.4f}", flush=True)
            return
        if not train_it:
            self.stale[run] = status
            print(f"{head}: {status}", flush=True)
            return
        t0 = time.time()
        print(f"{head}: {status}, training ...", flush=True)
        res = execute(run, self.protocol, self.extra, self.results, self.runs, allow_dirty, self.lock)
        self.done[run] = res
        self.trained.add(run)
        print(f"{head}: val_loss {res['final_val_loss']:.4f} in {time.time() - t0:.0f}s", flush=True)

    def run(self, names: list[str], stages: tuple[str, ...], *, train_it: bool, allow_dirty: bool) -> None:
        counter = [0]
        order = sorted(names, key=lambda n: self.recipes[n].lr_from is not None)  # lr_from after its source
        for stage in STAGES:
            for name in order:
                r = self.recipes[name]
                source = self.recipes[r.lr_from] if r.lr_from else r
                while True:  # a lr_from recipe needs its source's grid; the edge rule may add points as runs finish
                    grid = self.grid(source)
                    todo = [run for run in grid if run not in self.done and run not in self.stale]
                    if not todo:
                        break
                    grid_train = train_it and "short" in stages
                    for run in todo:
                        self.visit(run, train_it=grid_train, allow_dirty=allow_dirty, counter=counter)
                if stage == "long" and "long" in stages:
                    if not all(run in self.done for run in grid):
                        print(f"{name}: grid incomplete, no long-budget runs", flush=True)
                        continue
                    for run in self.long(r):
                        self.visit(run, train_it=train_it, allow_dirty=allow_dirty, counter=counter)
        self.record_canaries(names)


def _max_rms_ratio(run: Run, results: Path) -> float:
    rec = records.run_record(results, run.recipe.name, run.key)
    vals = [m["max_block_rms_ratio"] for m in (rec or {}).get("metrics", []) if "max_block_rms_ratio" in m]
    return max(vals) if vals else math.nan


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def table(sweep: Sweep, names: list[str]) -> tuple[str, dict[str, Any]]:
    """The markdown table and its records (one per recipe)."""
    rows, recs = [], {}
    base_long: list[float] = []
    baseline = sweep.recipes.get(sweep.protocol.baseline)
    if baseline is not None:
        try:
            base_long = [_ppl(_loss(sweep.done[run])) for run in sweep.long(baseline) if run in sweep.done]
        except LookupError:
            base_long = []
    base = statistics.mean(base_long) if len(base_long) == len(sweep.protocol.seeds) else None
    for name in names:
        r = sweep.recipes[name]
        grid = sweep.grid(r)  # empty for lr_from: its chosen lr is the source's
        rec: dict[str, Any] = {"description": r.description, "grid": [run.lr for run in grid if run.lr]}
        try:
            lr = sweep.chosen_lr(r)
            longs = sweep.long(r)
        except LookupError:
            lr, longs = None, []
        chosen = next((run for run in grid if run.lr == lr), None)
        short = sweep.done.get(chosen) if chosen else None
        long_ppl = [_ppl(_loss(sweep.done[run])) for run in longs if run in sweep.done]
        complete = bool(longs) and len(long_ppl) == len(longs)
        mine = {run: why for run, why in sweep.stale.items() if run.recipe.name in (name, r.lr_from)}
        stale = sorted({why.removeprefix("stale: ") for why in mine.values() if why != "missing"})
        pending = sum(why == "missing" for why in mine.values())
        waiting = [f"{pending} runs pending"] if pending else []
        ref = sweep.done.get(longs[0]) if complete else short
        # the long runs' health once they exist, else the chosen grid point's
        rms_runs = [run for run in longs if run in sweep.done] or ([chosen] if short else [])
        rms = max((_max_rms_ratio(run, sweep.results) for run in rms_runs), default=math.nan)
        commits = sorted({sweep.done[run]["git_commit"][:8] for run in [*grid, *longs] if run in sweep.done})
        rec.update(
            chosen_lr=lr,
            short_ppl=_ppl(_loss(short)) if short else None,
            long_ppl=long_ppl,
            trainable_params=ref["trainable_params"] if ref else None,
            optimizer_state_bytes=ref["optimizer_state_bytes"] if ref else None,
            max_block_rms_ratio=rms,
            commits=commits,
            stale=stale,
            pending_runs=pending,
        )
        recs[name] = rec
        mean = statistics.mean(long_ppl) if complete else None
        std = statistics.stdev(long_ppl) if complete and len(long_ppl) > 1 else 0.0
        grid_txt = f"from {r.lr_from}" if r.lr_from else ", ".join(f"{x:g}" for x in rec["grid"]) or "-"
        rows.append(
            [
                name,
                grid_txt,
                f"{lr:g}" if lr else "-",
                f"{rec['short_ppl']:.2f}" if short else "-",
                f"{mean:.2f} ± {std:.2f}" if mean else "-",
                f"{rec['trainable_params'] / 1e6:.2f}M" if ref else "-",
                f"{rec['optimizer_state_bytes'] / 2**20:.2f} MiB" if ref else "-",
                f"{mean / base:.3f}" if mean and base else "-",
                f"{rms:.1f}" if math.isfinite(rms) else "-",
                f"STALE: {'; '.join(stale)}" if stale else ", ".join(commits + waiting),
            ]
        )
    header = "recipe | lr grid | chosen lr | short ppl | long ppl (mean ± std) | trainable | opt state"
    header += f" | ÷ {sweep.protocol.baseline} | max block RMS ÷ embed RMS | commit"
    return markdown_table(header, rows), recs


def protocol_text(p: Protocol) -> str:
    shared = ", ".join(f"`{k}={v}`" for k, v in p.overrides.items())
    where = p.path.relative_to(ROOT) if p.path.is_relative_to(ROOT) else p.path
    return (
        f"Protocol ({where}): preset `{p.preset}`, {shared}. Each method: a grid of "
        f"{p.grid_size} log-spaced learning rates at {p.short_steps} steps (seed {p.grid_seed}); the best on "
        f"validation loss re-run at {p.long_steps} steps with seeds {', '.join(map(str, p.seeds))}. "
        f"Ratios divide by `{p.baseline}`'s long-budget mean ppl."
    )


def read_canaries(results: Path) -> dict[str, Any]:
    p = results / CANARIES
    return json.loads(p.read_text()) if p.is_file() else {}


def write_canaries(results: Path, canaries: dict[str, Any]) -> None:
    write_record(results / CANARIES, canaries)


def canary_losses(metrics: list[dict[str, Any]], steps: int) -> list[float]:
    """The training losses of steps 1..``steps`` in a run's metrics records."""
    by_step = {m["step"]: m["loss"] for m in metrics if "loss" in m}
    missing = [s for s in range(1, steps + 1) if s not in by_step]
    if missing:
        raise ValueError(f"the run's metrics have no training loss at steps {missing[:5]}")
    return [by_step[s] for s in range(1, steps + 1)]


def canary_entry(run: Run, losses: list[float], commit: str, machine: dict[str, Any]) -> dict[str, Any]:
    """A recipe's canary: the run it stands for, its first losses, and the commit and machine they came from."""
    return {
        "run": run.key,
        "stage": run.stage,
        "lr": run.lr,
        "seed": run.seed,
        "steps": len(losses),
        "losses": losses,
        "commit": commit,
        "machine": machine,
    }


def _canary_config(run: Run, sweep: Sweep):
    overrides = [*run_overrides(run, sweep.protocol, sweep.extra), f"out_dir={run.out_dir(sweep.runs)}"]
    return load_config(sweep.protocol.preset, [*overrides, "progress=false"])


def record_with_runner(sweep: Sweep, names: list[str]) -> int:
    """``--record-canaries``: train each recipe's canary steps with the library of this process, record them,
    and compare them with the first losses of the packed run they stand for (bitwise, or within the tolerance
    between machines). Returns how many recipes have no canary or one that differs from its run."""
    runner, bad = canary_lib.Runner(), 0
    machine, commit = canary_lib.fingerprint(), git_commit()
    print(f"recording canaries at {commit[:8]} on {canary_lib.describe(machine)}", flush=True)
    for name in names:
        try:
            run = sweep.canary_run(sweep.recipes[name])
        except LookupError as e:
            print(f"{name}: no canary ({e})", flush=True)
            bad += 1
            continue
        t0 = time.time()
        with held(sweep.lock):
            losses = runner.losses(_canary_config(run, sweep), sweep.protocol.canary_steps)
        sweep.canaries[name] = canary_entry(run, losses, commit, machine)
        write_canaries(sweep.results, sweep.canaries)
        rec = records.run_record(sweep.results, name, run.key)
        if rec is None:
            print(f"{name}: recorded from {run.key} in {time.time() - t0:.1f}s; the run is not on record", flush=True)
            bad += 1
            continue
        # the run may have trained on another machine: bitwise, or within the tolerance between machines
        v = canary_lib.compare(canary_losses(rec["metrics"], len(losses)), losses, same_machine=False)
        print(f"{name}: recorded from {run.key} in {time.time() - t0:.1f}s; against the run: {v.kind}", flush=True)
        bad += not v.passed
    return bad


def check(sweep: Sweep, names: list[str]) -> int:
    """``--check``: re-run each recipe's canary with the library of this process and record the verdict.

    Returns how many recipes failed: a canary that differs, or runs on record without a canary.
    """
    runner, bad = canary_lib.Runner(), 0
    machine, commit = canary_lib.fingerprint(), git_commit()
    dirty = _dirty(list(SOURCES))
    print(f"checking canaries at {commit[:8]}{' (dirty)' if dirty else ''} on {canary_lib.describe(machine)}")
    for name in names:
        entry = sweep.canaries.get(name)
        if entry is None:
            if records.runs(sweep.results, name):
                print(f"{name}: runs on record but no canary (record one with --record-canaries)", flush=True)
                bad += 1
            continue
        t0 = time.time()
        run = Run(sweep.recipes[name], entry["stage"], entry["lr"], entry["seed"])
        with held(sweep.lock):
            losses = runner.losses(_canary_config(run, sweep), entry["steps"])
        v = canary_lib.compare(entry["losses"], losses, same_machine=entry["machine"] == machine)
        entry["check"] = {"commit": commit, "dirty": dirty, "machine": machine, **v.to_dict()}
        write_canaries(sweep.results, sweep.canaries)
        where = "this machine" if v.same_machine else f"another machine (tolerance {canary_lib.TOLERANCE:g})"
        detail = "" if v.first_differing_step is None else f", first at step {v.first_differing_step}"
        print(f"{name}: {v.kind} on {where}, max abs diff {v.max_abs_diff:.3g}{detail} ({time.time() - t0:.1f}s)")
        bad += not v.passed
    return bad


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("recipes", nargs="*", help="recipe names (experiments/recipes/*.yaml) or 'all'")
    ap.add_argument("--stage", choices=(*STAGES, "all"), default="all")
    ap.add_argument("--table-only", action="store_true", help="train nothing: the table from the runs on record")
    canaries = ap.add_mutually_exclusive_group()
    canaries.add_argument("--check", action="store_true", help="re-run the canaries (default: all), then the table")
    canaries.add_argument("--record-canaries", action="store_true", help="record the canaries with this library")
    ap.add_argument("--recipes-dir", type=Path, default=RECIPES, help="the recipes and their protocol.yaml")
    ap.add_argument("--results", type=Path, default=RESULTS, help="where run records and the table go")
    ap.add_argument("--runs", type=Path, default=ROOT / "runs" / "sweep", help="the runs' own out dirs (checkpoints)")
    ap.add_argument("--set", dest="extra", action="append", default=[], metavar="K=V", help="override for every run")
    ap.add_argument("--lock", type=Path, default=None, help="hold an exclusive flock on this file while a run trains")
    ap.add_argument("--allow-dirty", action="store_true", help="run from uncommitted code (recorded as dirty)")
    a = ap.parse_args(argv)
    if not a.recipes and not a.check:
        ap.error("name the recipes (or 'all')")
    canary_mode = a.check or a.record_canaries
    try:
        folder = a.recipes_dir.resolve()
        protocol = load_protocol(folder / "protocol.yaml")
        known = recipe_names(folder)
        names = known if a.recipes in (["all"], []) else a.recipes
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"unknown recipes {unknown} (known: {', '.join(known)})")
        recipes = {n: load_recipe(folder / f"{n}.yaml", protocol) for n in known}
        for n in names:
            if recipes[n].lr_from and recipes[n].lr_from not in recipes:
                raise ConfigError(f"{n}: lr_from names unknown recipe {recipes[n].lr_from!r}")
        make = lambda: Sweep(protocol, recipes, a.extra, a.results.resolve(), a.runs.resolve(), a.lock)
        sweep = make()
        stages = STAGES if a.stage == "all" else (a.stage,)
        bad = 0
        if canary_mode:  # the canaries, then the whole table judged by their verdicts
            with contextlib.redirect_stdout(io.StringIO()):
                sweep.run(known, STAGES, train_it=False, allow_dirty=False)
            bad = check(sweep, names) if a.check else record_with_runner(sweep, names)
            sweep, names = make(), known
        sweep.run(names, stages, train_it=not (a.table_only or canary_mode), allow_dirty=a.allow_dirty)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    md, recs = table(sweep, names)
    text = protocol_text(protocol) + "\n\n" + md
    write_table(sweep.results, text)
    write_record(sweep.results / "results.json", {"protocol": str(protocol.path), "recipes": recs, "extra": a.extra})
    print(text)
    if sweep.results == RESULTS:  # the README's copy (not for a harness test's own results folder)
        make_tables()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
