"""Why GaLore trails AdamW by more here than in its paper: the batch its SVD sees, and how often it refreshes.

    python experiments/galore_gap.py                # run what is missing or stale, then the table and figure
    python experiments/galore_gap.py --table-only   # the table and figure from the runs on record
    python experiments/galore_gap.py --check        # re-run every study recipe's canary, then the table

GaLore (Zhao et al., ICML 2024, arXiv 2403.03507) takes its projector from an SVD of one step's gradient.
In the comparison (``experiments/sweep.py``) a step is 16 × 256 = 4,096 tokens, where the paper's 60M runs take
131K, and 800 steps at T = 100 refresh the projector 8 times. Two studies at the comparison's tokens
(3,276,800), seed 0, each method at the learning rate the comparison's lr check chose for it:

* ``batch4`` / ``batch16``: GaLore and AdamW with 4× and 16× the tokens per step and 1/4 and 1/16 of the steps
  (8 projectors each, as at 1×): if the gap is the noise of a small batch's gradient SVD, it shrinks.
* ``refresh``: GaLore at the comparison's batch with T = 25, 50 and 200 (32, 16 and 4 projectors); T = 100
  (8) is the comparison's own run.

Each study is a folder of recipes under ``experiments/recipes/galore_gap/`` with a study protocol (``seeds: []``:
one run per recipe), run by the harness into ``experiments/results/galore_gap/STUDY/`` with its records,
canaries and staleness rules. The 1× point (and T = 100) is the comparison's own lr-check runs of ``adamw``
and ``galore`` at seed 0 (``experiments/results/sweep/runs/``). Writes ``experiments/results/galore_gap/{results.json,
table.md, galore_gap.png}``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import sys
from pathlib import Path
from typing import Any

import records
import sweep
from _report import markdown_table, pyplot, write_results, write_table

HERE = Path(__file__).resolve().parent
RECIPES = HERE / "recipes" / "galore_gap"
RESULTS = HERE / "results" / "galore_gap"
STUDIES = ("batch4", "batch16", "refresh")
METHODS = ("adamw", "galore")
BATCH = {"": 1, "batch4": 4, "batch16": 16}  # tokens per step, as a multiple of the comparison's


def _config(rec: dict[str, Any]) -> dict[str, Any]:
    return rec["meta"].get("config") or {}


def _point(rec: dict[str, Any] | None) -> dict[str, Any] | None:
    """What the table needs of one run on record: final validation loss, steps, tokens per step, T."""
    if rec is None:
        return None
    cfg, res = _config(rec), rec["results"]
    gap = (cfg.get("galore") or {}).get("update_proj_gap") if (cfg.get("optim") or {}).get("name") != "adamw" else None
    return {
        "val_loss": res["final_val_loss"],
        "ppl": sweep._ppl(res["final_val_loss"]),
        "steps": cfg["steps"],
        "tokens_per_step": cfg["batch_size"] * cfg["seq_len"],
        "update_proj_gap": gap,
        "eval_tokens": cfg.get("eval_tokens"),
        "commit": res.get("git_commit", "")[:8],
    }


def _study_run(study: str, recipe: str) -> dict[str, Any] | None:
    """The study recipe's one run on record (its grid point), or None."""
    names = records.runs(RESULTS / study, recipe)
    return records.run_record(RESULTS / study, recipe, names[0]) if len(names) == 1 else None


def _comparison_runs() -> dict[str, dict[str, Any] | None]:
    """The comparison's seed-0 long runs of ``adamw`` and ``galore`` at the learning rates their lr checks chose
    (the 1× point), read from one table-only pass of the harness over the two recipes."""
    folder = sweep.RECIPES
    protocol = sweep.load_protocol(folder / "protocol.yaml")
    recipes = {n: sweep.load_recipe(folder / f"{n}.yaml", protocol) for n in sweep.recipe_names(folder)}
    s = sweep.Sweep(protocol, recipes, [], sweep.RESULTS, Path("/nonexistent"))
    with contextlib.redirect_stdout(io.StringIO()):
        s.run(list(METHODS), sweep.STAGES, train_it=False, allow_dirty=False)
    out = {}
    for name in METHODS:
        r = recipes[name]
        run = sweep.Run(r, "long", s.long_lr(r), protocol.grid_seed) if s.check_done(r) else None
        out[name] = records.run_record(sweep.RESULTS, name, run.key) if run in s.done else None
    return out


def _curve(rec: dict[str, Any] | None) -> list[tuple[int, float]]:
    return sorted((m["step"], m["val_loss"]) for m in (rec or {}).get("metrics", []) if "val_loss" in m)


def matched_gap(adamw: list[tuple[int, float]], galore: list[tuple[int, float]], loss: float) -> dict | None:
    """GaLore's minus AdamW's validation loss in the 1× runs where AdamW's curve first reaches ``loss``
    (linear in the step between evaluations): the gap at the same progress, for a larger batch's final loss.
    None when AdamW's curve never reaches it or the two were not evaluated at the same steps."""
    g = dict(galore)
    for (s0, a0), (s1, a1) in zip(adamw, adamw[1:], strict=False):
        if a0 >= loss >= a1 and s0 in g and s1 in g:
            w = (a0 - loss) / (a0 - a1) if a0 != a1 else 0.0
            return {"step": s0 + w * (s1 - s0), "gap": (1 - w) * (g[s0] - a0) + w * (g[s1] - a1)}
    return None


