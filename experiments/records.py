"""Packed run records: many small JSON records kept as one xz-compressed file.

A pack is a mapping ``name -> record`` (JSON objects) serialised as JSON with sorted keys and no
whitespace, then compressed with xz (preset 9, CRC64). The same records always give the same bytes,
so a pack only changes in git when a record does, and a rewrite of an unchanged pack is a no-op.

The comparison harness (``experiments/sweep.py``) keeps one pack per recipe at
``experiments/results/sweep/runs/RECIPE.json.xz``; each record is one finished run named
``STAGE/RUN`` (e.g. ``short/lr0.001_seed0``) with three parts:

* ``results`` — what ``lowrank_jax.train.loop.train`` returned (its ``results.json``);
* ``metrics`` — the run's ``metrics.jsonl`` records, in order;
* ``meta`` — how the harness ran it: the equivalent ``lowrank-jax train`` command, the commit, whether
  the checkout was dirty, and the config it asked for.

Reading::

    from records import runs, run_record
    runs(RESULTS, "adamw")                                     # ['long/lr0.001_seed0', ..., 'short/lr0.004_seed0']
    run_record(RESULTS, "adamw", "short/lr0.001_seed0")["results"]["final_val_loss"]
"""

from __future__ import annotations

import functools
import json
import lzma
import math
import os
from pathlib import Path
from typing import Any

import numpy as np

SUFFIX = ".json.xz"
_PRESET = 9 | lzma.PRESET_EXTREME
FLOAT32_KEYS = "metrics_float32"  # in a packed run record: its metrics written as float32 text


def _float32_text(v: float) -> float:
    """The shortest decimal that reads back as the same float32 (``np.float32`` prints it)."""
    return float(str(np.float32(v)))


def _is_float32(v: Any) -> bool:
    return isinstance(v, float) and math.isfinite(v) and float(np.float32(_float32_text(v))) == v


def _compact(record: Any) -> Any:
    """A run record with its metrics' float32 values written in their shortest float32 text.

    Training metrics come off the device as float32, but JSON writes them in float64's 17 digits; the
    float32 text is about half as long and reads back to the very same value through ``np.float32``.
    The keys written so are listed in :data:`FLOAT32_KEYS`; any other value is kept as it is.
    """
    metrics = record.get("metrics") if isinstance(record, dict) else None
    if not isinstance(metrics, list) or FLOAT32_KEYS in record:
        return record
    keys = sorted({k for m in metrics for k in m})
    f32 = [k for k in keys if all(_is_float32(m[k]) for m in metrics if k in m)]
    short = [{k: _float32_text(v) if k in f32 else v for k, v in m.items()} for m in metrics]
    return {**record, "metrics": short, FLOAT32_KEYS: f32}


def _expand(record: Any) -> Any:
    """The inverse of :func:`_compact`: the listed metrics back to the float32 values they stand for."""
    if not isinstance(record, dict) or FLOAT32_KEYS not in record:
        return record
    f32 = set(record.pop(FLOAT32_KEYS))
    record["metrics"] = [{k: float(np.float32(v)) if k in f32 else v for k, v in m.items()} for m in record["metrics"]]
    return record


def encode(records: dict[str, Any]) -> bytes:
    """The pack's bytes: sorted, compact JSON (NaN and infinities as JSON's extensions), xz-compressed."""
    compact = {name: _compact(record) for name, record in records.items()}
    text = json.dumps(compact, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return lzma.compress(text.encode(), format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, preset=_PRESET)


def decode(data: bytes) -> dict[str, Any]:
    return {name: _expand(record) for name, record in json.loads(lzma.decompress(data).decode()).items()}


@functools.lru_cache(maxsize=64)
def _cached(path: str, mtime_ns: int, size: int) -> dict[str, Any]:
    return decode(Path(path).read_bytes())


def read_pack(path: str | Path) -> dict[str, Any]:
    """The records of the pack at ``path`` (``{}`` when there is none).

    The top-level mapping is a fresh copy; the records themselves are shared between calls and must
    not be modified in place.
    """
    p = Path(path)
    try:
        st = p.stat()
    except FileNotFoundError:
        return {}
    return dict(_cached(str(p), st.st_mtime_ns, st.st_size))


def write_pack(path: str | Path, records: dict[str, Any]) -> Path:
    """Write ``records`` as the pack at ``path`` (atomic replace; parent folders created); returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    data = encode(records)
    if p.is_file() and p.read_bytes() == data:
        return p
    tmp = p.with_name(p.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, p)
    return p


def put(path: str | Path, name: str, record: dict[str, Any]) -> Path:
    """Add (or replace) one record of the pack at ``path``, rewriting the pack."""
    records = read_pack(path)
    records[name] = record
    return write_pack(path, records)


# The harness's packs: one per recipe under RESULTS/runs.


def pack_path(results: str | Path, recipe: str) -> Path:
    return Path(results) / "runs" / f"{recipe}{SUFFIX}"


def runs(results: str | Path, recipe: str) -> list[str]:
    """The names (``STAGE/RUN``) of the recipe's finished runs, sorted."""
    return sorted(read_pack(pack_path(results, recipe)))


def run_record(results: str | Path, recipe: str, name: str) -> dict[str, Any] | None:
    """One run's record (``results``, ``metrics``, ``meta``), or None when it is not on record."""
    return read_pack(pack_path(results, recipe)).get(name)


def put_run(results: str | Path, recipe: str, name: str, record: dict[str, Any]) -> Path:
    """File a finished run into its recipe's pack."""
    missing = {"results", "metrics", "meta"} - set(record)
    if missing:
        raise ValueError(f"a run record needs results, metrics and meta; {sorted(missing)} missing")
    return put(pack_path(results, recipe), name, record)
