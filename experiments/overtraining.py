"""The overtraining study on CPU scale: progressive sensitivity, fine-tune degradation, the linear toy.

Springer, Goyal, Wen, Kumar, Yue, Malladi, Neubig, Raghunathan, "Overtrained Language Models Are
Harder to Fine-Tune", ICML 2025, arXiv 2503.19206. The paper pretrains models on growing token
budgets and finds that (1) the validation-loss increase under a fixed Gaussian perturbation of the
parameters (each tensor's init distribution scaled by λ) rises with the budget, larger λ bending
the curve earlier; (2) fine-tuning every checkpoint with the same hyperparameters gives a U-shaped
final quality vs budget. This script does the same with the repository's ``tiny`` LLaMA on the
Python-stdlib corpus, fine-tuning on the pydoc prose corpus, and asks the question no paper answers:
does the training method (full-rank AdamW, GaLore, ReLoRA, SLTrain) change the sensitivity at
equal tokens?

Parts (each can be run on its own; every part reads what the earlier ones wrote)::

    python experiments/overtraining.py --part pretrain --methods full      # one run per method
    python experiments/overtraining.py --part sensitivity --methods full   # every checkpoint of a run
    python experiments/overtraining.py --part finetune [--ft-lr 3e-3]      # budgets 25/50/100/200
    python experiments/overtraining.py --part groups --methods full galore # noise on one tensor group
    python experiments/overtraining.py --part toy                          # the linear toy
    python experiments/overtraining.py --part report                       # table.md + results.json + plots
    python experiments/overtraining.py --part checkpoints --checkpoints A B C --tokens 1e9 2e9 4e9 \
        --data pretrain.txt --ft-data finetune.jsonl --out DIR             # any list of checkpoints

``--part checkpoints`` runs the study on checkpoints made elsewhere (Hugging Face LLaMA directories, e.g.
a public family's intermediate checkpoints saved locally, model directories of ``lowrank-jax import-hf``
or runs of this project), each labelled with its pretraining tokens, on local text files
(:func:`lowrank_jax.analysis.study_checkpoints`); it writes table.md, results.json and checkpoints.png
into ``--out``.

``--part methods`` runs ``sensitivity`` for every pretrained method (full-rank at every checkpoint, the
others at 25/50/100/200 steps) and then the report; ``--relative rms`` adds RMS-relative noise.
Each method pretrains with its comparison-harness recipe (``experiments/recipes/``, the same protocol:
eps, clipping, per-group learning rates) at the learning rate the sweep chose on record, at the sweep's short
budget (200 steps of ``tiny``), except that the learning rate stays constant after the warmup
(``optim.min_lr_ratio=1``): the budgets are intermediate checkpoints of one run (``checkpoint_every=25``),
and a constant learning rate keeps them comparable (a cosine schedule would anneal the later checkpoints and
mix the effect of annealing into the effect of tokens).
Runs go to ``runs/overtraining/<method>`` (git-ignored); the report and plots to
``experiments/results/overtraining/``, and the records of the parts (``sensitivity_METHOD``,
``sensitivity_groups``, ``finetune_METHOD[_lrLR]``, ``toy``) into one pack there, ``records.json.xz``
(``experiments/records.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import io
import json
import shutil
import sys
import time
from pathlib import Path

import jax
import numpy as np
import records
import sweep
from _report import markdown_table, save_figure, subplots, write_results, write_table

from lowrank_jax.analysis.checkpoints import study_checkpoints
from lowrank_jax.analysis.finetune import finetune_degradation, finetune_token_data, load_params, run_config
from lowrank_jax.analysis.linear_toy import linear_toy
from lowrank_jax.analysis.sensitivity import densify, init_std_tree, parameter_sensitivity
from lowrank_jax.config import load_config
from lowrank_jax.data import eval_batches, prepare_data
from lowrank_jax.train.checkpoint import checkpoint_steps
from lowrank_jax.train.loop import train

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
RUNS = REPO / "runs" / "overtraining"
RESULTS = HERE / "results" / "overtraining"
PACK = RESULTS / "records.json.xz"  # the sensitivity and fine-tune records, by name

# Common recipe: `tiny` (200 steps x 16 x 256 tokens) with a constant lr after warmup and a checkpoint
# every 25 steps (25, 50, ..., 200; the geometric budgets 25/50/100/200 are among them).
COMMON = [
    "optim.min_lr_ratio=1.0",
    "checkpoint_every=25",
    "keep_checkpoints=100",
    "eval_every=25",
    "progress=false",
]
# Each method is its comparison-harness recipe (experiments/recipes/RECIPE.yaml, under the protocol) at the
# learning rate the sweep chose on record at HEAD (experiments/sweep.py: best of the grid on validation loss).
RECIPE_OF: dict[str, str] = {"full": "adamw", "galore": "galore", "relora": "relora", "sl": "sl"}


@functools.cache
def method_overrides(method: str) -> tuple[str, ...]:
    """The protocol's, the recipe's and the chosen lr's overrides of ``method`` (the sweep's short-budget run).

    Raises ``LookupError`` when the recipe's grid has no valid runs on record at HEAD (run
    ``python experiments/sweep.py RECIPE --stage short`` first): the study runs only tuned recipes.
    """
    protocol = sweep.load_protocol(sweep.RECIPES / "protocol.yaml")
    recipes = {n: sweep.load_recipe(sweep.RECIPES / f"{n}.yaml", protocol) for n in sweep.recipe_names()}
    harness = sweep.Sweep(protocol, recipes, [], sweep.RESULTS, REPO / "runs" / "sweep")
    with contextlib.redirect_stdout(io.StringIO()):
        harness.run([RECIPE_OF[method]], ("short",), train_it=False, allow_dirty=False)
    recipe = recipes[RECIPE_OF[method]]
    try:
        lr = harness.chosen_lr(recipe)
    except LookupError as e:
        raise LookupError(f"{e} at HEAD: run `python experiments/sweep.py {recipe.name} --stage short` first") from None
    run = sweep.Run(recipe, "short", lr, protocol.grid_seed)
    return tuple(sweep.run_overrides(run, protocol, []))


def method_config(method: str, extra: list[str] | None = None):
    return load_config("tiny", [*method_overrides(method), *COMMON, f"out_dir={RUNS / method}", *(extra or [])])


def part_pretrain(args) -> None:
    for method in args.methods:
        cfg = method_config(method, args.overrides)
        out = Path(cfg.out_dir)
        if out.exists():
            if not args.force:
                print(f"pretrain {method}: {out} exists (pass --force to redo)")
                continue
            shutil.rmtree(out)
        t0 = time.time()
        res = train(cfg)
        print(f"pretrain {method}: val_loss {res['final_val_loss']:.4f} in {time.time() - t0:.0f}s")


# Sensitivity protocol: λ values, perturbation seeds, held-out tokens (stdlib validation stream).
LAMBDAS = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0)
N_SEEDS = 4
SENS_EVAL_TOKENS = 16384
SENS_KEY = 20250324
# Fine-tuning protocol (fixed for every budget): pydoc prose, AdamW from fresh moments.
FT_STEPS = 40
FT_LR = 1e-3
FT_EVAL_TOKENS = 16384
FT_EVAL_EVERY = 10
# The linear toy: perturbation sizes γ (threshold τ = γ²·(d_in + d_out) = 16 γ²).
TOY_GAMMAS = (0.25, 0.35, 0.5)


def _json(path: Path) -> dict:
    return json.loads(path.read_text()) if path.is_file() else {}


def _record(name: str) -> dict:
    """The study's record ``name`` from its pack (``{}`` when there is none)."""
    return records.read_pack(PACK).get(name, {})


