"""The recommended recipes rank as the methods should: retrained here, with the library as it is.

Each of ``adamw``, ``lora``, ``lowrank`` and ``frozen_blocks`` is trained with the shipped recipe
(``experiments/recipes/*.yaml``) under the comparison protocol at the short budget (200 steps of the
``tiny`` preset, grid seed 0), at the learning rate the sweep chose on record (the grid point with the
lowest validation loss among the recipe's short-stage runs in its pack of records,
``experiments/results/sweep/runs/NAME.json.xz``, whatever commit it ran at: the lr is the recommendation,
the loss is measured again now). Then:

- LoRA from scratch and low-rank W = BA beat doing nothing to the blocks (frozen at init) by a clear
  margin: a LoRA whose factors blow up or do not train (e.g. one learning rate for factors and embeddings)
  fails here;
- full-rank AdamW beats frozen blocks by the same margin and stays within ``NEAR`` of both low-rank
  methods (a broken full-rank path, or a low-rank one that only matches frozen blocks, fails);
- "full rank beats both" (the issue's expectation) is recorded as a strict xfail: at this budget it is
  false. Measured with these recipes (lrs 1e-3 / 2e-3 / 1e-3), evaluated on the protocol's 262,144
  validation tokens: val loss AdamW 4.4454, LoRA from scratch 4.3719, low-rank 4.4274, frozen blocks
  4.5949. LoRA (a frozen random W plus a rank-32 update) beats full rank by 0.074 and low-rank by
  0.018 at 200 steps; the long-budget table (800 steps, 3 seeds) is where they are compared on equal
  tokens. If full rank starts winning, the xfail turns into a failure and this note must be revised.

Four 200-step runs (~11 min on two cores): ``slow``.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from lowrank_jax.config import load_config
from lowrank_jax.train.loop import train

EXPERIMENTS = Path(__file__).resolve().parents[1] / "experiments"
MARGIN = 0.05  # nats of validation loss: well above the run-to-run spread of one seed at 200 steps
NEAR = 0.1  # nats: the low-rank methods and full rank are within this of each other at 200 steps


@pytest.fixture(scope="module")
def sweep():
    import sys

    sys.path.insert(0, str(EXPERIMENTS))
    try:
        import sweep
    finally:
        sys.path.remove(str(EXPERIMENTS))
    return sweep


def recommended_lr(sweep, name: str) -> float | None:
    """The short-budget grid point on record with the lowest validation loss (None: a recipe without an lr)."""
    protocol = sweep.load_protocol(sweep.RECIPES / "protocol.yaml")
    pack = sweep.records.read_pack(sweep.records.pack_path(sweep.RESULTS, name))
    mine = lambda key: key.startswith("short/") and key.endswith(f"_seed{protocol.grid_seed}")
    runs = [rec["results"] for key, rec in sorted(pack.items()) if mine(key)]
    assert runs, f"no sweep records for {name}: run `python experiments/sweep.py {name} --stage short`"
    best = min(runs, key=lambda r: r["final_val_loss"])
    recipe = sweep.load_recipe(sweep.RECIPES / f"{name}.yaml", protocol)
    return best["config"]["optim"]["lr"] if recipe.lrs else None


@pytest.fixture(scope="module")
def val_loss(sweep, tmp_path_factory):
    protocol = sweep.load_protocol(sweep.RECIPES / "protocol.yaml")
    losses: dict[str, float] = {}

    def get(name: str) -> float:
        if name not in losses:
            recipe = sweep.load_recipe(sweep.RECIPES / f"{name}.yaml", protocol)
            run = sweep.Run(recipe, "short", recommended_lr(sweep, name), protocol.grid_seed)
            out = tmp_path_factory.mktemp(name)
            overrides = [*sweep.run_overrides(run, protocol, []), f"out_dir={out}", "progress=false"]
            res = train(load_config(protocol.preset, overrides))
            print(f"{name} lr {run.lr}: val loss {res['final_val_loss']:.4f}")
            losses[name] = res["final_val_loss"]
        return losses[name]

    return get


@pytest.mark.slow
@pytest.mark.parametrize("method", ["lora", "lowrank"])
def test_low_rank_methods_beat_frozen_blocks(val_loss, method):
    assert val_loss(method) < val_loss("frozen_blocks") - MARGIN, (val_loss(method), val_loss("frozen_blocks"))


@pytest.mark.slow
def test_full_rank_beats_frozen_blocks_and_stays_near_the_low_rank_methods(val_loss):
    assert val_loss("adamw") < val_loss("frozen_blocks") - MARGIN, (val_loss("adamw"), val_loss("frozen_blocks"))
    for method in ("lora", "lowrank"):
        assert abs(val_loss("adamw") - val_loss(method)) < NEAR, (method, val_loss("adamw"), val_loss(method))


@pytest.mark.slow
@pytest.mark.xfail(strict=True, reason="at 200 steps LoRA from scratch beats full rank (4.3719 vs 4.4454)")
def test_full_rank_beats_lora_and_low_rank_at_the_short_budget(val_loss):
    assert val_loss("adamw") < min(val_loss("lora"), val_loss("lowrank"))
