"""The Colab notebooks: executed top to bottom on CPU, and their jupytext .py/.ipynb pairs in sync."""

from __future__ import annotations

import json
import shlex
import sys
from pathlib import Path

import jupytext
import nbformat
import pytest
from helpers import REPO

COLAB = REPO / "colab"
KERNEL_NAME = "lrj-test-python"
PAIRS = ["quickstart"]


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


def test_quickstart_runs(tmp_path, monkeypatch, small_overrides):
    from nbclient import NotebookClient  # noqa: PLC0415

    jupyter_dir = tmp_path / "jupyter"
    _install_kernelspec(jupyter_dir)
    out_dir = tmp_path / "run"
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_dir))
    monkeypatch.setenv("JAX_PLATFORMS", "cpu")
    monkeypatch.setenv("LRJ_QUICKSTART_STEPS", "20")
    monkeypatch.setenv("LRJ_QUICKSTART_OVERRIDES", shlex.join(small_overrides))
    monkeypatch.setenv("LRJ_QUICKSTART_OUT", str(out_dir))

    nb = nbformat.read(COLAB / "quickstart.ipynb", as_version=4)
    probe = "import sys\nprint('KERNEL_PREFIX=' + sys.prefix)\nprint('KERNEL_EXECUTABLE=' + sys.executable)"
    nb.cells.append(nbformat.v4.new_code_cell(probe))
    client = NotebookClient(
        nb,
        kernel_name=KERNEL_NAME,
        timeout=600,
        resources={"metadata": {"path": str(COLAB)}},
    )
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
    text = "".join(text)
    assert f"KERNEL_PREFIX={sys.prefix}\n" in text, "the notebook ran in another Python environment"
    assert f"KERNEL_EXECUTABLE={sys.executable}\n" in text
    assert "final validation perplexity:" in text
    assert "unigram baseline" in text
    assert images >= 1, "the loss plot was not displayed"
    results = json.loads((out_dir / "results.json").read_text())
    assert results["steps"] == 20
    assert results["config"]["model"]["hidden"] == 64  # the overrides reached the notebook
    assert f"final validation perplexity: {results['final_val_ppl']:.2f}" in text
