"""Sharded training on 8 fake CPU devices: same losses as one device; golden llama_7b sharding specs."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

HERE = Path(__file__).resolve().parents[1]
GOLDEN = HERE / "golden" / "llama_7b_shardings.json"


def _run(*args: str) -> dict:
    out = subprocess.run(
        [sys.executable, str(HERE / "sharded_check.py"), *args], capture_output=True, text=True, timeout=900
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout)


@pytest.mark.parametrize(
    "method",
    [
        "full",  # 16 s: the mesh losses equal one device's
        # 73 s: the stacked projector refresh, mapped over the layers, on 8 CPU devices
        pytest.param("galore", marks=pytest.mark.slow),
        pytest.param("sl", marks=pytest.mark.slow),
        pytest.param("relora", marks=pytest.mark.slow),
        pytest.param("adamw8bit", marks=pytest.mark.slow),
        pytest.param("galore8bit", marks=pytest.mark.slow),
        pytest.param("galore8bit_layerwise", marks=pytest.mark.slow),
        pytest.param("bitlinear", marks=pytest.mark.slow),
        # APOLLO's seeded projections, Fira's residual and GoLore's switch to random projectors
        *(pytest.param(m, marks=pytest.mark.slow) for m in ("apollo", "apollo_mini", "fira", "golore")),
    ],
)
def test_meshes_give_the_one_device_losses(method):
    got = _run("losses", method)
    ref = np.asarray(got.pop("1,1,1"))
    assert len(got) == 3 and ref[-1] != ref[0]
    for mesh, losses in got.items():
        np.testing.assert_allclose(np.asarray(losses), ref, rtol=2e-5, err_msg=mesh)


def test_llama_7b_shardings_match_the_golden_file():
    """Param and 8-bit GaLore state specs on a (2,2,2) mesh; UPDATE_GOLDEN=1 rewrites the file."""
    specs = _run("specs")
    if os.environ.get("UPDATE_GOLDEN"):
        GOLDEN.write_text(json.dumps(specs, indent=1, sort_keys=True) + "\n")
    golden = json.loads(GOLDEN.read_text())
    assert specs == golden
    # spot checks of the rules: kernels over fsdp/tensor, GaLore rank dims whole, 8-bit codes like their array
    assert specs[".params['blocks']['mlp']['up']['kernel']"] == "(None, 'fsdp', 'tensor')"
    assert specs[".opt_state[1][0].proj_in['blocks']['mlp']['up']['kernel']"] == "(None, 'fsdp', None)"  # (L, in, r)
    # low-rank (L, r, out) moment: codes (L, r, out / 256, 256), nothing aligned, split on the largest dim
    up_codes = ".opt_state[1][0].inner_state.mu['blocks']['mlp']['up']['kernel'].codes"
    assert specs[up_codes] == "(None, 'fsdp', None, None)"
    # embed (vocab, embed) moment: codes (vocab, embed / 256, 256) shard like the embedding
    assert specs[".opt_state[1][0].inner_state.mu['embed'].codes"] == "('tensor', 'fsdp', None)"
