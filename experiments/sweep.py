"""The comparison harness: every method's learning-rate grid, best of grid, the winner at 4x tokens with 3 seeds.

    python experiments/sweep.py all                 # every recipe: run what is missing or stale, write the table
    python experiments/sweep.py adamw galore        # some recipes
    python experiments/sweep.py all --stage short   # only the grids
    python experiments/sweep.py all --stage lrcheck # only the lr checks
    python experiments/sweep.py all --table-only    # the table from the runs on record, nothing trained
    python experiments/sweep.py all --dry-run       # the runs a sweep would train next, nothing trained
    python experiments/sweep.py --eval-cost         # time one evaluation at the protocol's eval_tokens

The protocol (``experiments/recipes/protocol.yaml``) is the same for every method: the preset, data, tokens
per step, schedule shape, eps, clipping, weight decay, the evaluation, the grid seed and the long-budget seeds,
and the learning rate of the groups every method trains with plain Adam (embeddings, lm_head, norms). A recipe
(``experiments/recipes/NAME.yaml``) adds only the method's own settings and its grid of exactly
``grid_size`` log-spaced learning rates for the method's parameters (``optim.lr``: the block kernels or the
method's factors; when the best is at an edge of the grid, the grid grows by one log-step on that side, up to
three times, the same rule for every method), or ``lr_from: OTHER`` (run at OTHER's chosen lr, e.g. 8-bit
GaLore at GaLore's) or ``lrs: []`` (a control without a learning rate to tune). The short stage runs the grid
at ``short_steps``; the lr check (``lr_check`` in the protocol) runs the grid point with the lowest final
validation loss, and that lr ÷ and × ``lr_check``, at ``long_steps`` (>= 4x the tokens) with the grid seed;
the long stage runs the best of those three with each of ``seeds`` (``lr_from`` recipes follow their source);
until all of those have run, a row whose lr moved keeps its statistics from the long runs at the grid's lr.
Step-valued settings listed in a recipe's ``scale_with_steps`` scale with the budget. A protocol with
``seeds: []`` is a *study* (e.g. ``experiments/galore_gap.py``): its recipes run their grid stage only, at the
learning rates they list, with the same records, canaries and staleness as every run of the harness.

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
harness builds now (a setting the record lacks counts as the same when the harness asks for the preset's
value); a stale or missing run is (re-)run. A run evaluated on fewer validation tokens than the protocol's
``eval_tokens`` but otherwise the same is outdated: the table shows it, a sweep that trains re-runs it and
keeps the old record beside the new one (``STAGE/RUN@TOKENS``), so that a row's statistics, which never mix
evaluations, stay on the old count until every seed of the row has been re-run.

The table (``experiments/results/sweep/table.md``, README ``<!-- table:sweep -->``) has one row per recipe:
grid, chosen lr, short-budget ppl, the lr check's three losses, long-budget ppl mean ± std over the seeds,
trainable parameters, optimizer-state bytes, the ratio to the baseline recipe's long-budget ppl, the paired
statistics against the baseline (``experiments/stats.py``: the mean loss difference over the shared seeds with
its 95% Student-t interval, the perplexity ratio's interval, p, and the verdict on the recipe's goal from the
protocol's ``goals``), the validation tokens the row was evaluated on, and the largest block-output RMS over
the embedding RMS seen at any evaluation (of the long runs; of the chosen grid point until they exist: a
blow-up shows here). A stale row says so; a row still waiting for runs counts them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import fcntl
import functools
import io
import json
import math
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import canary as canary_lib
import records
import stats
import yaml
from _report import counts_text, markdown_table, write_record, write_table
from make_tables import main as make_tables

from lowrank_jax.config import ConfigError, load_config, to_dict
from lowrank_jax.config import replace as replace_config
from lowrank_jax.config.schema import FiraConfig, GaloreConfig
from lowrank_jax.data import eval_batches, load_shards
from lowrank_jax.train.loop import train
from lowrank_jax.train.metrics import git_commit, read_metrics
from lowrank_jax.train.step import evaluate, make_trainer

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPES = HERE / "recipes"
RESULTS = HERE / "results" / "sweep"
CANARIES = "canaries.json"
# what a run executes besides its recipe and the protocol (a run starts only from a clean checkout of these)
SOURCES = ("lowrank_jax", "pallas_kernels", "experiments/sweep.py", "experiments/canary.py", "experiments/records.py")
STAGES = ("short", "lrcheck", "long")
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
    lr_check: float | None = None  # the long-budget check's step: the chosen lr x 1/lr_check and x lr_check
    goals: dict[str, float] = field(default_factory=dict)  # recipe -> the ppl ratio to the baseline it is held to
    # recipe -> the other recipes its long runs are also paired with (same seeds, same evaluation)
    comparisons: dict[str, tuple[str, ...]] = field(default_factory=dict)


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
    required = {"preset", "grid_size", "short_steps", "long_steps", "grid_seed", "seeds", "baseline", "overrides"}
    required |= {"canary_steps"}
    _expect(d, path, required | {"lr_check", "goals", "comparisons"}, required)
    goals = d.get("goals") or {}
    if not isinstance(goals, dict) or not all(isinstance(v, int | float) and v > 0 for v in goals.values()):
        raise ConfigError(f"{path}: goals must map recipes to positive perplexity ratios, got {goals!r}")
    goals = {str(k): float(v) for k, v in goals.items()}
    comparisons = d.get("comparisons") or {}
    if not isinstance(comparisons, dict) or not all(
        isinstance(v, list) and v and all(isinstance(o, str) and o != k for o in v) for k, v in comparisons.items()
    ):
        raise ConfigError(f"{path}: comparisons must map recipes to lists of other recipes, got {comparisons!r}")
    comparisons = {str(k): tuple(v) for k, v in comparisons.items()}
    p = Protocol(
        **{
            **d,
            "seeds": tuple(d["seeds"]),
            "overrides": dict(d["overrides"] or {}),
            "path": path,
            "goals": goals,
            "comparisons": comparisons,
        }
    )
    if p.grid_size < 1 or p.short_steps < 1 or p.long_steps < p.short_steps:
        raise ConfigError(f"{path}: needs grid_size >= 1 and long_steps >= short_steps >= 1")
    if not p.seeds and (p.lr_check or p.goals or p.comparisons):
        raise ConfigError(f"{path}: seeds: [] (a study: the grid stage only) takes no lr_check, goals or comparisons")
    if not 1 <= p.canary_steps <= p.short_steps:
        raise ConfigError(f"{path}: needs 1 <= canary_steps <= short_steps")
    if p.lr_check is not None and not (isinstance(p.lr_check, int | float) and p.lr_check > 1):
        raise ConfigError(f"{path}: lr_check must be a factor > 1 (e.g. 1.4142135623730951), got {p.lr_check!r}")
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
    """``('done' | 'missing' | 'stale: why' | 'outdated: why', results)`` of a run on record.

    A run on record is stale when its recorded config is not the one the harness builds now, or when its
    recipe's canary (``canaries[recipe]``) failed its last check. It is outdated when its config differs only
    in being evaluated on fewer validation tokens than the protocol's: it trained the same way, so the table
    still shows it (saying on how many tokens), and a sweep that trains re-runs it.
    """
    rec = records.run_record(results, run.recipe.name, run.key)
    if rec is None:
        return "missing", None
    res, status = rec["results"], "done"
    default = _preset_default(protocol.preset)
    recorded, wanted = _method_sections(rec["meta"].get("config") or {}, default), _requested(run, protocol, extra)
    if not _matches(recorded, wanted, default):
        fewer, asked = recorded.get("eval_tokens"), wanted.get("eval_tokens")
        same = _matches({**recorded, "eval_tokens": asked}, wanted, default)
        if not (isinstance(fewer, int) and fewer < asked and same):
            return "stale: its config differs from the recipe's", res
        status = f"outdated: evaluated on {fewer:,} validation tokens, the protocol's {asked:,}"
    why = canary_failure((canaries or {}).get(run.recipe.name))
    if why:
        return f"stale: {why}", res
    return status, res


# the GaLore projector settings, which the galore, golore and fira sections each hold
_PROJECTOR_FIELDS = tuple(
    f.name for f in dataclasses.fields(FiraConfig) if f.name in {g.name for g in dataclasses.fields(GaloreConfig)}
)


def _method_sections(config: dict[str, Any], default: dict[str, Any]) -> dict[str, Any]:
    """A recorded config with Fira's and GoLore's projector settings in their own sections (``fira``, ``golore``).

    A record may hold them in the ``galore`` section, where ``optim.name=fira_adamw`` and ``galore_adamw`` with
    ``galore.projector=random`` read them: the same computation as ``fira_adamw`` with ``fira.*`` and
    ``golore_adamw`` with ``golore.*`` (the recipes' canaries are the evidence), so they compare as such.
    """
    optim, galore = config.get("optim") or {}, config.get("galore") or {}
    moved = {k: galore[k] for k in _PROJECTOR_FIELDS if k in galore}
    if optim.get("name") == "fira_adamw" and "rank" not in (config.get("fira") or {}):
        return {**config, "fira": {**(config.get("fira") or {}), **moved}, "galore": default.get("galore", {})}
    if optim.get("name") == "galore_adamw" and galore.get("projector") == "random" and "golore" not in config:
        golore = {**moved, "random_from": galore.get("random_from", 0)}
        renamed = {**optim, "name": "golore_adamw"}
        return {**config, "optim": renamed, "golore": golore, "galore": default.get("galore", {})}
    return config


def _matches(recorded: dict[str, Any], wanted: dict[str, Any], default: dict[str, Any]) -> bool:
    """Whether a run's recorded config is the one the harness asks for. A setting the record does not have
    (one the library that ran it did not have) matches when the harness asks for the preset's value of it: that
    value computes what the run computed, and the recipe's canary is the evidence (``--check``)."""
    for key in set(recorded) | set(wanted):
        if key not in wanted:
            return False
        if key not in recorded:
            if wanted[key] != default.get(key):
                return False
            continue
        a, b, d = recorded[key], wanted[key], default.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            if not _matches(a, b, d if isinstance(d, dict) else {}):
                return False
        elif a != b:
            return False
    return True


@functools.cache
def _preset_default(preset: str) -> dict[str, Any]:
    config = to_dict(load_config(preset, []))
    return json.loads(json.dumps({k: v for k, v in config.items() if k not in _NOT_COMPARED}))


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
    run: Run,
    protocol: Protocol,
    extra: list[str],
    results: Path,
    runs: Path,
    allow_dirty: bool,
    lock: Path | None,
    keep_previous: bool = False,
) -> dict:
    """Train ``run`` (holding ``lock``, if given) and file its record into its recipe's pack; returns its results.

    ``keep_previous`` (the run on record is outdated: the same training evaluated on fewer validation tokens)
    files the previous record under :func:`superseded_key`, so that a row keeps its statistics on the old
    evaluation until every one of its seeds has been re-run on the new one."""
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
    previous = records.run_record(results, run.recipe.name, run.key) if keep_previous else None
    if previous is not None:
        key = superseded_key(run.key, _eval_tokens(previous["results"]))
        records.put_run(results, run.recipe.name, key, previous)
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
        dry: bool = False,  # --dry-run: list the runs that would train (self.planned), train none
    ) -> None:
        self.protocol, self.recipes, self.extra, self.results, self.runs = protocol, recipes, extra, results, runs
        self.lock, self.dry = lock, dry
        self.done: dict[Run, dict] = {}
        self.stale: dict[Run, str] = {}
        self.outdated: dict[Run, str] = {}  # on record and shown, but re-run by a sweep that trains
        self.planned: list[Run] = []
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

    def lr_check(self, r: Recipe) -> list[Run]:
        """The long-budget check of the grid's choice: the chosen lr, x 1/``lr_check`` and x ``lr_check`` at
        ``long_steps`` with the grid seed (none without ``lr_check`` in the protocol, for ``lr_from`` recipes,
        which follow their source, and for recipes without a grid). The chosen lr comes first."""
        step = self.protocol.lr_check
        if step is None or not r.lrs:
            return []
        lr = self.chosen_lr(r)
        lrs = (lr, float(f"{lr / step:.6g}"), float(f"{lr * step:.6g}"))
        return [Run(r, "long", x, self.protocol.grid_seed) for x in lrs]

    def check_done(self, r: Recipe) -> bool:
        """Whether the recipe's lr check has run, all three evaluated on the same validation tokens."""
        check = self.lr_check(r)
        done = bool(check) and all(run in self.done for run in check)
        return done and len({_pair_key(run, self.done[run])[1:] for run in check}) == 1

    def long_lr(self, r: Recipe) -> float | None:
        """The learning rate of the long runs: the best of the lr check on final validation loss once it is done
        (a tie keeps the grid's choice), the grid's choice until then (``lr_from``: the source's)."""
        if r.lr_from:
            return self.long_lr(self.recipes[r.lr_from])
        if self.check_done(r):
            return min(self.lr_check(r), key=lambda run: _loss(self.done[run])).lr
        return self.chosen_lr(r)

    def on_record(self, run: Run) -> bool:
        """Whether ``run`` is on record and valid (done, or outdated: shown), loading it into ``done`` if so."""
        if run not in self.done:
            status, res = run_status(run, self.protocol, self.extra, self.results, self.canaries)
            if status != "done" and not status.startswith("outdated"):
                return False
            self.done[run] = res
            if status != "done":
                self.outdated[run] = status
        return True

    def long(self, r: Recipe) -> list[Run]:
        lr = self.long_lr(r)
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
        usable = status == "done" or (status.startswith("outdated") and not train_it)
        if usable:
            self.done[run] = res
            if status != "done":
                self.outdated[run] = status
            note = f", {status}" if status != "done" else ""
            print(
                f"{head}: on record ({res['git_commit'][:8]}), val_loss {res['final_val_loss']:.4f}{note}", flush=True
            )
            return
        if not train_it or self.dry:
            self.stale[run] = status
            if train_it:
                self.planned.append(run)
            print(f"{head}: {status}{', would train' if train_it else ''}", flush=True)
            return
        t0 = time.time()
        print(f"{head}: {status}, training ...", flush=True)
        keep = status.startswith("outdated")
        res = execute(run, self.protocol, self.extra, self.results, self.runs, allow_dirty, self.lock, keep)
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
                if stage in stages and stage != "short":
                    if not all(run in self.done for run in grid):
                        print(f"{name}: grid incomplete, no long-budget runs", flush=True)
                        continue
                    check = self.lr_check(source)  # a lr_from recipe's long lr waits for its source's check
                    if stage == "long" and "lrcheck" not in stages:  # a check on record counts (--stage long)
                        for run in check:
                            self.on_record(run)
                    todo = check if stage == "lrcheck" else self.long(r)
                    if stage == "long" and train_it and check and not self.check_done(source):
                        print(f"{name}: lr check incomplete, no long-budget runs yet", flush=True)
                        continue
                    for run in todo:
                        self.visit(run, train_it=train_it, allow_dirty=allow_dirty, counter=counter)
        self.record_canaries(names)


