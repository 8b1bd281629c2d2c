#!/usr/bin/env bash
# The whole device command: install what the image lacks, print versions, run the accelerator suite.
#
#   bash experiments/device_run.sh            # a lent GPU (run tool, carry: build/device_wheels), a TPU VM, Colab
#   bash experiments/device_run.sh --smoke    # the CPU rehearsal: tiny sizes, same steps
#
# Before: `python experiments/device_wheels.py` here (the wheel folder, build/device_wheels). The image
# has jax, flax, optax, orbax but not this project's other imports and no network, so they are
# installed from that folder (pip --no-index --target into a fresh directory, or the matching wheels
# unpacked there when the image has no pip) and put on PYTHONPATH with the repository and
# experiments/. Results go to $OUT/gpu_suite (the run tool brings $OUT back; elsewhere $OUT defaults
# to build/device_out), the whole log to $OUT/device_run.log. The suite writes its results after
# every section and runs each section in its own process, so a failure or the time limit loses only
# what was not yet measured. Environment: PYTHON (python3), DEVICE_WHEELS (build/device_wheels),
# DEVICE_BUDGET (seconds for the suite: 420). Extra arguments go to experiments/gpu_suite.py.
set -uo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
OUT="${OUT:-$ROOT/build/device_out}"
WHEELS="${DEVICE_WHEELS:-$ROOT/build/device_wheels}"
BUDGET="${DEVICE_BUDGET:-420}"
mkdir -p "$OUT"
exec > >(tee -a "$OUT/device_run.log") 2>&1
echo "[device_run] start $(date -u +%H:%M:%S) root=$ROOT out=$OUT budget=${BUDGET}s args=$*"

VENDOR="$(mktemp -d)/site"
mkdir -p "$VENDOR"
if "$PY" -c 'import pydantic, sys; sys.exit(int(pydantic.VERSION.split(".")[0]) < 2)' 2>/dev/null; then
  echo "[device_run] pydantic present in the image"
elif [ -f "$WHEELS/requirements.txt" ]; then
  if "$PY" -m pip --version >/dev/null 2>&1; then
    "$PY" -m pip install -q --no-index --find-links "$WHEELS" --target "$VENDOR" -r "$WHEELS/requirements.txt" \
      || echo "[device_run] pip install from $WHEELS failed"
  fi
  if ! PYTHONPATH="$VENDOR" "$PY" -c 'import pydantic' 2>/dev/null; then
    echo "[device_run] unpacking the matching wheels of $WHEELS into $VENDOR"
    "$PY" - "$WHEELS" "$VENDOR" <<'EOF'
import platform, sys, zipfile
from pathlib import Path

wheels, vendor = Path(sys.argv[1]), sys.argv[2]
cp, arch = f"cp{sys.version_info[0]}{sys.version_info[1]}", platform.machine()
for whl in sorted(wheels.glob("*.whl")):
    tags = whl.name[:-4].split("-")[-3:]
    if tags[-1] == "any" or (tags[0] == cp and arch in tags[-1]):
        zipfile.ZipFile(whl).extractall(vendor)
        print("  unpacked", whl.name)
EOF
  fi
else
  echo "[device_run] no pydantic and no wheel folder at $WHEELS (run experiments/device_wheels.py first)"
fi
export PYTHONPATH="$VENDOR:$ROOT:$ROOT/experiments${PYTHONPATH:+:$PYTHONPATH}"

"$PY" - <<'EOF'
import importlib.metadata as md
import platform, subprocess

print(f"[device_run] python {platform.python_version()} on {platform.machine()}")
names = ["jax", "jaxlib", "jax-cuda13-plugin", "jax-cuda12-plugin", "libtpu", "flax", "optax", "orbax-checkpoint"]
names += ["numpy", "triton", "torch", "pydantic", "pydantic_core"]
found = []
for name in names:
    try:
        found.append(f"{name} {md.version(name)}")
    except md.PackageNotFoundError:
        pass
print("[device_run] " + ", ".join(found))
try:
    print("[device_run] " + subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True).stdout.strip())
except OSError:
    print("[device_run] no nvidia-smi")
EOF
"$PY" -c 'import jax; print("[device_run] backend", jax.default_backend(), jax.devices())' \
  || echo "[device_run] jax cannot start its backend"

timeout -k 15 $((BUDGET + 120)) "$PY" "$ROOT/experiments/gpu_suite.py" --out "$OUT/gpu_suite" --budget "$BUDGET" "$@"
code=$?
echo "[device_run] gpu_suite exit $code, end $(date -u +%H:%M:%S); results in $OUT/gpu_suite"
exit $code