def _save(name: str, record: dict) -> None:
    records.put(PACK, name, json.loads(json.dumps(record)))


def _checkpoints(method: str, only: list[int] | None) -> list[int]:
    steps = checkpoint_steps(RUNS / method / "checkpoints")
    return [s for s in steps if not only or s in only]


def part_sensitivity(args) -> None:
    for method in args.methods:
        steps = _checkpoints(method, args.steps)
        if not steps:
            print(f"sensitivity {method}: no checkpoints under {RUNS / method} (run --part pretrain first)")
            continue
        out_name = f"sensitivity_{method}"
        done = _record(out_name).get("budgets", {})
        for step in steps:
            row = {} if args.force else done.get(str(step), {})
            todo = {
                rel: [lam for lam in LAMBDAS if lam not in {r["lambda"] for r in row.get(rel, {}).get("rows", [])}]
                for rel in args.relative
            }
            if not any(todo.values()):
                continue
            t0 = time.time()
            params, cfg, _ = load_params(RUNS / method / "checkpoints" / str(step))
            val = prepare_data(cfg.data).val
            batches = eval_batches(val, cfg.seq_len, SENS_EVAL_TOKENS, cfg.eval_batch_size)
            row.update({"step": step, "tokens": step * cfg.tokens_per_step})
            for relative, lams in todo.items():
                if not lams:
                    continue
                # Missing λ values are added to a stored table: the draws depend only on (key, seed), and the
                # clean loss is recomputed bit for bit, so merged rows are the rows one call would give.
                tab = parameter_sensitivity(
                    params,
                    batches,
                    lams,
                    N_SEEDS,
                    jax.random.key(SENS_KEY),
                    model_cfg=cfg.model,
                    relative=relative,
                ).to_dict()
                if relative in row:
                    if row[relative]["clean_loss"] != tab["clean_loss"]:
                        raise RuntimeError(f"{method} step {step}: clean loss changed since the stored table")
                    tab["rows"] = sorted(row[relative]["rows"] + tab["rows"], key=lambda r: r["lambda"])
                row[relative] = tab
            done[str(step)] = row
            _save(out_name, {"method": method, "overrides": list(method_overrides(method)), "budgets": done})
            summary = ", ".join(f"λ={r['lambda']:g}: {r['mean_increase']:+.4f}" for r in row["init"]["rows"])
            print(
                f"sensitivity {method} step {step}: clean {row['init']['clean_loss']:.4f}; {summary} "
                f"({time.time() - t0:.0f}s)",
                flush=True,
            )