def _max_rms_ratio(run: Run, results: Path) -> float:
    rec = records.run_record(results, run.recipe.name, run.key)
    vals = [m["max_block_rms_ratio"] for m in (rec or {}).get("metrics", []) if "max_block_rms_ratio" in m]
    return max(vals) if vals else math.nan


def _ppl(loss: float) -> float:
    return math.exp(min(loss, 50.0))


def _eval_tokens(res: dict[str, Any]) -> int:
    return int((res.get("config") or {}).get("eval_tokens") or 0)


def superseded_key(key: str, eval_tokens: int) -> str:
    """Where a run's record evaluated on ``eval_tokens`` validation tokens is kept once it has been re-run on
    more (``long/lr0.001_seed0@32768``)."""
    return f"{key}@{eval_tokens}"


def _pair_key(run: Run, res: dict[str, Any]) -> tuple[int, int, str]:
    """What two long runs must share to be a pair: the seed (the same initialisation and data order) and the
    validation tokens they were evaluated on (their number and the data's digest)."""
    return (run.seed, _eval_tokens(res), str(res.get("data_digest") or ""))


def _by_eval_size(sweep: Sweep, run: Run) -> dict[int, dict[str, Any]]:
    """A valid run's results by the number of validation tokens they were evaluated on: the run on record and
    the records it superseded (none for a run that is missing or stale)."""
    if run not in sweep.done:
        return {}
    pack = records.read_pack(records.pack_path(sweep.results, run.recipe.name))
    out = {_eval_tokens(rec["results"]): rec["results"] for key, rec in pack.items() if key.startswith(f"{run.key}@")}
    return out | {_eval_tokens(sweep.done[run]): sweep.done[run]}


