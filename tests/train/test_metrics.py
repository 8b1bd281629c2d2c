"""Run records and measurements: the loss plot (a PNG, drawn without touching pyplot's backend, so a notebook keeps
its inline plots), MFU against the counting rule, the devices' memory counters."""

from __future__ import annotations

import jax
import matplotlib
import pytest

from lowrank_jax.config import Config, replace
from lowrank_jax.train import metrics
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


def test_mfu_against_the_counting_rule(rng):
    d, f, L, V, T = (int(rng.integers(1, 9)) * 64, int(rng.integers(1, 9)) * 128, int(rng.integers(1, 6)), 512, 128)
    cfg = replace(Config(), model__hidden=d, model__ffn=f, model__layers=L, model__vocab_size=V, model__heads=1)
    cfg = replace(cfg, seq_len=T, model__max_seq_len=T, model__dtype="bfloat16")
    tokens_per_s = float(rng.uniform(1e4, 1e6))
    per_token = 3 * (2 * (L * (4 * d * d + 3 * d * f) + d * V) + L * 4 * T * d)
    got = metrics.model_flops_utilization(cfg, tokens_per_s, "NVIDIA H100 80GB HBM3", n_devices=4)
    assert got == pytest.approx(tokens_per_s * per_token / (4 * 989e12), rel=1e-12)
    fp32 = metrics.model_flops_utilization(replace(cfg, model__dtype="float32"), tokens_per_s, "NVIDIA A100-SXM4-40GB")
    assert fp32 == pytest.approx(tokens_per_s * per_token / 156e12, rel=1e-12)
    assert metrics.model_flops_utilization(cfg, tokens_per_s, "cpu") is None
    with pytest.raises(ValueError, match="n_devices"):
        metrics.model_flops_utilization(cfg, tokens_per_s, "cpu", n_devices=0)


class _Device:
    def __init__(self, stats):
        self._stats = stats

    def memory_stats(self):
        return self._stats


def test_device_memory_gib():
    gib = 2**30
    devs = [
        _Device({"bytes_in_use": 3 * gib, "peak_bytes_in_use": 5 * gib, "bytes_limit": 80 * gib}),
        _Device({"bytes_in_use": 4 * gib, "peak_bytes_in_use": 4.5 * gib, "bytes_limit": 79 * gib}),
    ]
    assert metrics.device_memory_gib(devs) == {"in_use_gib": 4.0, "peak_gib": 5.0, "limit_gib": 79.0}
    assert metrics.device_memory_gib([_Device(None)]) == {}
    if jax.default_backend() == "cpu":
        assert metrics.device_memory_gib() == {}  # the CPU backend keeps no counters