GROUPS = {
    "embed+lm_head": lambda path: path[0] in ("embed", "lm_head"),
    "block linears": lambda path: path[0] == "blocks" and path[-1] == "kernel",
}


def part_groups(args) -> None:
    """Which tensors carry the sensitivity: noise on one group at a time (init std × λ, step 200 or --steps)."""
    out_name = "sensitivity_groups"
    done = _record(out_name)
    lams = (1.0, 2.0, 4.0)
    for method in args.methods:
        for step in args.steps or [200]:
            ckpt = RUNS / method / "checkpoints" / str(step)
            if not ckpt.is_dir() or (f"{method}/{step}" in done and not args.force):
                continue
            params, cfg, _ = load_params(ckpt)
            dense, dense_cfg = densify(params, cfg.model)
            stds = init_std_tree(dense_cfg, 0)
            batches = eval_batches(prepare_data(cfg.data).val, cfg.seq_len, SENS_EVAL_TOKENS, cfg.eval_batch_size)
            row = {}
            for name, pick in GROUPS.items():
                masked = jax.tree_util.tree_map_with_path(
                    lambda path, sd, pick=pick: sd if pick([getattr(k, "key", None) for k in path]) else None,
                    stds,
                    is_leaf=lambda x: x is None,
                )
                tab = parameter_sensitivity(
                    dense, batches, lams, N_SEEDS, jax.random.key(SENS_KEY), model_cfg=dense_cfg, init_std=masked
                )
                row[name] = tab.to_dict()
            done[f"{method}/{step}"] = row
            _save(out_name, done)
            summary = "; ".join(
                f"{g}: " + ", ".join(f"λ={r['lambda']:g} {r['mean_increase']:+.3f}" for r in t["rows"])
                for g, t in row.items()
            )
            print(f"groups {method} step {step}: {summary}", flush=True)


def _ft_name(method: str, lr: float) -> str:
    return f"finetune_{method}" if lr == FT_LR else f"finetune_{method}_lr{lr:g}"


def part_finetune(args) -> None:
    for method in args.methods:
        steps = _checkpoints(method, args.steps or [25, 50, 100, 200])
        if not steps:
            print(f"finetune {method}: no checkpoints under {RUNS / method}")
            continue
        pre_cfg = run_config(RUNS / method)
        ft = finetune_token_data(pre_cfg, "pydoc")
        pt_val = prepare_data(pre_cfg.data).val
        out_name = _ft_name(method, args.ft_lr)
        done = _record(out_name).get("budgets", {})
        for step in steps:
            if str(step) in done and not args.force:
                continue
            t0 = time.time()
            res = finetune_degradation(
                RUNS / method / "checkpoints" / str(step),
                ft,
                pt_val,
                steps=FT_STEPS,
                lr=args.ft_lr,
                eval_tokens=FT_EVAL_TOKENS,
                eval_every=FT_EVAL_EVERY,
            )
            res["finetune_data"] = ft.info
            done[str(step)] = res
            _save(out_name, {"method": method, "lr": args.ft_lr, "budgets": done})
            print(
                f"finetune {method} step {step}: pydoc {res['ft_loss_before']:.4f} -> {res['ft_loss_after']:.4f}, "
                f"stdlib {res['pt_loss_before']:.4f} -> {res['pt_loss_after']:.4f} ({time.time() - t0:.0f}s)",
                flush=True,
            )