def collect() -> dict[str, Any]:
    """Every point of the two studies (None where a run is missing), and for each larger batch the 1× runs'
    gap where AdamW's curve reaches that batch's final AdamW loss."""
    one = _comparison_runs()
    curves = {m: _curve(rec) for m, rec in one.items()}  # the 1x runs' validation curves
    batch = {}
    for study, mult in BATCH.items():
        recs = {m: _study_run(study, m) for m in METHODS} if study else one
        batch[str(mult)] = {m: _point(rec) for m, rec in recs.items()}
        a = batch[str(mult)]["adamw"]
        matched = matched_gap(curves["adamw"], curves["galore"], a["val_loss"]) if study and a else None
        batch[str(mult)]["matched_1x"] = matched
    refresh = {str(t): _point(_study_run("refresh", f"galore_t{t}")) for t in (25, 50, 200)}
    refresh["100"] = batch["1"]["galore"]  # the comparison's own setting
    refresh = {t: refresh[t] for t in sorted(refresh, key=int)}
    return {"batch": batch, "refresh": refresh, "adamw_800": batch["1"]["adamw"]}


def table(res: dict[str, Any]) -> str:
    rows = []
    for mult, pts in res["batch"].items():
        a, g, m = pts["adamw"], pts["galore"], pts.get("matched_1x")
        ref = g or a
        rows.append(
            [
                f"batch ×{mult}",
                f"{ref['tokens_per_step']:,}" if ref else "-",
                ref["steps"] if ref else "-",
                g["update_proj_gap"] if g else "-",
                f"{a['ppl']:.2f}" if a else "-",
                f"{g['ppl']:.2f}" if g else "-",
                f"{g['ppl'] / a['ppl']:.3f}" if a and g else "-",
                f"{g['val_loss'] - a['val_loss']:+.4f}" if a and g else "-",
                f"{m['gap']:+.4f} (step {m['step']:.0f})" if m else "-",
                ", ".join(sorted({p["commit"] for p in (a, g) if p})) or "-",
            ]
        )
    a = res["adamw_800"]
    for t, g in res["refresh"].items():
        rows.append(
            [
                f"T = {t}",
                f"{g['tokens_per_step']:,}" if g else "-",
                g["steps"] if g else "-",
                t,
                f"{a['ppl']:.2f}" if a else "-",
                f"{g['ppl']:.2f}" if g else "-",
                f"{g['ppl'] / a['ppl']:.3f}" if a and g else "-",
                f"{g['val_loss'] - a['val_loss']:+.4f}" if a and g else "-",
                "-",
                g["commit"] if g else "-",
            ]
        )
    header = "setting | tokens per step | steps | T (steps per projector) | AdamW ppl | GaLore ppl | GaLore ÷ AdamW"
    header += " | Δ loss | Δ loss of the ×1 runs where AdamW's loss is the same"
    return markdown_table(header + " | commits", rows)


def figure(res: dict[str, Any], path: Path) -> Path | None:
    """Left: GaLore ÷ AdamW against the batch multiple; right: against T. None while no point exists."""
    batch = [
        (int(m), p["galore"]["ppl"] / p["adamw"]["ppl"]) for m, p in res["batch"].items() if p["adamw"] and p["galore"]
    ]
    a = res["adamw_800"]
    refresh = [(int(t), g["ppl"] / a["ppl"]) for t, g in res["refresh"].items() if g and a]
    if not batch and not refresh:
        return None
    plt = pyplot()
    fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.4), sharey=True)
    for ax, pts, label in ((left, batch, "tokens per step (× 4,096)"), (right, refresh, "T (steps per projector)")):
        ax.set_xscale("log", base=2)
        if pts:
            ax.plot(*zip(*pts, strict=True), "o-")
            ax.set_xticks([x for x, _ in pts], [str(x) for x, _ in pts])
        ax.set_xlabel(label)
        ax.axhline(1.0, color="grey", lw=0.8)
        ax.grid(alpha=0.3)
    left.set_ylabel("GaLore ppl ÷ AdamW ppl")
    left.set_title("same tokens, larger batches")
    right.set_title("batch ×1, 800 steps")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--table-only", action="store_true", help="train nothing: the table from the runs on record")
    mode.add_argument("--check", action="store_true", help="re-run every study recipe's canary, then the table")
    mode.add_argument("--dry-run", action="store_true", help="list the runs that would train")
    ap.add_argument("--lock", type=Path, default=None, help="hold an exclusive flock on this file while a run trains")
    a = ap.parse_args(argv)
    flags = [f for f, on in (("--table-only", a.table_only), ("--dry-run", a.dry_run)) if on]
    flags += ["--lock", str(a.lock)] if a.lock else []
    bad = 0
    for study in STUDIES:
        head = ["--check"] if a.check else ["all"]
        args = [*head, "--recipes-dir", str(RECIPES / study), "--results", str(RESULTS / study)]
        code = sweep.main([*args, "--runs", str(sweep.ROOT / "runs" / "galore_gap" / study), *flags])
        if code == 2:
            return 2
        bad += code
    if a.dry_run:
        return 0
    res = collect()
    md = table(res)
    write_table(RESULTS, md)
    write_results(RESULTS, res)
    png = figure(res, RESULTS / "galore_gap.png")
    print(md + (f"\n\nfigure: {png}" if png else ""))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
