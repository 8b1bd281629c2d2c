"""Trackers: events read back by TensorBoard's own loaders and server, the tail cut on resume, W&B offline."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from tensorboard.backend.event_processing import (
    event_accumulator,
    plugin_event_accumulator,
    plugin_event_multiplexer,
)
from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
from tensorboard.plugins.hparams import plugin_data_pb2
from tensorboard.util import tensor_util
from tensorboardX import SummaryWriter

from lowrank_jax.config import Config, ConfigError, replace
from lowrank_jax.train import tracking
from lowrank_jax.train.cli import main
from lowrank_jax.train.metrics import read_metrics
from lowrank_jax.train.tracking import Trackers


def _cfg(out_dir: Path, **changes) -> Config:
    return replace(Config(), out_dir=str(out_dir), **changes)


def _accumulator(tb_dir: Path, loader: str):
    """TensorBoard's Python loaders, ``purge_orphaned_data`` on (their default): "server" is the one
    ``tensorboard --load_fast=false`` serves from, "legacy" the older one scripts use."""
    module = plugin_event_accumulator if loader == "server" else event_accumulator
    ea = module.EventAccumulator(str(tb_dir))
    ea.Reload()
    return ea


def _scalars(ea) -> dict[str, dict[int, float]]:
    """Every scalar series of an accumulator of either kind, checked for duplicated steps."""
    if isinstance(ea, event_accumulator.EventAccumulator):
        series = {t: [(e.step, e.value) for e in ea.Scalars(t)] for t in ea.Tags()["scalars"]}
    else:
        tags = ea.PluginTagToContent("scalars")
        series = {t: [(e.step, tensor_util.make_ndarray(e.tensor_proto).item()) for e in ea.Tensors(t)] for t in tags}
    for tag, points in series.items():
        steps = [s for s, _ in points]
        assert len(steps) == len(set(steps)), f"{tag}: duplicated steps {steps}"
    return {tag: dict(points) for tag, points in series.items()}


def _file_steps(path: Path) -> list[int]:
    """The steps of the events in one event file, read with TensorBoard's own record reader."""
    return [e.step for e in EventFileLoader(str(path)).Load()]


def _f32(x: float) -> float:
    return float(np.float32(x))  # event files store scalars as float32