def part_methods(args) -> None:
    """Sensitivity of every pretrained method: full-rank at every checkpoint, the others at the geometric
    budgets (25/50/100/200 steps); then the report."""
    requested = args.steps
    for method in [m for m in RECIPE_OF if (RUNS / m / "checkpoints").is_dir()]:
        args.methods = [method]
        args.steps = requested if (requested or method == "full") else [25, 50, 100, 200]
        part_sensitivity(args)
    part_report(args)


def part_toy(args) -> None:
    res = linear_toy(gammas=TOY_GAMMAS, n_perturb=64, key=jax.random.key(0))
    _save("toy", res.to_dict())
    for inf in res.inflections:
        print(
            f"toy γ={inf.gamma}: τ={inf.threshold:.3f}, first mode below τ k*={inf.mode} "
            f"(s={res.target_singular_values[inf.mode]:g}), predicted window {inf.predicted_window}, "
            f"predicted step {inf.predicted_step}, observed minimum at step {inf.observed_step}"
        )


def _fmt_band(row: dict) -> str:
    if row.get("ci95_high") is None:
        return f"{row['mean_increase']:+.4f}"
    return f"{row['mean_increase']:+.4f} ± {(row['ci95_high'] - row['ci95_low']) / 2:.4f}"


# Grid lines of every panel (log axes: minor ticks too).
GRID = {"alpha": 0.3, "which": "both"}


def _sens_series(sens: dict, relative: str = "init") -> tuple[list[int], dict[float, list[dict]], list[float]]:
    """Budget tokens in order, ``{λ: rows}`` (each row with its budget's step/tokens/clean loss), clean losses."""
    budgets = sorted(sens.get("budgets", {}).values(), key=lambda r: r["step"])
    budgets = [b for b in budgets if relative in b]
    tokens = [b["tokens"] for b in budgets]
    by_lam: dict[float, list[dict]] = {}
    for b in budgets:
        for r in b[relative]["rows"]:
            extra = {"step": b["step"], "tokens": b["tokens"], "clean_loss": b[relative]["clean_loss"]}
            by_lam.setdefault(r["lambda"], []).append({**r, **extra})
    clean = [b[relative]["clean_loss"] for b in budgets]
    return tokens, by_lam, clean


def plot_sensitivity(sens_by_method: dict[str, dict], path: Path) -> None:
    full = sens_by_method.get("full")
    methods = [m for m in RECIPE_OF if m in sens_by_method]
    fig, axes = subplots(1, 3, figsize=(16, 4.6), dpi=110)
    if full:
        tokens, by_lam, clean = _sens_series(full)
        for lam, rows in sorted(by_lam.items()):
            x = [r["tokens"] for r in rows]
            mean = [r["mean_increase"] for r in rows]
            err = [(r["ci95_high"] - r["ci95_low"]) / 2 for r in rows]
            axes[0].errorbar(x, mean, yerr=err, marker="o", capsize=3, label=f"λ={lam:g}")
            axes[1].plot(x, [r["perturbed_loss"] for r in rows], marker="o", label=f"λ={lam:g}")
        axes[1].plot(tokens, clean, "k--", marker="s", label="clean")
    axes[0].set(xscale="log", yscale="log", xlabel="pretraining tokens", ylabel="loss increase (nats/token)")
    axes[0].set_title("full-rank: sensitivity vs budget (95% t-band)")
    axes[1].set(xscale="log", xlabel="pretraining tokens", ylabel="validation loss")
    axes[1].set_title("full-rank: clean and perturbed loss")
    lam_cmp = 1.0
    for m in methods:
        tokens, by_lam, _ = _sens_series(sens_by_method[m])
        if lam_cmp in by_lam:
            rows = by_lam[lam_cmp]
            err = [(r["ci95_high"] - r["ci95_low"]) / 2 for r in rows]
            x = [r["tokens"] for r in rows]
            axes[2].errorbar(x, [r["mean_increase"] for r in rows], yerr=err, marker="o", capsize=3, label=m)
    axes[2].set(xscale="log", yscale="log", xlabel="pretraining tokens", ylabel="loss increase (nats/token)")
    axes[2].set_title(f"methods at equal tokens, λ={lam_cmp:g} (effective weights)")
    save_figure(fig, path, axes, grid=GRID, legend={"fontsize": 8})


