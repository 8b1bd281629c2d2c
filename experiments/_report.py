"""What every experiment script writes: markdown tables, results.json with provenance, PNG plots, timings.

docs/design.md ("Results" section): every experiment script writes ``results.json`` (metrics + config + jax version +
device kind + git commit) and a PNG plot into its out dir, and the tables in experiments/results/ are
produced by scripts, never typed by hand. The scripts share these helpers for it:

* :func:`markdown_table` — ``| a | b |`` rows under a ``|---|---|`` rule;
* :func:`write_table` / :func:`write_results` / :func:`write_record` — ``table.md``, ``results.json`` with
  :func:`lowrank_jax.train.metrics.provenance` merged in, or any JSON record (out dir created);
* :func:`subplots` / :func:`save_figure` — a figure on the Agg backend, and the tail of every plot
  (grid and legend on each panel, tight layout, write, close);
* :func:`median_seconds` / :func:`step_seconds` — wall-clock timings blocked on the device.
"""

from __future__ import annotations

import platform
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import jax

from lowrank_jax.train.metrics import provenance, write_json

GRID = {"alpha": 0.3}


def markdown_table(header: str | Sequence[str], rows: Iterable[Sequence[Any]]) -> str:
    """A GitHub markdown table (every column left to the renderer's default), without a trailing newline.

    ``header``: the column names, or one string of them separated by ``|``; ``rows``: cells (``str()`` of each).
    """
    if isinstance(header, str):
        header = [name.strip() for name in header.split("|")]

    def line(cells: Sequence[Any]) -> str:
        return "| " + " | ".join(str(c) for c in cells) + " |"

    return "\n".join([line(header), "|" + "---|" * len(header), *(line(r) for r in rows)])


def counts_text(counts: Iterable[int]) -> str:
    """Counts as a table cell: ``'32,768, 262,144'``; ``'-'`` for none."""
    return ", ".join(f"{n:,}" for n in counts) or "-"


def write_table(out_dir: str | Path, md: str, name: str = "table.md") -> Path:
    """Write ``md`` plus a final newline to ``out_dir/name`` (creating ``out_dir``); returns the path."""
    path = Path(out_dir) / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(md + "\n")
    return path


def write_record(path: str | Path, obj: dict[str, Any]) -> Path:
    """``obj`` as sorted, indented JSON at ``path`` (atomic replace; parent folders created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json(path, obj)
    return path


def write_results(out_dir: str | Path, results: dict[str, Any], name: str = "results.json") -> Path:
    """``out_dir/results.json``: ``results`` with the provenance block (jax version, backend, device kind and
    count, git commit, CPU count) merged in at the top level; returns the path."""
    return write_record(Path(out_dir) / name, {**results, **provenance()})


def pyplot() -> Any:
    """``matplotlib.pyplot`` on the non-interactive Agg backend."""
    import matplotlib  # lazy: only plots need it, and the backend is chosen before pyplot loads

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: after matplotlib.use("Agg")

    return plt


def subplots(*args: Any, **kwargs: Any) -> tuple[Any, Any]:
    """``plt.subplots(*args, **kwargs)`` on the Agg backend: ``(fig, axes)``."""
    return pyplot().subplots(*args, **kwargs)


def save_figure(
    fig: Any,
    path: str | Path,
    axes: Iterable[Any] = (),
    *,
    grid: bool | dict[str, Any] = False,
    legend: bool | dict[str, Any] = False,
    dpi: float | None = None,
) -> Path:
    """The tail of every plot: on each of ``axes`` a grid (``True``: ``alpha=0.3``; a dict: ``ax.grid``'s
    keywords) and a legend (``True``: defaults; a dict: ``ax.legend``'s keywords), then tight layout,
    ``fig.savefig(path)`` (at ``dpi`` when given, else the figure's) and close. Returns the path."""
    for ax in axes:
        if grid:
            ax.grid(**(GRID if grid is True else grid))
        if legend:
            ax.legend(**({} if legend is True else legend))
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if dpi is None:
        fig.savefig(path)
    else:
        fig.savefig(path, dpi=dpi)
    pyplot().close(fig)
    return path


def median_seconds(fn: Callable[..., Any], *args: Any, repeats: int) -> float:
    """Median wall seconds of ``repeats`` calls of ``fn(*args)`` after one warm-up call, each blocked on."""
    jax.block_until_ready(fn(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def step_seconds(
    step: Callable[[Any, Any], tuple[Any, Any]], state: Any, inputs: Iterable[Any]
) -> tuple[list[float], Any, Any]:
    """Run ``state, aux = step(state, x)`` for each ``x`` of ``inputs``, blocking on both after every call.

    Returns the wall seconds of each call, the last state and the last ``aux`` (``None`` for no inputs).
    """
    times, aux = [], None
    for x in inputs:
        t0 = time.perf_counter()
        state, aux = step(state, x)
        jax.block_until_ready((state, aux))
        times.append(time.perf_counter() - t0)
    return times, state, aux


def cpu_info() -> tuple[str, str]:
    """The CPU model name and its feature-flags line: the first of each in /proc/cpuinfo (elsewhere
    ``platform.processor()`` and no flags)."""
    found: dict[str, str] = {}
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                found.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    return found.get("model name") or platform.processor() or "unknown", found.get("flags", "")