def long_results(sweep: Sweep, runs: list[Run]) -> tuple[int | None, dict[Run, dict[str, Any]]]:
    """A row's long runs on one evaluation: the largest number of validation tokens at which every run has a
    record, and those records (``None, {}`` while no number is shared by all). A row's statistics never mix
    evaluations: while its seeds are being re-run on more tokens, it keeps the ones all of them have."""
    every = _by_shared_eval_size(sweep, runs)
    if not every:
        return None, {}
    n = max(every)
    return n, every[n]


def _by_shared_eval_size(sweep: Sweep, runs: list[Run]) -> dict[int, dict[Run, dict[str, Any]]]:
    """For each number of validation tokens at which every one of ``runs`` has a record, those records."""
    sizes = [_by_eval_size(sweep, run) for run in runs]
    shared = set.intersection(*(set(s) for s in sizes)) if sizes else set()
    return {n: {run: s[n] for run, s in zip(runs, sizes, strict=True)} for n in shared}


def _final_losses(found: dict[Run, dict[str, Any]]) -> dict[tuple[int, int, str], float]:
    return {_pair_key(run, res): _loss(res) for run, res in found.items()}


def _sqrt2(step: float) -> str:
    return "√2" if abs(step - math.sqrt(2.0)) < 1e-9 else f"{step:g}"


