"""Run records: ``metrics.jsonl``, the loss-curve PNG, the provenance block of results.json, and the
measurements the loop logs beside the losses: model FLOPs utilisation (:func:`model_flops_utilization`,
None where the device's peak is unknown, e.g. CPUs: then the scalar is left out) and the allocator's
counters of the local devices (:func:`device_memory_gib`, empty on CPU)."""

from __future__ import annotations

import json
import math
import os
import subprocess
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import jax

from lowrank_jax.config import Config
from lowrank_jax.models import flops


class MetricsLog:
    """Append-only JSONL of per-step records. On resume, records past the restored step are dropped.

    With ``enabled=False`` (a non-primary process of a multi-host run) nothing is read or written.
    """

    def __init__(self, path: str | Path, resume_step: int | None = None, enabled: bool = True):
        self.path = Path(path)
        self._f = None
        if not enabled:
            return
        records = read_metrics(self.path) if resume_step is not None else []
        kept = [r for r in records if r["step"] <= (resume_step or 0)]
        with open(self.path, "w") as f:
            for r in kept:
                f.write(json.dumps(r) + "\n")
        self._f = open(self.path, "a")  # closed in close()

    def write(self, record: dict[str, Any]) -> None:
        if self._f is not None:
            self._f.write(json.dumps(record) + "\n")

    def flush(self) -> None:
        if self._f is not None:
            self._f.flush()

    def close(self) -> None:
        if self._f is not None:
            self._f.close()


def read_metrics(path: str | Path) -> list[dict[str, Any]]:
    """Records of a metrics.jsonl; a torn last line (killed process) is ignored."""
    p = Path(path)
    if not p.is_file():
        return []
    out = []
    for line in p.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            break
    return out


def plot_losses(records: list[dict[str, Any]], path: str | Path, title: str = "") -> None:
    """Training loss (raw and smoothed) and validation loss against tokens seen."""
    # A bare Figure renders with Agg on savefig and leaves pyplot's backend alone (a notebook keeps
    # its inline plots after a run); imported here to keep start-up light.
    from matplotlib.figure import Figure

    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_loss" in r]
    fig = Figure(figsize=(7, 4.2), dpi=110)
    ax = fig.subplots()
    if train:
        x = [r["tokens"] for r in train]
        y = [r["loss"] for r in train]
        ax.plot(x, y, color="tab:blue", alpha=0.3, lw=0.8, label="train loss")
        k = max(1, len(y) // 50)
        smooth = [sum(y[max(0, i - k + 1) : i + 1]) / len(y[max(0, i - k + 1) : i + 1]) for i in range(len(y))]
        ax.plot(x, smooth, color="tab:blue", lw=1.6, label=f"train loss (mean of {k})")
    if val:
        ax.plot(
            [r["tokens"] for r in val], [r["val_loss"] for r in val], "o-", color="tab:red", label="validation loss"
        )
    ax.set_xlabel("tokens")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)


def fmt_bytes(n: float) -> str:
    """Human-readable binary size: 1.5 MiB."""
    for unit in ("B", "KiB", "MiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[2]
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, timeout=5)
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def provenance() -> dict[str, Any]:
    """jax version, backend and device kind, device count, git commit."""
    dev = jax.devices()[0]
    return {
        "jax_version": jax.__version__,
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "git_commit": git_commit(),
        "cpu_count": os.cpu_count(),
    }


def write_json(path: str | Path, obj: dict[str, Any]) -> None:
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")
    os.replace(tmp, path)


def model_flops_utilization(cfg: Config, tokens_per_s: float, device_kind: str, n_devices: int = 1) -> float | None:
    """MFU of a run of ``cfg`` that trains ``tokens_per_s`` tokens/s (all devices together) on ``n_devices``.

    Model FLOPs per token from :func:`lowrank_jax.models.flops.train_flops_per_token` (dense
    count, remat not counted) at ``cfg.model.dtype``'s peak; None where the peak of ``device_kind``
    is unknown (CPUs, unlisted chips). ``cfg.model.vocab_size`` must be set.
    """
    if n_devices <= 0:
        raise ValueError(f"n_devices: must be positive, got {n_devices}")
    peak = flops.peak_flops(device_kind, cfg.model.dtype)
    if peak is None or not math.isfinite(tokens_per_s):
        return None
    return flops.mfu(tokens_per_s * flops.train_flops_per_token(cfg.model, cfg.seq_len), peak * n_devices)


def device_memory_gib(devices: Sequence[Any] | None = None) -> dict[str, float]:
    """Allocator counters of the local devices in GiB: ``in_use_gib`` / ``peak_gib`` (max over devices),
    ``limit_gib`` (min). Empty where the backend keeps no counters (CPU's ``memory_stats()`` is None).
    """
    if devices is None:
        devices = jax.local_devices()
    stats = [s for s in (d.memory_stats() for d in devices) if s]
    out: dict[str, float] = {}
    for key, name, pick in (
        ("bytes_in_use", "in_use_gib", max),
        ("peak_bytes_in_use", "peak_gib", max),
        ("bytes_limit", "limit_gib", min),
    ):
        vals = [s[key] for s in stats if key in s]
        if vals:
            out[name] = pick(vals) / 2**30
    return out