def plot_finetune(ft_by_method: dict[str, dict], path: Path) -> None:
    fig, axes = subplots(1, 2, figsize=(11, 4.4), dpi=110)
    for m, ft in ft_by_method.items():
        rows = sorted(ft["budgets"].values(), key=lambda r: r["checkpoint_step"])
        x = [r["pretrain_tokens"] for r in rows]
        axes[0].plot(x, [r["ft_loss_after"] for r in rows], "o-", label=f"{m}: after fine-tuning")
        axes[0].plot(x, [r["ft_loss_before"] for r in rows], "s--", alpha=0.6, label=f"{m}: before")
        axes[1].plot(x, [r["pt_loss_after"] for r in rows], "o-", label=f"{m}: after fine-tuning")
        axes[1].plot(x, [r["pt_loss_before"] for r in rows], "s--", alpha=0.6, label=f"{m}: before")
    axes[0].set(xscale="log", xlabel="pretraining tokens", ylabel="pydoc validation loss")
    axes[0].set_title(f"fine-tune domain ({FT_STEPS} steps, fixed lr per curve)")
    axes[1].set(xscale="log", xlabel="pretraining tokens", ylabel="stdlib validation loss")
    axes[1].set_title("pretraining domain (forgetting)")
    save_figure(fig, path, axes, grid=GRID, legend={"fontsize": 8})


def plot_toy(toy: dict, path: Path) -> None:
    steps = np.asarray(toy["steps"])
    fig, axes = subplots(1, 3, figsize=(16, 4.4), dpi=110)
    learned = np.asarray(toy["learned"])
    for k, s in enumerate(toy["target_singular_values"]):
        axes[0].plot(steps, learned[:, k], label=f"σ_{k + 1} (target {s:g})")
    axes[0].set(xlabel="gradient-descent step", ylabel="u_kᵀ W2 W1 v_k", xscale="symlog")
    axes[0].set_title("learned singular values: largest first")
    axes[1].plot(steps, toy["clean_error"], "k-")
    axes[1].set(xlabel="gradient-descent step", ylabel="clean error ‖W2 W1 − Y‖²", xscale="symlog", yscale="log")
    axes[1].set_title("clean error keeps falling")
    for inf in toy["inflections"]:
        curve = np.asarray(toy["perturbed_error"][str(inf["gamma"])])
        label = f"γ={inf['gamma']:g} (τ={inf['threshold']:.2f})"
        line = axes[2].plot(steps, curve - curve.min(), label=label)
        axes[2].axvline(inf["observed_step"], color=line[0].get_color(), ls=":", lw=1)
        if inf["predicted_window"]:
            axes[2].axvspan(*inf["predicted_window"], color=line[0].get_color(), alpha=0.1)
    axes[2].set(
        xlabel="gradient-descent step", ylabel="perturbed error − its minimum", xscale="symlog", yscale="symlog"
    )
    axes[2].set_title("perturbed error: minimum in the predicted window (shaded)")
    axes[0].legend(fontsize=7)
    axes[2].legend(fontsize=7)
    save_figure(fig, path, axes, grid=GRID)