def lr_check_summary(sweep: Sweep, r: Recipe) -> tuple[str, dict[str, Any] | None]:
    """The lr check's cell (the final validation losses at chosen lr ÷ k, chosen lr, chosen lr × k, and whether
    the long runs kept the chosen lr) and its record; ``'-'`` and None for a recipe without a check."""
    try:
        check = sweep.lr_check(r)
    except LookupError:
        return "-", None
    if not check:
        return "-", None
    losses = [sweep.done[run]["final_val_loss"] if run in sweep.done else None for run in check]
    rec: dict[str, Any] = {"lrs": [run.lr for run in check], "val_loss": losses, "long_lr": None, "moved": None}
    missing = losses.count(None)
    if missing:
        return f"{missing} pending", rec
    if not sweep.check_done(r):
        return "evaluated on different tokens", rec
    lr = sweep.long_lr(r)
    rec.update(long_lr=lr, moved=lr != check[0].lr)
    text = " / ".join(f"{losses[i]:.4f}" for i in (1, 0, 2))
    return text + (f": moved to {lr:g}" if rec["moved"] else ": kept"), rec


def lr_check_line(recs: dict[str, dict[str, Any]]) -> str:
    """The line under the table: which rows' lr checks kept the grid's choice, moved it up or down, or have not
    finished (``''`` when no row has a check)."""
    groups: dict[str, list[str]] = {"kept": [], "moved up": [], "moved down": [], "not finished": []}
    for name, rec in recs.items():
        check = rec["lr_check"]
        if check is None:
            continue
        if check["moved"] is None:
            key = "not finished"
        elif check["moved"]:
            key = "moved up" if check["long_lr"] > check["lrs"][0] else "moved down"
        else:
            key = "kept"
        groups[key].append(name)
    n = sum(map(len, groups.values()))
    if not n:
        return ""
    parts = [f"{key} {len(v)}" + (f" ({', '.join(f'`{x}`' for x in v)})" if v else "") for key, v in groups.items()]
    return f"lr checks ({n} row{'s' * (n != 1)}): " + "; ".join(parts) + "."


