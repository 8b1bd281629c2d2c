"""The run's loss plot: a PNG, drawn without touching pyplot's backend (a notebook keeps its inline plots)."""

from __future__ import annotations

import matplotlib

from lowrank_jax.train.metrics import plot_losses


def test_plot_losses_writes_a_png_and_leaves_the_backend_alone(tmp_path, monkeypatch):
    def no_switch(*args, **kwargs):
        raise AssertionError("plot_losses switched the matplotlib backend")

    before = matplotlib.get_backend()
    monkeypatch.setattr(matplotlib, "use", no_switch)
    records = [{"step": s, "tokens": 100 * s, "loss": 5.0 - 0.1 * s} for s in range(1, 30)]
    records += [{"step": 10, "tokens": 1000, "val_loss": 4.5}, {"step": 20, "tokens": 2000, "val_loss": 3.9}]
    plot_losses(records, tmp_path / "loss.png", title="t")
    assert (tmp_path / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert matplotlib.get_backend() == before