def part_report(args) -> None:
    sens = {m: _record(f"sensitivity_{m}") for m in RECIPE_OF}
    sens = {m: v for m, v in sens.items() if v.get("budgets")}
    ft = {}
    for name in sorted((n for n in records.read_pack(PACK) if n.startswith("finetune_")), key=lambda n: f"{n}.json"):
        v = _record(name)
        if v.get("budgets"):
            lr = next(iter(v["budgets"].values()))["settings"]["lr"]
            ft[f"{v['method']} lr {lr:g}"] = v
    toy = _record("toy")
    runs = {m: _json(RUNS / m / "results.json") for m in RECIPE_OF}
    runs = {m: r for m, r in runs.items() if r}
    lines = ["# Overtraining study (CPU scale)", ""]
    lines += [
        "Generated by `experiments/overtraining.py --part report` from the JSON files next to it; do not edit.",
        f"Sensitivity: Gaussian noise with each tensor's init std × λ on the effective weights, {N_SEEDS} seeds "
        f"(common random numbers across λ and budgets), {SENS_EVAL_TOKENS:,} held-out stdlib tokens; "
        "mean increase ± half-width of the 95% Student-t band.",
        "",
        "Scale: `tiny` has 1.85M parameters and sees at most 819K tokens (0.44 tokens per parameter), orders of "
        "magnitude below the paper's overtrained regime (~30M-parameter models at billions of tokens). The study "
        "exercises the measurements and shows early-training trends; it cannot reach catastrophic overtraining.",
        "",
    ]
    if runs:
        header = "method | recipe | params | tokens | final val loss | tokens/s (shared CPU: not comparable)"
        cells = [
            [
                m,
                f"`{RECIPE_OF[m]}` at lr {r['config']['optim']['lr']:g}",
                f"{r['params'] / 1e6:.2f}M",
                f"{r['tokens']:,}",
                f"{r['final_val_loss']:.4f}",
                f"{r['tokens_per_s']:,.0f}",
            ]
            for m, r in runs.items()
        ]
        title = "## Pretraining runs (the sweep's recipes at their chosen lr, `tiny`, constant lr after warmup)"
        lines += [title, "", markdown_table(header, cells), ""]
    for m, v in sens.items():
        tokens, by_lam, clean = _sens_series(v)
        lams = sorted(by_lam)
        budgets = sorted(v["budgets"].values(), key=lambda r: r["step"])
        cells = []
        for i, b in enumerate(budgets):
            rows = {r["lambda"]: r for r in b["init"]["rows"]}
            bands = [_fmt_band(rows[lam]) if lam in rows else "-" for lam in lams]
            cells.append([b["step"], f"{b['tokens']:,}", f"{clean[i]:.4f}", *bands])
        header = ["step", "tokens", "clean loss", *(f"Δ loss, λ={lam:g}" for lam in lams)]
        lines += [f"## Sensitivity vs pretraining tokens: {m}", "", markdown_table(header, cells), ""]
        mono = []
        for lam in lams:
            rows = by_lam[lam]
            means = [r["mean_increase"] for r in rows]
            rises = sum(b > a for a, b in zip(means, means[1:], strict=False))
            perturbed = [r["perturbed_loss"] for r in rows]
            best = rows[perturbed.index(min(perturbed))]["step"]
            mono.append(
                [
                    f"{lam:g}",
                    len(rows),
                    f"{rises}/{len(means) - 1}",
                    "yes" if rises == len(means) - 1 else "no",
                    f"{means[-1] / means[0]:.2f}",
                    best,
                ]
            )
        header = (
            "λ | budgets | rises between consecutive budgets | monotone | Δ(last)/Δ(first)"
            " | step of lowest perturbed loss"
        )
        lines += [markdown_table(header, mono), ""]
    if len(sens) > 1:
        for relative, title in (("init", "init std × λ"), ("rms", "tensor RMS × λ")):
            have = {m: v for m, v in sens.items() if any(relative in b for b in v["budgets"].values())}
            if len(have) < 2:
                continue
            common = sorted(
                set.intersection(*({k for k, b in v["budgets"].items() if relative in b} for v in have.values())),
                key=int,
            )
            cells = []
            for st in common:
                for m, v in have.items():
                    b = v["budgets"][st]
                    rows = {r["lambda"]: r for r in b[relative]["rows"]}
                    bands = [_fmt_band(rows[lam]) if lam in rows else "-" for lam in LAMBDAS]
                    cells.append([st, m, f"{b[relative]['clean_loss']:.4f}", *bands])
            header = ["step", "method", "clean loss", *(f"Δ loss, λ={lam:g}" for lam in LAMBDAS)]
            lines += [f"## Methods at equal tokens (effective weights, noise = {title})", ""]
            lines += [markdown_table(header, cells), ""]
    if "full" in sens and len(sens) > 1:
        full_rows = sorted(sens["full"]["budgets"].values(), key=lambda r: r["step"])
        show = [lam for lam in (1.0, 2.0, 4.0) if lam in LAMBDAS]
        cells = []
        for m, v in sens.items():
            if m == "full":
                continue
            for b in sorted(v["budgets"].values(), key=lambda r: r["step"]):
                near = min(full_rows, key=lambda f: abs(f["init"]["clean_loss"] - b["init"]["clean_loss"]))
                mine = {r["lambda"]: r for r in b["init"]["rows"]}
                theirs = {r["lambda"]: r for r in near["init"]["rows"]}
                ratios = [
                    f"{mine[lam]['mean_increase']:+.3f} / {theirs[lam]['mean_increase']:+.3f}"
                    if lam in mine and lam in theirs
                    else "-"
                    for lam in show
                ]
                matched = [f"{b['init']['clean_loss']:.4f}", near["step"], f"{near['init']['clean_loss']:.4f}"]
                cells.append([m, b["step"], *matched, *ratios])
        header = [
            "method",
            "step",
            "clean loss",
            "full-rank step",
            "full-rank clean loss",
            *(f"Δ λ={lam:g}: method / full" for lam in show),
        ]
        lines += [
            "## Methods vs full-rank at matched clean loss (the full-rank checkpoint with the nearest clean loss)",
            "",
            markdown_table(header, cells),
            "",
        ]
    groups = _record("sensitivity_groups")
    if groups:
        header = ["method/step", "group", *(f"Δ loss, λ={lam:g}" for lam in (1.0, 2.0, 4.0))]
        cells = [[key, g, *(_fmt_band(r) for r in t["rows"])] for key, row in groups.items() for g, t in row.items()]
        lines += [
            "## Which tensors carry the sensitivity (noise on one group only, init std × λ)",
            "",
            markdown_table(header, cells),
            "",
        ]
    for m, v in ft.items():
        rows = sorted(v["budgets"].values(), key=lambda r: r["checkpoint_step"])
        header = (
            "step | tokens | pydoc loss before | pydoc loss after | stdlib loss before | stdlib loss after | forgetting"
        )
        cells = [
            [
                r["checkpoint_step"],
                f"{r['pretrain_tokens']:,}",
                *(f"{r[k]:.4f}" for k in ("ft_loss_before", "ft_loss_after", "pt_loss_before", "pt_loss_after")),
                f"{r['forgetting']:+.4f}",
            ]
            for r in rows
        ]
        lines += [
            f"## Fine-tuning on pydoc ({FT_STEPS} steps, AdamW, same hyperparameters for every budget): {m}",
            "",
            markdown_table(header, cells),
            "",
        ]
    if toy:
        cells = []
        for inf in toy["inflections"]:
            k = inf["mode"]
            s_k = toy["target_singular_values"][k] if k is not None else None
            cells.append(
                [
                    f"{inf['gamma']:g}",
                    f"{inf['threshold']:.3f}",
                    f"k={k} (s={s_k:g})",
                    inf["predicted_window"],
                    inf["predicted_step"],
                    inf["observed_step"],
                ]
            )
        header = "γ | τ | first mode with s < τ | predicted window (steps) | predicted step | observed minimum"
        lines += [
            "## Linear toy (two-layer linear network, GD from small init)",
            "",
            f"Target singular values {toy['target_singular_values']}; threshold τ = γ²(d_in + d_out).",
            "",
            markdown_table(header, cells),
            "",
        ]
    write_table(RESULTS, "\n".join(lines))
    if sens:
        plot_sensitivity(sens, RESULTS / "sensitivity.png")
    if ft:
        plot_finetune(ft, RESULTS / "finetune.png")
    if toy:
        plot_toy(toy, RESULTS / "toy.png")
    settings = {
        "common_overrides": COMMON,
        "methods": {m: v.get("overrides") for m, v in sens.items()},
        "lambdas": LAMBDAS,
        "n_seeds": N_SEEDS,
        "sensitivity_eval_tokens": SENS_EVAL_TOKENS,
        "sensitivity_key": SENS_KEY,
        "finetune": {"steps": FT_STEPS, "lr": FT_LR, "eval_tokens": FT_EVAL_TOKENS, "source": "pydoc"},
        "toy_gammas": TOY_GAMMAS,
    }
    results = {
        "settings": settings,
        "pretrain": {
            m: {k: r[k] for k in ("final_val_loss", "tokens", "params", "tokens_per_s", "wall_time_s", "config")}
            for m, r in runs.items()
        },
        "sensitivity": sens,
        "finetune": ft,
        "toy": {k: toy[k] for k in ("settings", "target_singular_values", "half_steps", "inflections")} if toy else {},
    }
    write_results(RESULTS, results)
    print((RESULTS / "table.md").read_text())


