"""Prepare the wheel folder ``experiments/device_run.sh`` installs from on a machine without network.

    python experiments/device_wheels.py                       # -> build/device_wheels (ignored by git)
    python experiments/device_wheels.py --out DIR --python 3.12 3.13

A lent accelerator's image has jax, flax, optax, orbax (and on GPUs triton and torch) but not this
project's other imports, and it cannot reach a package index. This script downloads, here, the
wheels of :data:`PACKAGES` and all their dependencies for every Python version and CPU architecture
the image might have (binary wheels differ per ``cpXY`` and per ``x86_64`` / ``aarch64``), pinned to
the versions this environment runs, and writes:

* ``requirements.txt`` — the pinned top-level packages, which the device script installs with
  ``pip install --no-index --find-links DIR --target ...``;
* ``manifest.json`` — every wheel's name, size and sha256, and which targets could not be served.

The folder travels to the device with the working tree (the run tool's ``carry``: ``build/device_wheels``).
"""

from __future__ import annotations

import argparse
import hashlib
import importlib.metadata as md
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# what lowrank_jax imports that a jax + flax + optax + orbax image lacks
PACKAGES = ("pydantic",)
PYTHONS = ("3.12", "3.13", "3.14")
PLATFORMS = ("manylinux2014_x86_64", "manylinux2014_aarch64")


def pinned(names: tuple[str, ...]) -> list[str]:
    """``name==version`` of each package as installed in this interpreter (unpinned when not installed)."""
    out = []
    for name in names:
        try:
            out.append(f"{name}=={md.version(name)}")
        except md.PackageNotFoundError:
            out.append(name)
    return out


def download(reqs: list[str], dest: Path, python: str, platform: str) -> str | None:
    """``pip download`` of ``reqs`` and their dependencies as binary wheels for one target; the error or None."""
    cmd = [sys.executable, "-m", "pip", "download", "-q", "--only-binary=:all:", "--dest", str(dest)]
    cmd += ["--python-version", python, "--platform", platform, "--implementation", "cp", *reqs]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    return None if proc.returncode == 0 else (proc.stderr.strip().splitlines() or ["pip failed"])[-1][:300]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(ROOT / "build" / "device_wheels"), help="wheel folder (build/device_wheels)")
    p.add_argument("--python", nargs="+", default=list(PYTHONS), help=f"Python versions ({' '.join(PYTHONS)})")
    p.add_argument("--platform", nargs="+", default=list(PLATFORMS), help="wheel platform tags")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    reqs = pinned(PACKAGES)
    failed = {}
    for python in args.python:
        for platform in args.platform:
            err = download(reqs, out, python, platform)
            if err:
                failed[f"cp{python.replace('.', '')}-{platform}"] = err
            print(f"device_wheels: python {python} {platform}: {err or 'ok'}", flush=True)
    (out / "requirements.txt").write_text("\n".join(reqs) + "\n")
    wheels = sorted(out.glob("*.whl"))
    manifest = {
        "requirements": reqs,
        "pythons": args.python,
        "platforms": args.platform,
        "not_served": failed,
        "wheels": [
            {"file": w.name, "bytes": w.stat().st_size, "sha256": hashlib.sha256(w.read_bytes()).hexdigest()}
            for w in wheels
        ],
    }
    (out / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    total = sum(w.stat().st_size for w in wheels)
    missing = sorted(failed) or "none"
    print(f"device_wheels: {len(wheels)} wheels, {total / 2**20:.1f} MiB in {out}; not served: {missing}")
    return 1 if len(failed) == len(args.python) * len(args.platform) else 0


if __name__ == "__main__":
    sys.exit(main())