def paired_cells(p: stats.Paired | None, n_seeds: int, goal: float | None) -> list[str]:
    """The paired columns: Δ loss ± the CI's half-width, the ratio's CI, p, and the goal's verdict."""
    verdict = f"≤ {goal:.2f}: {stats.verdict(p, goal)}" if goal else "-"
    if p is None:
        return ["-", "-", "-", verdict]
    seeds = "" if p.n == n_seeds else f" ({p.n} seeds)"
    return [
        f"{p.mean:+.4f} ± {p.hi - p.mean:.4f}{seeds}",
        f"{p.ratio_lo:.3f}–{p.ratio_hi:.3f}",
        stats.p_text(p.p),
        verdict,
    ]


def shown_long(sweep: Sweep, r: Recipe) -> tuple[list[Run], int | None, dict[Run, dict[str, Any]]]:
    """The long runs a row's statistics come from, with :func:`long_results` of them: the long runs at the
    row's lr, or, while the lr check has moved them and not all have run, those at the grid's lr (when all of
    those are on record): a moved row keeps its statistics until its new runs replace them."""
    try:
        longs, lr = sweep.long(r), sweep.chosen_lr(r)
    except LookupError:
        return [], None, {}
    n, found = long_results(sweep, longs)
    if not found and longs and longs[0].lr != lr:
        before = [dataclasses.replace(run, lr=lr) for run in longs]
        if all(sweep.on_record(run) for run in before):
            return (before, *long_results(sweep, before))
    return longs, n, found


def _long_losses(sweep: Sweep, name: str) -> dict[int, dict[tuple[int, int, str], float]]:
    """A recipe's long runs (as :func:`shown_long` picks them) as final losses by pair key, for each number of
    validation tokens at which all of them have a record."""
    runs = shown_long(sweep, sweep.recipes[name])[0]
    return {n: _final_losses(found) for n, found in _by_shared_eval_size(sweep, runs).items()}


def _baseline(sweep: Sweep) -> dict[int, tuple[float, dict[tuple[int, int, str], float]]]:
    """The baseline's long-budget mean ppl and its final losses by pair key, for each number of validation
    tokens at which all its seeds have a record (its runs as :func:`shown_long` picks them)."""
    if sweep.protocol.baseline not in sweep.recipes:
        return {}
    return {
        n: (statistics.mean(_ppl(loss) for loss in losses.values()), losses)
        for n, losses in _long_losses(sweep, sweep.protocol.baseline).items()
    }


def _paired_dict(mine: dict[tuple[int, int, str], float], other: dict[tuple[int, int, str], float]) -> dict | None:
    p = stats.paired(mine, other) if mine and other else None
    return p.to_dict() if p else None