def part_checkpoints(args) -> None:
    """The study on ``--checkpoints`` labelled ``--tokens``: sensitivity, fine-tuning, the report in ``--out``."""
    if not args.checkpoints or not args.data or not args.ft_data:
        raise SystemExit(
            "--part checkpoints needs --checkpoints DIR ..., --tokens N ..., --data FILE and --ft-data FILE"
        )
    t0 = time.time()
    recs = study_checkpoints(
        args.checkpoints,
        args.tokens or [],
        args.data,
        args.ft_data,
        lambdas=tuple(args.lambdas),
        n_seeds=args.seeds,
        seq_len=args.seq_len,
        batch_size=args.batch_size,
        eval_tokens=args.eval_tokens,
        ft_steps=args.ft_steps,
        ft_lr=args.ft_lr,
    )
    out = Path(args.out)
    lams = sorted({r["lambda"] for rec in recs for r in rec["sensitivity"]["rows"]})
    header = ["checkpoint", "tokens seen", "clean loss"] + [f"Δloss λ={lam:g}" for lam in lams]
    header += ["ft loss before → after", "pt loss before → after (forgetting)"]
    rows = []
    for rec in recs:
        sens, ft = rec["sensitivity"], rec["finetune"]
        by_lam = {r["lambda"]: r for r in sens["rows"]}
        rows.append(
            [Path(rec["checkpoint"]).name, f"{rec['tokens']:.4g}", f"{sens['clean_loss']:.4f}"]
            + [_fmt_band(by_lam[lam]) for lam in lams]
            + [
                f"{ft['ft_loss_before']:.4f} → {ft['ft_loss_after']:.4f}",
                f"{ft['pt_loss_before']:.4f} → {ft['pt_loss_after']:.4f} ({ft['forgetting']:+.4f})",
            ]
        )
    md = (
        f"# Overtraining study on {len(recs)} checkpoints\n\nSensitivity: mean loss increase on `{args.data}` "
        f"under init-std noise × λ ({args.seeds} seeds, 95% band); fine-tuning: {args.ft_steps} AdamW steps at "
        f"lr {args.ft_lr:g} on `{args.ft_data}`.\n\n" + markdown_table(header, rows)
    )
    write_table(out, md)
    tokens = [rec["tokens"] for rec in recs]
    fig, axes = subplots(1, 2, figsize=(10, 3.6))
    for lam in lams:
        means = [next(r for r in rec["sensitivity"]["rows"] if r["lambda"] == lam)["mean_increase"] for rec in recs]
        axes[0].plot(tokens, means, marker="o", label=f"λ={lam:g}")
    axes[0].set(xlabel="pretraining tokens seen", ylabel="loss increase under noise", title="sensitivity")
    axes[1].plot(tokens, [rec["finetune"]["ft_loss_after"] for rec in recs], marker="o", label="fine-tune domain")
    axes[1].plot(tokens, [rec["finetune"]["pt_loss_after"] for rec in recs], marker="s", label="pretraining domain")
    axes[1].set(xlabel="pretraining tokens seen", ylabel="loss after fine-tuning", title="fine-tune degradation")
    for ax in axes:
        ax.set_xscale("log" if min(tokens) > 0 else "linear")
    save_figure(fig, out / "checkpoints.png", axes, grid=True, legend=True)
    settings = {k: getattr(args, k) for k in ("data", "ft_data", "lambdas", "seeds", "seq_len", "batch_size")}
    settings.update(eval_tokens=args.eval_tokens, ft_steps=args.ft_steps, ft_lr=args.ft_lr)
    write_results(out, {"settings": settings, "checkpoints": recs, "wall_s": time.time() - t0})
    print(md)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parts = ["pretrain", "sensitivity", "methods", "finetune", "toy", "groups", "report", "checkpoints"]
    p.add_argument("--part", required=True, choices=parts)
    p.add_argument("--methods", nargs="+", default=["full"], choices=sorted(RECIPE_OF))
    p.add_argument("--force", action="store_true", help="redo work whose results exist")
    p.add_argument("--steps", nargs="*", type=int, default=None, help="only these checkpoint steps")
    p.add_argument("--relative", nargs="+", default=["init"], choices=["init", "rms"])
    p.add_argument("--ft-lr", type=float, default=FT_LR, help="fine-tuning peak learning rate")
    p.add_argument("overrides", nargs="*", help="extra key=value config overrides for --part pretrain")
    c = p.add_argument_group("--part checkpoints")
    c.add_argument("--checkpoints", nargs="+", help="HF / model / run directories")
    c.add_argument("--tokens", nargs="+", type=float, help="pretraining tokens seen by each checkpoint")
    c.add_argument("--data", help="pretraining-domain text (.txt or .jsonl) for the sensitivity and forgetting")
    c.add_argument("--ft-data", help="fine-tuning text (.txt or .jsonl): 90%% train, 10%% validation")
    c.add_argument("--out", default=str(RESULTS / "checkpoints"), help="where table.md, results.json, the plot go")
    c.add_argument("--lambdas", nargs="+", type=float, default=[0.5, 1.0, 2.0])
    c.add_argument("--seeds", type=int, default=2)
    c.add_argument("--seq-len", type=int, default=128)
    c.add_argument("--batch-size", type=int, default=8)
    c.add_argument("--eval-tokens", type=int, default=8192)
    c.add_argument("--ft-steps", type=int, default=20)
    args = p.parse_args(argv)
    parts = {
        "pretrain": part_pretrain,
        "sensitivity": part_sensitivity,
        "finetune": part_finetune,
        "toy": part_toy,
        "report": part_report,
        "groups": part_groups,
        "methods": part_methods,
        "checkpoints": part_checkpoints,
    }
    parts[args.part](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
