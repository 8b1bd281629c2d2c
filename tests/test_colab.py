"""The Colab notebooks: executed top to bottom on CPU, their runtime detection, and their jupytext .py/.ipynb pairs.

Every notebook but the quickstart reads ``LRJ_COLAB_SIZE`` (the test suite runs the ``smoke`` size) and picks its
size from ``jax.default_backend()`` in its cell tagged ``runtime``; :func:`test_runtime_picks_the_size` runs that
cell alone with the backend faked. The notebooks of :mod:`test_colab_methods` run on the other xdist worker.
"""

from __future__ import annotations

import json
import math
import re
import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

import jax
import jupytext
import nbformat
import pytest
from helpers import REPO

COLAB = REPO / "colab"
KERNEL_NAME = "lrj-test-python"
PAIRS = ["quickstart", "galore", "relora", "sltrain", "ternary", "overtraining", "scale"]
SIZED = [n for n in PAIRS if n != "quickstart"]
BADGE = "https://colab.research.google.com/github/lowrank-jax/lowrank-jax/blob/main/colab/{}.ipynb"


def _install_kernelspec(root: Path) -> None:
    """A kernelspec that starts ipykernel with this test's interpreter (found through JUPYTER_PATH=root)."""
    spec_dir = root / "kernels" / KERNEL_NAME
    spec_dir.mkdir(parents=True)
    spec = {
        "argv": [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"],
        "display_name": f"Python ({sys.executable})",
        "language": "python",
    }
    (spec_dir / "kernel.json").write_text(json.dumps(spec))


def _cell_sources(nb) -> list[tuple[str, str]]:
    return [(c.cell_type, c.source.strip()) for c in nb.cells]


# --------------------------------------------------------------------------------------------
# Pairs and badges
# --------------------------------------------------------------------------------------------


def test_every_notebook_is_covered():
    """A new colab/*.py must be added to PAIRS (and so to the sync test and to a run test)."""
    assert sorted(p.stem for p in COLAB.glob("*.py")) == sorted(PAIRS)
    assert sorted(p.stem for p in COLAB.glob("*.ipynb")) == sorted(PAIRS)


@pytest.mark.parametrize("name", PAIRS)
def test_py_and_ipynb_in_sync(name):
    py, ipynb = COLAB / f"{name}.py", COLAB / f"{name}.ipynb"
    from_py, from_ipynb = jupytext.read(py), jupytext.read(ipynb)
    assert _cell_sources(from_py) == _cell_sources(from_ipynb), (
        f"{ipynb.name} is out of date: run `jupytext --to ipynb colab/{py.name}`"
    )
    # The stored notebook carries no outputs, and it is paired with its percent script.
    stored = nbformat.read(ipynb, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in stored.cells if c.cell_type == "code")
    assert "py:percent" in stored.metadata["jupytext"]["formats"]
    # An "Open in Colab" badge pointing at this very notebook, in the first cell.
    assert stored.cells[0].cell_type == "markdown"
    assert f"]({BADGE.format(name)})" in stored.cells[0].source


def _pyproject() -> dict:
    import tomllib

    return tomllib.loads((REPO / "pyproject.toml").read_text())


@pytest.mark.parametrize("name", PAIRS)
def test_install_cell_pins_the_one_url_and_the_package_version(name):
    """The repository URL is defined once, in pyproject's [project.urls]; every install cell uses it, pinned to the
    tag of the package version; the first cell names the runtime the notebook wants and how to switch."""
    project = _pyproject()["project"]
    url, version = project["urls"]["Repository"], project["version"]
    src = (COLAB / f"{name}.py").read_text()
    assert f'REPO_URL = "{url}"\n' in src and f'VERSION = "{version}"' in src
    assert 'REQUIREMENT = f"lowrank-jax @ git+{REPO_URL}@v{VERSION}"' in src
    assert '"pip", "install", "-q", REQUIREMENT]' in src
    assert src.count("github.com/lowrank-jax/lowrank-jax") == 1  # REPO_URL: no second copy of the URL
    first = nbformat.read(COLAB / f"{name}.ipynb", as_version=4).cells[0].source
    assert "**Runtime:**" in first
    if name != "quickstart":
        assert "Change runtime type" in first and "TPU" in first


# --------------------------------------------------------------------------------------------
# Runtime detection (no notebook is run: the tagged cell is executed alone with a faked backend)
# --------------------------------------------------------------------------------------------

# Knobs that must grow (never shrink) from smoke to cpu to gpu to tpu: the sizes of the model / run.
GROWING = {
    "galore": ("hidden", "layers", "steps", "rank", "batch", "seq_len"),
    "relora": ("hidden", "layers", "steps", "rank", "batch", "seq_len"),
    "sltrain": ("d_in", "d_out", "tokens", "r", "hidden", "steps", "sl_rank"),
    "ternary": ("adam_steps", "ns_steps", "batch"),
    "overtraining": ("hidden", "layers", "steps", "seeds", "eval_tokens", "ft_steps"),
    "scale": ("hidden", "layers", "batch", "steps"),
}


def _runtime_cell(name: str) -> str:
    cells = [c for c in jupytext.read(COLAB / f"{name}.py").cells if "runtime" in c.metadata.get("tags", [])]
    assert len(cells) == 1, f"{name}: needs exactly one code cell tagged 'runtime'"
    return cells[0].source


def _run_runtime_cell(name: str, monkeypatch, backend: str, size: str | None = None) -> dict:
    monkeypatch.setattr(jax, "default_backend", lambda: backend)
    if size is None:
        monkeypatch.delenv("LRJ_COLAB_SIZE", raising=False)
    else:
        monkeypatch.setenv("LRJ_COLAB_SIZE", size)
    ns: dict = {}
    exec(compile(_runtime_cell(name), f"{name}:runtime", "exec"), ns)
    return ns


@pytest.mark.parametrize("name", SIZED)
@pytest.mark.parametrize(
    ("backend", "expected"), [("tpu", "tpu"), ("gpu", "gpu"), ("cuda", "gpu"), ("rocm", "gpu"), ("cpu", "cpu")]
)
def test_runtime_picks_the_size(name, backend, expected, monkeypatch, capsys):
    ns = _run_runtime_cell(name, monkeypatch, backend)
    assert ns["detect_runtime"]() == expected
    assert ns["SIZE"] == expected
    assert ns["C"] == ns["SIZES"][expected]
    assert f"backend {backend}:" in capsys.readouterr().out
    if expected == "tpu":  # a mesh (or batch sharding) over every chip
        c = ns["C"]
        assert -1 in c.get("mesh", ()) or c.get("data_shards") == -1


@pytest.mark.parametrize("name", SIZED)
def test_sizes_grow_with_the_accelerator(name, monkeypatch):
    sizes = _run_runtime_cell(name, monkeypatch, "cpu")["SIZES"]
    assert list(sizes) == ["smoke", "cpu", "gpu", "tpu"]
    for key in GROWING[name]:
        values = [sizes[s][key] for s in sizes]
        assert values == sorted(values), f"{name}: {key} shrinks from smoke to tpu: {values}"
    assert any(sizes["tpu"][k] > sizes["smoke"][k] for k in GROWING[name])
    if name == "scale":
        assert len(sizes["tpu"]["rows"]) > len(sizes["smoke"]["rows"])


@pytest.mark.parametrize("name", SIZED)
def test_size_override_and_its_errors(name, monkeypatch):
    assert _run_runtime_cell(name, monkeypatch, "tpu", size="smoke")["SIZE"] == "smoke"  # the env var wins
    with pytest.raises(ValueError, match="LRJ_COLAB_SIZE"):
        _run_runtime_cell(name, monkeypatch, "cpu", size="huge")


# --------------------------------------------------------------------------------------------
# Running a notebook
# --------------------------------------------------------------------------------------------


@dataclass
class Executed:
    text: str  # every stream and text/plain output, concatenated
    images: int  # PNG outputs (inline plots)


def run_notebook(name: str, tmp_path: Path, monkeypatch, env: dict[str, str]) -> Executed:
    """Execute colab/NAME.ipynb top to bottom in a fresh kernel of this interpreter, on CPU, with ``env``."""
    from nbclient import NotebookClient

    jupyter_dir = tmp_path / "jupyter"
    _install_kernelspec(jupyter_dir)
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.delenv("XLA_FLAGS", raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)

    nb = nbformat.read(COLAB / f"{name}.ipynb", as_version=4)
    probe = "import sys\nprint('KERNEL_PREFIX=' + sys.prefix)\nprint('KERNEL_EXECUTABLE=' + sys.executable)"
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    # the kernel starts in the test's working directory (fresh and empty): a notebook that writes a relative path
    # fails the test instead of filling colab/ (its files go where its LRJ_* variables point, under tmp_path)
    kernel_cwd = str(Path.cwd())
    client = NotebookClient(nb, kernel_name=KERNEL_NAME, timeout=600, resources={"metadata": {"path": kernel_cwd}})
    client.execute()  # raises CellExecutionError on the first failing cell

    text, images = [], 0
    for cell in nb.cells:
        for out in cell.get("outputs", []):
            assert out.output_type != "error", out
            if out.output_type == "stream":
                text.append(out.text)
            elif out.output_type in ("display_data", "execute_result"):
                text.append(out.data.get("text/plain", ""))
                images += "image/png" in out.data
    joined = "\n".join(text)  # a newline between outputs: every printed line starts after one
    assert f"KERNEL_PREFIX={sys.prefix}\n" in joined, "the notebook ran in another Python environment"
    assert f"KERNEL_EXECUTABLE={sys.executable}\n" in joined
    return Executed(joined, images)


def smoke_env(data_cache: str) -> dict[str, str]:
    return {"LRJ_COLAB_SIZE": "smoke", "LRJ_COLAB_CACHE": data_cache}


def grab(pattern: str, text: str) -> tuple[str, ...]:
    """The groups of the first match of ``pattern`` (a failure names the pattern)."""
    m = re.search(pattern, text)
    assert m, f"no output matches {pattern!r}"
    return m.groups()


def grab_all(pattern: str, text: str) -> list[tuple[str, ...]]:
    found = re.findall(pattern, text)
    assert found, f"no output matches {pattern!r}"
    return [f if isinstance(f, tuple) else (f,) for f in found]


NUM = r"([-+]?\d+(?:\.\d+)?(?:e[-+]?\d+)?)"


# --------------------------------------------------------------------------------------------
# The notebooks of this module
# --------------------------------------------------------------------------------------------


def test_quickstart_runs(tmp_path, monkeypatch, small_overrides):
    out_dir = tmp_path / "run"
    env = {
        "LRJ_QUICKSTART_STEPS": "20",
        "LRJ_QUICKSTART_OVERRIDES": shlex.join(small_overrides),
        "LRJ_QUICKSTART_OUT": str(out_dir),
    }
    run = run_notebook("quickstart", tmp_path, monkeypatch, env)
    text = run.text
    assert "final validation perplexity:" in text
    assert "unigram baseline" in text
    assert run.images >= 1, "the loss plot was not displayed"
    results = json.loads((out_dir / "results.json").read_text())
    assert results["steps"] == 20
    assert results["config"]["model"]["hidden"] == 64  # the overrides reached the notebook
    assert f"final validation perplexity: {results['final_val_ppl']:.2f}" in text


@pytest.mark.slow  # 40 s on 2 cores
def test_galore_notebook(tmp_path, monkeypatch, data_cache):
    run = run_notebook("galore", tmp_path, monkeypatch, smoke_env(data_cache))
    t = run.text
    assert "size 'smoke'" in t
    # 1. the projection: rank 16 of a 64 x 160 gradient keeps more than its 25% share; the projector is the SVD's
    kept, dim = grab(rf"rank 16 keeps {NUM}% of \|\|G\|\|\^2 \((\d+) singular values\)", t)
    assert 100 * 16 / int(dim) < float(kept) <= 100
    assert float(grab(rf"top-16 singular vectors: min \|cos\| = {NUM}", t)[0]) > 0.999
    assert "kernel (2, 64, 160) -> Adam moment (2, 16, 160)" in t
    # 2. memory from eval_shape, next to the paper (llama_1b: AdamW 5.36 GB here, 5.20 GB in the paper)
    params_1b, adamw_1b, adam8_1b, galore_1b, galore8_1b = map(float, grab(r"llama_1b" + r"\s+([\d.]+) GB" * 5, t))
    assert 2.6 < params_1b < 2.8 and 5.2 < adamw_1b < 5.5
    assert galore8_1b < galore_1b < adamw_1b and adam8_1b < 0.55 * adamw_1b
    assert float(grab(rf"llama_7b: 8-bit GaLore state is {NUM}% smaller than AdamW's", t)[0]) > 70
    # 3 + 4. four runs at equal tokens: every loss falls, refreshes as scheduled, 8-bit states much smaller
    runs = grab_all(rf"\n(AdamW|GaLore \(all, exact SVD\)|GaLore \(staggered, randomized SVD\)|8-bit GaLore)\s+"
                    rf"loss {NUM} -> {NUM}, val {NUM}", t)  # fmt: skip
    assert [r[0] for r in runs] == [
        "AdamW",
        "GaLore (all, exact SVD)",
        "GaLore (staggered, randomized SVD)",
        "8-bit GaLore",
    ]
    for _, first, last, val in runs:
        assert float(last) < float(first) - 0.8 and math.isfinite(float(val))
    svd = r"(\d+) matrices; SVDs per step after step 0: max (\d+), total (\d+)"
    n_all, max_all, total_all = map(int, grab(r"GaLore \(all, exact SVD\): " + svd, t))
    n_st, max_st, _ = map(int, grab(r"GaLore \(staggered, randomized SVD\): " + svd, t))
    assert n_all == n_st == 14  # 7 kernels x 2 layers
    assert max_all == n_all and total_all == 3 * n_all  # steps 0, 10, 20 of 30
    assert 1 <= max_st <= math.ceil(n_st / 10)
    assert float(grab(rf"8-bit GaLore state / GaLore state: {NUM}", t)[0]) < 0.5
    assert run.images >= 3


@pytest.mark.slow  # 70 s; the default suite runs the other notebooks and tests ReLoRA in tests/train
def test_relora_notebook(tmp_path, monkeypatch, data_cache):
    run = run_notebook("relora", tmp_path, monkeypatch, smoke_env(data_cache))
    t = run.text
    assert "'kernel': 'FrozenWeight', 'lora_a': 'LoRAFactor', 'lora_b': 'LoRAFactor'" in t
    diff, scale = map(
        float, grab(rf"merge preserved the function: max abs diff of the logits {NUM} \(logits up to {NUM}\)", t)
    )
    assert diff < 1e-5 and scale > 0.1
    assert "max |B| = 0.0, A re-drawn: True" in t
    assert float(grab(rf"W changed by max {NUM}", t)[0]) > 1e-3
    assert "lr at the restarts [10, 20, 30, 40]: [0.0, 0.0, 0.0, 0.0]" in t
    relora_ranks = json.loads(grab(r"ReLoRA rank of ΔW at the end of each cycle: (\[[\d, ]+\]) \(r = 4\)", t)[0])
    lora_ranks = json.loads(grab(r"LoRA rank of ΔW at the same steps: (\[[\d, ]+\])", t)[0])
    assert relora_ranks[0] == 4 and all(b > a for a, b in zip(relora_ranks, relora_ranks[1:], strict=False))
    assert relora_ranks[-1] == 20  # 4 restarts x r + the last cycle's factors, below min(in, out) = 64
    assert lora_ranks == [4] * len(relora_ranks)
    kept = [float(x[0]) for x in grab_all(rf"step \d+: {NUM}%", t)]
    assert len(kept) == 4 and all(0 < k < 1.0 for k in kept)  # random reset keeps ~0.1% of the factors' moments
    for name in ("full-rank AdamW", "LoRA", "ReLoRA"):
        first, last = map(float, grab(rf"\n{re.escape(name)}\s+loss {NUM} -> {NUM}", t))
        assert last < first - 0.8
    assert "same schedule: True" in t
    before, after, d = map(float, grab(rf"val loss {NUM} \(dense\) -> {NUM} \(LoRA\), diff {NUM}", t))
    assert abs(before - after) < 1e-5 and d < 1e-5
    first, last = map(float, grab(rf"ReLoRA \+ warm start: loss {NUM} -> {NUM}", t))
    assert last < first - 0.8
    assert run.images >= 3


@pytest.mark.slow  # 71 s on 2 cores
def test_scale_notebook(tmp_path, monkeypatch, data_cache):
    run = run_notebook("scale", tmp_path, monkeypatch, smoke_env(data_cache))
    t = run.text
    assert "--xla_force_host_platform_device_count=8" in t
    assert "mesh {'data': 2, 'fsdp': 2, 'tensor': 2} over 8 cpu devices" in t
    # the GaLore state follows its kernel: the projector (layers, in, r) shards `in` over fsdp like the kernel
    assert re.search(r"proj_in\['blocks'\]\['mlp'\]\['up'\]\['kernel'\]\s+\(2, 64, 16\)\s+P\(None, 'fsdp', None\)", t)
    assert re.search(r"\['blocks'\]\['mlp'\]\['up'\]\['kernel'\]\s+\(2, 64, 160\)\s+P\(None, 'fsdp', 'tensor'\)", t)
    for name in ("params", "optimizer state"):
        total, dev0 = map(float, grab(rf"{name}\s+{NUM} kB in all,\s+{NUM} kB on device 0", t))
        assert dev0 < 0.5 * total
    first, last = map(float, grab(rf"4 GaLore steps on the 2,2,2 mesh: loss {NUM} -> {NUM}", t))
    assert last < first
    # the 7B table, as in the README's (XLA CPU compile, --no-licm)
    rows = {
        (label.strip(), int(dev)): tuple(map(float, vals))
        for label, dev, *vals in grab_all(
            r"\n([A-Za-z][\w /=+.-]*?)\s+(\d) +([\d.]+) +([\d.]+) \| +([\d.]+) +([\d.]+) +([\d.]+)", t
        )
    }
    assert set(rows) == {
        ("AdamW", 1),
        ("GaLore r=1024", 1),
        ("GaLore r=1024 + per-layer update", 1),
        ("ReLoRA / LoRA r=128", 1),
        ("AdamW", 8),
    }
    params, state, args, temp, peak = rows[("AdamW", 1)]
    assert abs(params - 12.55) < 0.05 and abs(state - 2 * params) < 0.1 and abs(peak - 74.58) < 1.0
    assert rows[("GaLore r=1024", 1)][1] < 0.4 * state  # projected moments
    assert rows[("GaLore r=1024 + per-layer update", 1)][3] < 0.1 * rows[("GaLore r=1024", 1)][3]  # temporaries
    assert rows[("ReLoRA / LoRA r=128", 1)][4] < 20
    assert rows[("AdamW", 8)][4] < peak / 6  # FSDP over 8
    ordinary = grab(rf"ordinary step\s+losses (\[[^\]]+\]); temporaries {NUM} MB", t)
    layerwise = grab(rf"per-layer update losses (\[[^\]]+\]); temporaries {NUM} MB", t)
    assert float(layerwise[1]) < float(ordinary[1])
    assert float(grab(rf"max loss difference {NUM} over 4 steps", t)[0]) < 1e-4
    assert json.loads(ordinary[0])[-1] < json.loads(ordinary[0])[0]
    assert run.images >= 1