def test_scalars_read_back_like_tensorboard_logdir(rng, tmp_path):
    cfg = _cfg(tmp_path, optim__lr=float(rng.uniform(1e-4, 1e-2)), batch_size=int(rng.integers(2, 64)))
    train = {
        s: {"loss": rng.uniform(2, 9), "grad_norm": rng.uniform(0.1, 5), "lr": rng.uniform(0, 1e-3)}
        for s in range(1, 13)
    }
    evals = {s: {"val_loss": rng.uniform(2, 9), "block_rms": list(rng.uniform(0.5, 2, size=3))} for s in (6, 12)}
    with Trackers(cfg, tmp_path, resume_step=None) as tr:
        for s, m in train.items():
            tr.scalars(s, {**m, "skipped": jnp.asarray(s // 7, jnp.int32)}, "train")  # a 0-d jax array too
        for s, m in evals.items():
            tr.scalars(s, m, "eval")
        rec = tr.record()
    assert rec == {"tensorboard": str(tmp_path / "tensorboard"), "wandb": None}

    # `tensorboard --logdir RUN` finds one run, "tensorboard", under RUN
    mux = plugin_event_multiplexer.EventMultiplexer()
    mux.AddRunsFromDirectory(str(tmp_path))
    mux.Reload()
    assert list(mux.Runs()) == ["tensorboard"]
    expected = {f"train/{k}": {s: _f32(m[k]) for s, m in train.items()} for k in ("loss", "grad_norm", "lr")}
    expected["train/skipped"] = {s: float(s // 7) for s in train}
    expected["eval/val_loss"] = {s: _f32(m["val_loss"]) for s, m in evals.items()}
    expected |= {f"eval/block_rms/{i}": {s: _f32(m["block_rms"][i]) for s, m in evals.items()} for i in range(3)}
    assert _scalars(mux.GetAccumulator("tensorboard")) == expected
    assert _scalars(_accumulator(tmp_path / "tensorboard", "legacy")) == expected

    # the config: as text, and as HParams with dotted keys
    ea = mux.GetAccumulator("tensorboard")
    (text,) = ea.Tensors("config/text_summary")
    assert f"batch_size: {cfg.batch_size}" in text.tensor_proto.string_val[0].decode()
    content = ea.PluginTagToContent("hparams")
    start = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_start_info"])
    assert start.session_start_info.hparams["optim.lr"].number_value == pytest.approx(cfg.optim.lr)
    assert start.session_start_info.hparams["batch_size"].number_value == cfg.batch_size
    assert start.session_start_info.hparams["model.dtype"].string_value == cfg.model.dtype
    assert start.session_start_info.hparams["mesh"].string_value == "[1, 1, 1]"
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == 1  # STATUS_SUCCESS, written by close()


def _interrupted_and_resumed(out: Path, first: np.ndarray, second: np.ndarray) -> tuple[Path, bytes]:
    """Steps 1..10 logged and flushed, then killed (never closed, half a record at the end); resumed
    from the step-6 checkpoint and run to step 14. Returns the first event file and what it held."""
    cfg = _cfg(out)
    tr = Trackers(cfg, out, resume_step=None)
    for s in range(1, 11):
        tr.scalars(s, {"loss": first[s], "only_first": first[s] + 1}, "train")  # only_first: not logged again
    tr.flush()
    (old,) = (out / "tensorboard").glob("events.out.tfevents.*")
    written = old.read_bytes()
    with open(old, "ab") as f:
        f.write(b"\x40\x00\x00\x00\x00")  # a torn record header
    del tr
    # within the same second as the first file, so the name order of the files is the suffix's
    with Trackers(cfg, out, resume_step=6) as tr:
        for s in range(7, 15):
            tr.scalars(s, {"loss": second[s]}, "train")
    return old, written


@pytest.mark.parametrize("loader", ["server", "legacy"])
def test_resume_drops_the_interrupted_tail(rng, tmp_path, loader):
    first = rng.uniform(1, 10, size=11)
    second = rng.uniform(20, 30, size=15)
    cfg = _cfg(tmp_path)
    old, written = _interrupted_and_resumed(tmp_path, first, second)
    files = sorted((tmp_path / "tensorboard").glob("events.out.tfevents.*"))
    assert len(files) == 2 and files[0] == old
    # the old file itself holds nothing after step 6 (no reader can show the forked tail), nor the torn bytes
    kept = old.read_bytes()
    assert kept == written[: len(kept)] and _file_steps(old)[-6:] == [1, 2, 3, 4, 5, 6]
    assert min(_file_steps(files[1])) == 0 and max(_file_steps(files[1])) == 14
    assert _scalars(_accumulator(tmp_path / "tensorboard", loader)) == {
        "train/loss": {**{s: _f32(first[s]) for s in range(1, 7)}, **{s: _f32(second[s]) for s in range(7, 15)}},
        "train/only_first": {s: _f32(first[s] + 1) for s in range(1, 7)},
    }

    # a fresh run into the same out_dir replaces what earlier attempts wrote (as metrics.jsonl does)
    with Trackers(cfg, tmp_path, resume_step=None) as tr:
        tr.scalars(3, {"loss": 1.5}, "train")
    assert len(list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))) == 1
    assert _scalars(_accumulator(tmp_path / "tensorboard", loader)) == {"train/loss": {3: 1.5}}


def _served_scalars(logdir: Path, load_fast: str, tags: tuple[str, ...], points: int) -> dict[str, dict[int, float]]:
    """The scalars ``tensorboard --logdir logdir`` serves over HTTP (``load_fast=true``: the Rust data
    server), once the first tag has ``points`` points (or after 60 s)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host", "127.0.0.1"]
    cmd += ["--port", str(port), f"--load_fast={load_fast}", "--reload_interval=1"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}/data/plugin/scalars/scalars?run=tensorboard&tag="

    def fetch(tag: str) -> dict[int, float]:
        with urllib.request.urlopen(url + urllib.parse.quote(tag, safe=""), timeout=5) as r:
            points = json.load(r)
        assert len(points) == len({s for _, s, _ in points}), f"{tag}: duplicated steps"
        return {s: v for _, s, v in points}

    try:
        deadline, got = time.monotonic() + 60, {}
        while time.monotonic() < deadline:
            try:
                got = {tag: fetch(tag) for tag in tags}
                if len(got[tags[0]]) == points:
                    break
            except (OSError, ValueError):
                pass
            time.sleep(0.5)
        return got
    finally:
        proc.terminate()
        proc.wait(timeout=30)


@pytest.mark.parametrize("load_fast", ["true", "false"])
def test_the_tensorboard_server_shows_the_scalars(rng, tmp_path, load_fast):
    """The stock ``tensorboard --logdir RUN`` (``load_fast=true``: the Rust data server) over HTTP."""
    first, second = rng.uniform(1, 10, size=11), rng.uniform(20, 30, size=15)
    _interrupted_and_resumed(tmp_path, first, second)
    got = _served_scalars(tmp_path, load_fast, ("train/loss", "train/only_first"), 14)
    assert got == {
        "train/loss": {**{s: _f32(first[s]) for s in range(1, 7)}, **{s: _f32(second[s]) for s in range(7, 15)}},
        "train/only_first": {s: _f32(first[s] + 1) for s in range(1, 7)},
    }


@pytest.mark.slow
def test_purge_step_alone_leaves_the_interrupted_tail_on_the_data_server(tmp_path):
    """Why a resume cuts the old event files: with tensorboardX's ``purge_step`` (a ``SessionLog.START``)
    and nothing cut, the Rust data server still shows the interrupted run's points of a series that
    the resumed run does not log again."""
    tb = tmp_path / tracking.TENSORBOARD_DIR
    with SummaryWriter(str(tb), purge_step=0, filename_suffix=".0000") as w:
        for s in range(1, 11):
            w.add_scalar("train/loss", float(s), s)
            w.add_scalar("train/only_first", float(s), s)
    with SummaryWriter(str(tb), purge_step=7, filename_suffix=".0001") as w:  # resumed from step 6
        for s in range(7, 15):
            w.add_scalar("train/loss", 100.0 + s, s)
    got = _served_scalars(tmp_path, "true", ("train/loss", "train/only_first"), 14)
    assert got["train/loss"] == {**{s: float(s) for s in range(1, 7)}, **{s: 100.0 + s for s in range(7, 15)}}
    assert got["train/only_first"] == {s: float(s) for s in range(1, 11)}  # 7..10 are the interrupted run's


def test_disabled_writes_and_imports_nothing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # would fail if it were imported
    monkeypatch.setitem(sys.modules, "tensorboardX", None)
    out = tmp_path / "run"
    tr = Trackers(_cfg(out, logging__wandb=True), out, enabled=False, resume_step=3)
    tr.scalars(1, {"loss": 2.0}, "train")
    tr.text("note", "hello")
    tr.flush()
    tr.close()
    assert not out.exists()
    assert tr.record() == {"tensorboard": None, "wandb": None}


def test_a_failed_run_ends_its_hparams_session_as_failed(tmp_path):
    with pytest.raises(RuntimeError, match="boom"), Trackers(_cfg(tmp_path), tmp_path) as tr:
        tr.scalars(1, {"loss": 2.0}, "train")
        raise RuntimeError("boom")
    content = _accumulator(tmp_path / "tensorboard", "server").PluginTagToContent("hparams")
    end = plugin_data_pb2.HParamsPluginData.FromString(content["_hparams_/session_end_info"])
    assert end.session_end_info.status == 2  # STATUS_FAILURE


def test_tensorboard_off_writes_nothing(tmp_path):
    cfg = _cfg(tmp_path, logging__tensorboard=False)
    with Trackers(cfg, tmp_path) as tr:
        tr.scalars(1, {"loss": 2.0}, "train")
    assert list(tmp_path.iterdir()) == []
    assert tr.record() == {"tensorboard": None, "wandb": None}


@pytest.mark.parametrize("module, key", [("wandb", "logging.wandb"), ("tensorboardX", "logging.tensorboard")])
def test_missing_package_is_a_one_line_error(tmp_path, monkeypatch, module, key):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` raises ImportError
    cfg = _cfg(tmp_path, logging__wandb=True)
    for call in (lambda: tracking.check_logging(cfg), lambda: Trackers(cfg, tmp_path)):
        with pytest.raises(ConfigError) as e:
            call()
        msg = str(e.value)
        assert msg.startswith(f"{key}: ") and f"pip install {module}" in msg and "\n" not in msg
    assert list(tmp_path.iterdir()) == []  # the check comes before anything is written


# -- W&B offline ----------------------------------------------------------------------------------------


def _wandb_records(path: Path) -> list:
    """The records of a ``run-<id>.wandb`` file: W&B's 7-byte header, then a LevelDB log (32 KiB blocks
    of chunks with a 7-byte header: crc32c, little-endian length, type FULL=1/FIRST=2/MIDDLE=3/LAST=4),
    each record a ``wandb_internal_pb2.Record``."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, parts, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        length, kind = int.from_bytes(data[pos + 4 : pos + 6], "little"), data[pos + 6]
        parts += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(parts))
            parts = b""
        elif kind == 0:  # zero padding up to the end of the block
            pos += block - pos % block
    return records


def _wandb_history(run_dir: Path) -> tuple[list, list[dict[str, float]]]:
    (file,) = run_dir.glob("run-*.wandb")
    records = _wandb_records(file)
    runs = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    rows = [
        {
            k: float(it.value_json)
            for it in r.history.item
            if not (k := it.key or "/".join(it.nested_key)).startswith("_")
        }
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
    return runs, rows


@pytest.fixture
def wandb_offline(tmp_path, monkeypatch):
    """W&B's own files in tmp_path, and every way out to a server pointed at a closed local port."""
    wandb = pytest.importorskip("wandb")
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_RUN_ID", "WANDB_RESUME", "WANDB_PROJECT"):
        monkeypatch.delenv(var, raising=False)
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR", "WANDB_ARTIFACT_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb_home" / var.lower()))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "http_proxy", "https_proxy"):
        monkeypatch.setenv(var, "http://127.0.0.1:9")
    yield wandb
    wandb.teardown()


def test_wandb_offline_run_and_resume(rng, tmp_path, wandb_offline):
    out = tmp_path / "run"
    cfg = _cfg(out, logging__wandb=True, logging__tensorboard=False, logging__wandb_project="lrj-test")
    loss = rng.uniform(2, 9, size=9)
    t0 = time.perf_counter()
    with Trackers(cfg, out, resume_step=None) as tr:
        for s in range(1, 6):
            tr.scalars(s, {"loss": loss[s]}, "train")
        tr.scalars(4, {"val_loss": loss[4] + 1}, "eval")
        first = tr.record()["wandb"]
    with Trackers(cfg, out, resume_step=3) as tr:  # resumed from the step-3 checkpoint
        for s in range(4, 9):
            tr.scalars(s, {"loss": loss[s] + 10}, "train")
        second = tr.record()["wandb"]
    elapsed = time.perf_counter() - t0
    assert elapsed < 30, f"two offline W&B runs took {elapsed:.1f}s"

    run_id = (out / tracking.WANDB_ID_FILE).read_text().strip()
    assert first == {"project": "lrj-test", "mode": "offline", "run_id": run_id, "resumed": False, "dir": first["dir"]}
    assert second == {**first, "resumed": True, "dir": second["dir"]}
    assert first["dir"] != second["dir"] and Path(first["dir"]).parent == out / "wandb"

    runs, rows = _wandb_history(Path(first["dir"]))
    assert runs[0].run_id == run_id and runs[0].project == "lrj-test"
    assert "optim" in {it.key for it in runs[0].config.update}
    assert [r for r in rows if "train/loss" in r] == [
        {"step": float(s), "train/loss": pytest.approx(loss[s])} for s in range(1, 6)
    ]
    assert [r for r in rows if "eval/val_loss" in r] == [{"step": 4.0, "eval/val_loss": pytest.approx(loss[4] + 1)}]
    runs, rows = _wandb_history(Path(second["dir"]))
    assert runs[0].run_id == run_id
    assert rows == [{"step": float(s), "train/loss": pytest.approx(loss[s] + 10)} for s in range(4, 9)]

    # a fresh (not resumed) run into the same out_dir starts a new W&B run
    with Trackers(cfg, out, resume_step=None) as tr:
        third = tr.record()["wandb"]
    assert third["run_id"] != run_id and (out / tracking.WANDB_ID_FILE).read_text().strip() == third["run_id"]


# -- scalars -------------------------------------------------------------------------------


def test_flatten_scalars_types():
    got = tracking.flatten_scalars(
        {"a": 1, "b": np.float32(0.5), "c": jnp.asarray(2.5), "d": [1.0, 2.0], "e": np.arange(2), "f": None},
        "p",
    )
    assert got == {"p/a": 1.0, "p/b": 0.5, "p/c": 2.5, "p/d/0": 1.0, "p/d/1": 2.0, "p/e/0": 0.0, "p/e/1": 1.0}
    assert tracking.flatten_scalars({"x": {"y": 3}}, "") == {"x/y": 3.0}
    for bad in ("high", np.zeros((2, 2)), object()):
        with pytest.raises(TypeError, match="p/k: expected a number"):
            tracking.flatten_scalars({"k": bad}, "p")


@pytest.mark.slow  # 17 s on 2 cores
def test_a_training_run_and_its_resume_log_the_same_scalars_as_metrics_jsonl(small_overrides, tmp_path):
    """The loop's wiring: every step's loss, the evals and tokens/s reach TensorBoard, once each, across a resume."""
    out = tmp_path / "run"
    run = [*small_overrides, "log_every=2", "eval_every=4", "checkpoint_every=4", f"out_dir={out}"]
    assert main(["train", "tiny", *run, "steps=6"]) == 0
    assert main(["train", "tiny", *run, "steps=8", "resume=true"]) == 0  # continues from the step-6 checkpoint
    series = _scalars(_accumulator(out / tracking.TENSORBOARD_DIR, "server"))
    records = read_metrics(out / "metrics.jsonl")
    losses = {r["step"]: _f32(r["loss"]) for r in records if "loss" in r}
    assert sorted(losses) == list(range(1, 9)) and series["train/loss"] == losses
    evals = {r["step"]: _f32(r["val_loss"]) for r in records if "val_loss" in r}
    assert series["eval/val_loss"] == evals and {4, 8} <= set(evals)
    assert sorted(series["train/tokens_per_s"]) == [2, 4, 6, 8]
    results = json.loads((out / "results.json").read_text())
    assert results["trackers"]["tensorboard"] == str(out / tracking.TENSORBOARD_DIR)