def _row_runs(sweep: Sweep, r: Recipe) -> tuple[list[Run], float | None, list[Run], list[Run]]:
    """A recipe's grid, the grid's chosen lr, its lr check and its long runs (as far as the records go)."""
    grid = sweep.grid(r)  # empty for lr_from: its chosen lr is the source's
    source = sweep.recipes[r.lr_from] if r.lr_from else r
    try:
        lr, check, longs = sweep.chosen_lr(r), sweep.lr_check(source), sweep.long(r)
    except LookupError:
        lr, check, longs = None, [], []
    return grid, lr, check, longs


def table(sweep: Sweep, names: list[str]) -> tuple[str, dict[str, Any]]:
    """The markdown table and its records (one per recipe)."""
    rows, recs = [], {}
    bases = _baseline(sweep)
    for name in names:
        r = sweep.recipes[name]
        grid, lr, check, longs = _row_runs(sweep, r)
        chosen = next((run for run in grid if run.lr == lr), None)
        short = sweep.done.get(chosen) if chosen else None
        long_lr = longs[0].lr if longs else None
        shown, long_n, found = shown_long(sweep, r)
        long_ppl = [_ppl(_loss(res)) for res in found.values()]
        complete = bool(found)
        base, base_losses = bases.get(long_n, (None, {}))
        mine = {run: why for run, why in sweep.stale.items() if run.recipe.name in (name, r.lr_from)}
        stale = sorted({why.removeprefix("stale: ") for why in mine.values() if why != "missing"})
        # the grid's (a lr_from recipe's: its source's) and its own long runs (the lr check's count in its column)
        counted = [run for run in mine if run.recipe.name == name or run.stage == "short"]
        pending = sum(mine[run] == "missing" and (run in longs or run not in check) for run in counted)
        waiting = [f"{pending} runs pending"] if pending else []
        if shown and shown[0].lr != long_lr:
            waiting.append(f"long runs at {lr:g} until those at {long_lr:g} have run")
        ref = sweep.done.get(shown[0]) if complete else short
        # the long runs' health once they exist, else the chosen grid point's
        rms_runs = [run for run in shown if run in sweep.done] or ([chosen] if short else [])
        rms = max((_max_rms_ratio(run, sweep.results) for run in rms_runs), default=math.nan)
        ran = [run for run in [*grid, *([] if r.lr_from else check), *shown] if run in sweep.done]
        # every record the row reads: the runs on record and, mid re-run, the replaced ones its statistics use
        commits = sorted({res["git_commit"][:8] for res in [*(sweep.done[run] for run in ran), *found.values()]})
        shown_n = long_n if complete else _eval_tokens(short) if short else 0
        eval_tokens = [shown_n] if shown_n else []
        is_base = name == sweep.protocol.baseline
        pair = stats.paired(_final_losses(found), base_losses) if complete and base and not is_base else None
        goal = sweep.protocol.goals.get(name)
        compared = {  # the protocol's other pairings, on this row's evaluation
            other: _paired_dict(_final_losses(found), _long_losses(sweep, other).get(long_n, {}))
            for other in sweep.protocol.comparisons.get(name, ())
        }
        check_txt, check_rec = lr_check_summary(sweep, r)
        rec: dict[str, Any] = {"description": r.description, "grid": [run.lr for run in grid if run.lr]}
        rec.update(
            chosen_lr=lr,
            long_lr=long_lr,
            lr_check=check_rec,
            short_ppl=_ppl(_loss(short)) if short else None,
            long_ppl=long_ppl,
            long_ppl_lr=shown[0].lr if complete else None,  # the grid's lr while the moved runs are pending
            paired=pair.to_dict() if pair else None,
            ratio=statistics.mean(long_ppl) / base if complete and base else None,  # ÷ baseline, same evaluation
            compared=compared,
            goal=goal,
            goal_verdict=stats.verdict(pair, goal) if goal else None,
            eval_tokens=eval_tokens,
            outdated_runs=sum(run.recipe.name in (name, r.lr_from) for run in sweep.outdated),
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
        lr_txt = "-" if not lr else f"{lr:g}" if long_lr in (None, lr) else f"{lr:g} → {long_lr:g}"
        rows.append(
            [
                name,
                grid_txt,
                lr_txt,
                f"{rec['short_ppl']:.2f}" if short else "-",
                check_txt,
                f"{mean:.2f} ± {std:.2f}" if mean else "-",
                f"{rec['trainable_params'] / 1e6:.2f}M" if ref else "-",
                f"{rec['optimizer_state_bytes'] / 2**20:.2f} MiB" if ref else "-",
                f"{rec['ratio']:.3f}" if rec["ratio"] else "-",
                *paired_cells(pair, len(sweep.protocol.seeds), goal),
                counts_text(eval_tokens),
                f"{rms:.1f}" if math.isfinite(rms) else "-",
                f"STALE: {'; '.join(stale)}" if stale else ", ".join(commits + waiting),
            ]
        )
    return markdown_table(_header(sweep.protocol), rows), recs


def _header(p: Protocol) -> str:
    k, b = _sqrt2(p.lr_check or 0.0), p.baseline
    check = f"lr check: loss at ÷{k} / chosen / ×{k}" if p.lr_check else "lr check"
    header = f"recipe | lr grid | chosen lr | short ppl | {check} | long ppl (mean ± std) | trainable | opt state"
    header += f" | ÷ {b} | Δ loss vs {b} (95% CI) | ÷ {b}, 95% CI | p | goal | eval tokens"
    return header + " | max block RMS ÷ embed RMS | commit"


def _shown(path: Path) -> Path:
    """``path`` relative to the repository when inside it (the records name no machine's folders)."""
    return path.relative_to(ROOT) if path.is_relative_to(ROOT) else path


def protocol_text(p: Protocol) -> str:
    shared = ", ".join(f"`{k}={v}`" for k, v in p.overrides.items())
    where = _shown(p.path)
    return (
        (
            f"Protocol ({where}): preset `{p.preset}`, {shared}. Each method: a grid of "
            f"{p.grid_size} log-spaced learning rates at {p.short_steps} steps (seed {p.grid_seed}); the best on "
            f"validation loss re-run at {p.long_steps} steps with seeds {', '.join(map(str, p.seeds))}. "
            f"Ratios divide by `{p.baseline}`'s long-budget mean ppl."
            + lr_check_text(p)
            + paired_text(p)
            + eval_text(p)
        )
        if p.seeds
        else (
            f"Study protocol ({where}): preset `{p.preset}`, {shared}. Each recipe: its {p.grid_size} learning "
            f"rate(s) at {p.short_steps} steps (seed {p.grid_seed}); no long-budget stage." + eval_text(p)
        )
    )


def eval_text(p: Protocol) -> str:
    n = p.overrides.get("eval_tokens")
    if not n:
        return ""
    return (
        f" Every evaluation reads {n:,} validation tokens; a run on record evaluated on fewer is shown with its "
        "count (eval tokens) until a sweep that trains re-runs it. A row's long-budget statistics never mix "
        "evaluations: they come from the largest count all its seeds (and the baseline's) were evaluated on, "
        "a re-run keeping the record it replaces until every seed has been re-run."
    )


def lr_check_text(p: Protocol) -> str:
    if not p.lr_check:
        return ""
    k = _sqrt2(p.lr_check)
    return (
        f" The lr check runs the grid's choice ÷{k}, ×1 and ×{k} at {p.long_steps} steps (seed {p.grid_seed}); "
        "the long runs take the best of the three (chosen lr `a → b` where it moved)."
    )


def paired_text(p: Protocol) -> str:
    b = p.baseline
    return (
        f" Paired with `{b}`'s long runs of the same seed (same initialisation and data order) and validation "
        "tokens: Δ loss is the mean difference in final validation loss ± the half-width of its 95% Student-t "
        f"interval, its exp the ÷ {b} 95% CI (the geometric mean of the seeds' perplexity ratios), p the "
        "two-sided paired t test. A goal (a perplexity ratio) is met only when that CI's upper end is under it, "
        "missed when its lower end is above it, undecided otherwise."
        + (
            " The same pairing between the recipes listed under `comparisons` ("
            + "; ".join(f"{k} with {', '.join(v)}" for k, v in p.comparisons.items())
            + ") is recorded as each row's `compared`."
            if p.comparisons
            else ""
        )
    )


def _recorded_seconds(sweep: Sweep, run: Run) -> float | None:
    """The mean wall time of the recipe's runs on record at the run's stage (None: none on record)."""
    pack = records.read_pack(records.pack_path(sweep.results, run.recipe.name))
    times = [rec["results"].get("wall_time_s") for key, rec in pack.items() if key.startswith(f"{run.stage}/")]
    times = [t for t in times if isinstance(t, int | float)]
    return statistics.mean(times) if times else None


def print_plan(sweep: Sweep) -> None:
    """``--dry-run``: what a sweep with the same arguments would train next, and about how long it takes."""
    runs = sweep.planned
    if not runs:
        print("plan: nothing to train", flush=True)
        return
    seconds = [_recorded_seconds(sweep, run) for run in runs]
    known = [s for s in seconds if s is not None]
    stages = ", ".join(f"{sum(run.stage == s for run in runs)} {s}" for s in ("short", "long"))
    cost = f", about {sum(known) / 3600:.1f} h at the wall time of the recipes' runs on record" if known else ""
    unknown = f" ({len(runs) - len(known)} without a run on record to go by)" if len(known) < len(runs) else ""
    print(f"plan: {len(runs)} runs to train ({stages}){cost}{unknown}.", flush=True)
    print("Runs that wait on these (a grid's edge extension, the long runs after an lr check) are planned once")
    print("these have run; --eval-cost times the evaluation at the protocol's eval_tokens.", flush=True)


def eval_cost(sweep: Sweep, r: Recipe) -> int:
    """``--eval-cost``: one evaluation of ``r``'s model (fresh from its seed: the cost does not depend on the
    weights) on the preset's and on the protocol's validation tokens, timed after a warm-up, holding the lock;
    prints what the evaluations add to a short and a long run."""
    p = sweep.protocol
    run = Run(r, "long", r.lrs[0] if r.lrs else None, p.grid_seed)
    cfg = load_config(p.preset, [*run_overrides(run, p, sweep.extra), "progress=false"])
    data = load_shards(cfg.data, lambda message: None)
    if cfg.model.vocab_size == 0:
        cfg = replace_config(cfg, model__vocab_size=data.vocab_size)
    trainer = make_trainer(cfg)
    params = trainer.init_state().params
    print(f"evaluation cost of {r.name} at {p.preset} on {canary_lib.describe(canary_lib.fingerprint())}")
    for tokens in sorted({load_config(p.preset, []).eval_tokens, cfg.eval_tokens}):
        batches = eval_batches(data.val_prefix(tokens + 1), cfg.seq_len, tokens, cfg.eval_batch_size)
        with held(sweep.lock):
            evaluate(trainer, params, batches[:1])  # compiles the evaluation step
            t0 = time.perf_counter()
            evaluate(trainer, params, batches)
            seconds = time.perf_counter() - t0
        every = cfg.eval_every or p.long_steps  # evaluations at each multiple of eval_every and at the end
        per = [(steps, (steps - 1) // every + 1) for steps in (p.short_steps, p.long_steps)]
        runs = "; ".join(f"{n} evaluations in a {steps}-step run: {n * seconds:.0f}s" for steps, n in per)
        print(
            f"{tokens:,} validation tokens ({len(batches)} batches): {seconds:.2f}s per evaluation; {runs}", flush=True
        )
    return 0


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
    ap.add_argument("--dry-run", action="store_true", help="list the runs that would train; train and write nothing")
    ap.add_argument("--eval-cost", action="store_true", help="time one evaluation at the protocol's eval_tokens")
    a = ap.parse_args(argv)
    if not a.recipes and not (a.check or a.eval_cost):
        ap.error("name the recipes (or 'all')")
    canary_mode = a.check or a.record_canaries
    if a.dry_run and (canary_mode or a.table_only):
        ap.error("--dry-run plans training runs: not with --check, --record-canaries or --table-only")
    try:
        folder = a.recipes_dir.resolve()
        protocol = load_protocol(folder / "protocol.yaml")
        known = recipe_names(folder)
        names = known if a.recipes in (["all"], []) else a.recipes
        unknown = [n for n in names if n not in known]
        if unknown:
            raise ConfigError(f"unknown recipes {unknown} (known: {', '.join(known)})")
        recipes = {n: load_recipe(folder / f"{n}.yaml", protocol) for n in known}
        if set(protocol.goals) - set(known):
            raise ConfigError(f"{protocol.path}: goals name unknown recipes {sorted(set(protocol.goals) - set(known))}")
        named = set(protocol.comparisons).union(*protocol.comparisons.values())
        if named - set(known):
            raise ConfigError(f"{protocol.path}: comparisons name unknown recipes {sorted(named - set(known))}")
        for n in names:
            if recipes[n].lr_from and recipes[n].lr_from not in recipes:
                raise ConfigError(f"{n}: lr_from names unknown recipe {recipes[n].lr_from!r}")
        make = lambda: Sweep(protocol, recipes, a.extra, a.results.resolve(), a.runs.resolve(), a.lock, a.dry_run)
        sweep = make()
        if a.eval_cost:
            return eval_cost(sweep, sweep.recipes[protocol.baseline])
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
    if a.dry_run:
        print_plan(sweep)
        return 0
    md, recs = table(sweep, names)
    text = "\n\n".join(filter(None, [protocol_text(protocol), md, lr_check_line(recs)]))
    write_table(sweep.results, text)
    write_record(
        sweep.results / "results.json", {"protocol": str(_shown(protocol.path)), "recipes": recs, "extra": a.extra}
    )
    print(text)
    if sweep.results == RESULTS:  # the README's copy (not for a harness test's own results folder)
        make_tables()
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
