"""Experiment trackers: TensorBoard event files and (optionally) a Weights & Biases run.

They sit beside ``metrics.jsonl`` and ``loss.png`` (which stay the record of truth) and get the
same scalars: one :class:`Trackers` per run, built by the training loop on every process, writing
only on the primary one (``enabled=False`` elsewhere makes every call a no-op).

- **TensorBoard** (``logging.tensorboard``, on by default): event files under
  ``out_dir/tensorboard`` written with ``tensorboardX`` (no TensorFlow needed); view them with the
  stock ``tensorboard --logdir out_dir``. Tags are ``"{prefix}/{key}"`` (``train/loss``,
  ``eval/val_loss``, ``memory/peak_gib``); the config is written once as text and as HParams, so
  the HParams dashboard compares the runs of a sweep under one ``--logdir``.
  A fresh run deletes the event files a previous attempt left in that folder (as ``metrics.jsonl``
  is rewritten). A resumed run cuts every event after ``resume_step`` out of the existing files (and
  a torn last record of a killed writer), so no reader shows a forked or duplicated tail.
  ``SessionLog.START`` alone (tensorboardX's ``purge_step``) does not do it: the Rust data server
  behind ``tensorboard --logdir`` ignores it and preempts a series only when that series is logged
  again, so a series the resumed run does not log again keeps the interrupted run's later points;
  the Python loaders honour it only after a first ``START`` in the run. Each file still opens with a
  ``SessionLog.START`` (at ``resume_step + 1`` on resume) for the Python loaders.
- **Weights & Biases** (``logging.wandb``): imported only when asked for; ``wandb_mode=offline``
  (the default) writes ``out_dir/wandb/offline-run-*`` without any network, to upload later with
  ``wandb sync``. The run id is kept in ``out_dir/wandb_run_id`` and reused on resume, so a resumed
  run continues the same W&B run. Scalars are logged against our own ``step`` metric (W&B's
  internal ``_step`` only grows), so nothing is dropped after a resume; W&B cannot rewind an
  offline run, so steps logged twice (after the checkpoint and before the crash) appear twice there.
"""

from __future__ import annotations

import json
import secrets
import string
import struct
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from lowrank_jax import config as config_lib
from lowrank_jax.config import Config, ConfigError
from lowrank_jax.config.errors import first_line

TENSORBOARD_DIR = "tensorboard"  # under out_dir
WANDB_ID_FILE = "wandb_run_id"  # under out_dir: the W&B run id a resumed run reuses
WANDB_STEP = "step"  # the x axis of every W&B chart
HPARAM_METRICS = ("train/loss", "eval/val_loss", "eval/val_ppl")  # the HParams dashboard's metric columns
_FLUSH_SECS = 30


def check_logging(cfg: Config) -> None:
    """Raise a one-line :class:`ConfigError` if a tracker ``cfg.logging`` asks for is not installed.

    Writes nothing, so the loop can call it with its other up-front checks.
    """
    _tensorboardx(cfg)
    _wandb(cfg)


def _tensorboardx(cfg: Config):
    """The ``tensorboardX`` module, or None when ``logging.tensorboard`` is off."""
    if not cfg.logging.tensorboard:
        return None
    try:
        import tensorboardX  # only when TensorBoard logging is on
    except ImportError:
        raise ConfigError(
            "logging.tensorboard: the tensorboardX package is not installed "
            "(pip install tensorboardX, or logging.tensorboard=false)"
        ) from None
    return tensorboardX


def _wandb(cfg: Config):
    """The ``wandb`` module, or None when ``logging.wandb`` is off."""
    if not cfg.logging.wandb:
        return None
    try:
        import wandb  # optional: imported only when asked for
    except ImportError:
        raise ConfigError("logging.wandb: the wandb package is not installed (pip install wandb)") from None
    return wandb


def flatten_scalars(values: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """``{"prefix/key": float}`` for numbers (Python, NumPy or 0-d JAX arrays), None values left out.

    A sequence or 1-d array becomes one scalar per element (``block_rms`` -> ``eval/block_rms/0``, ...);
    a nested mapping adds its keys to the tag. Anything else is a TypeError naming the key.
    """
    out: dict[str, float] = {}
    for key, v in values.items():
        tag = f"{prefix}/{key}" if prefix else str(key)
        if v is None:
            continue
        if isinstance(v, Mapping):
            out.update(flatten_scalars(v, tag))
            continue
        if isinstance(v, str | bytes):
            raise TypeError(f"{tag}: expected a number or a sequence of numbers, got {v!r}")
        if isinstance(v, Sequence):
            out.update(flatten_scalars({str(i): x for i, x in enumerate(v)}, tag))
            continue
        ndim = getattr(v, "ndim", 0)
        if ndim == 1:
            out.update(flatten_scalars({str(i): x for i, x in enumerate(v.tolist())}, tag))
            continue
        if ndim == 0:
            try:
                out[tag] = float(v)
                continue
            except (TypeError, ValueError):
                pass
        raise TypeError(f"{tag}: expected a number or a sequence of numbers, got {type(v).__name__}")
    return out


def _flat_config(d: Mapping[str, Any], prefix: str = "") -> dict[str, bool | int | float | str]:
    """Dotted keys (``optim.lr``) and HParams-friendly values: lists as JSON text, None as ``"null"``."""
    out: dict[str, bool | int | float | str] = {}
    for k, v in d.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(_flat_config(v, key))
        elif isinstance(v, bool | int | float | str):
            out[key] = v
        else:
            out[key] = json.dumps(v)
    return out


def _config_markdown(cfg_dict: Mapping[str, Any]) -> str:
    """The config as YAML in a Markdown code block (4-space indent: TensorBoard's text plugin renders it)."""
    import yaml

    text = yaml.safe_dump(json.loads(json.dumps(cfg_dict)), sort_keys=False)
    return "\n".join("    " + line for line in text.splitlines())


def _new_run_id() -> str:
    """Eight lower-case letters and digits, the form W&B uses for its own ids."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def _drop_events_after(path: Path, last_step: int) -> None:
    """Rewrite the event file ``path`` without its events at steps > ``last_step`` and without a torn tail.

    An event file is a sequence of TFRecords: ``uint64 length``, ``uint32`` masked CRC of the length,
    ``length`` bytes of a serialized ``Event``, ``uint32`` masked CRC of the data. Kept records are
    copied byte for byte; the file is replaced atomically, and left alone when nothing is dropped.
    """
    from google.protobuf.message import DecodeError
    from tensorboardX.proto.event_pb2 import Event

    data = path.read_bytes()
    kept, pos, changed = [], 0, False
    while pos < len(data):
        end = pos + 12 + struct.unpack_from("<Q", data, pos)[0] + 4 if pos + 12 <= len(data) else None
        if end is None or end > len(data):  # a record cut short by a killed writer
            changed = True
            break
        try:
            step = Event.FromString(data[pos + 12 : end - 4]).step
        except DecodeError:
            changed = True
            break
        if step <= last_step:
            kept.append(data[pos:end])
        else:
            changed = True
        pos = end
    if changed:
        tmp = path.with_name("rewrite.tmp")  # no "tfevents" in the name: TensorBoard never reads it
        tmp.write_bytes(b"".join(kept))
        tmp.replace(path)


class _EventFile:
    """One TensorBoard event file, written synchronously: tensorboardX's ``SummaryWriter`` hands events
    to a thread, so its ``flush`` does not put what was logged on disk; this one's does.

    Events are buffered and flushed by :meth:`flush`, :meth:`close`, and the first write after
    ``_FLUSH_SECS`` without a flush.
    """

    def __init__(self, tbx, tb_dir: Path, start_step: int):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto import event_pb2, summary_pb2

        self._summaries, self._event_pb2, self._summary_pb2 = tbx.summary, event_pb2, summary_pb2
        # event files are read in name order ("events.out.tfevents.<unix seconds>.<host><suffix>"): the
        # suffix keeps a file opened within the same second as an earlier one after it, and distinct from it
        n_old = len(list(tb_dir.glob("events.out.tfevents.*")))
        self._writer = EventsWriter(str(tb_dir / "events"), f".{n_old:04d}")
        self._last_flush = time.monotonic()
        # every file opens a session; TensorBoard takes each START after a run's first as a restart and
        # drops every event read before it at a step >= its step (resume_step + 1 on resume)
        start = event_pb2.SessionLog(status=event_pb2.SessionLog.START)
        self._writer.write_event(event_pb2.Event(wall_time=time.time(), step=start_step, session_log=start))

    def _write(self, step: int, summary) -> None:
        self._writer.write_event(self._event_pb2.Event(wall_time=time.time(), step=step, summary=summary))
        if time.monotonic() - self._last_flush > _FLUSH_SECS:
            self.flush()

    def scalars(self, step: int, values: dict[str, float]) -> None:
        pb = self._summary_pb2.Summary
        self._write(step, pb(value=[pb.Value(tag=tag, simple_value=v) for tag, v in values.items()]))

    def text(self, step: int, tag: str, markdown: str) -> None:
        self._write(step, self._summaries.text(tag, markdown))

    def hparams_start(self, hparams: dict[str, bool | int | float | str], metrics: Sequence[str]) -> None:
        """The HParams plugin's experiment (columns) and session start (this run's values)."""
        experiment, session_start, _ = self._summaries.hparams(hparams, dict.fromkeys(metrics, 0.0))
        self._write(0, experiment)
        self._write(0, session_start)

    def hparams_end(self, ok: bool) -> None:
        from tensorboardX.proto.api_pb2 import Status
        from tensorboardX.proto.plugin_hparams_pb2 import HParamsPluginData

        *_, session_end = self._summaries.hparams({}, {})
        if not ok:  # tensorboardX's summary says STATUS_SUCCESS: rewrite its plugin content for a failure
            meta = session_end.value[0].metadata.plugin_data
            content = HParamsPluginData.FromString(meta.content)
            content.session_end_info.status = Status.Value("STATUS_FAILURE")
            meta.content = content.SerializeToString()
        self._write(0, session_end)

    def flush(self) -> None:
        self._writer.flush()
        self._last_flush = time.monotonic()

    def close(self) -> None:
        self._writer.close()


class Trackers:
    """The TensorBoard event file and W&B run of one training run (see the module docstring).

    Args:
      cfg: the run's config (``cfg.logging`` picks the trackers; the whole config is logged as
        text/HParams and as the W&B config).
      out_dir: the run's output folder; it is created if needed.
      enabled: False on every process but the primary one: nothing is imported, created or written.
      resume_step: the step of the restored checkpoint when resuming, else None. TensorBoard then
        hides what the interrupted run logged after it; W&B reuses the stored run id.

    A missing package is a one-line :class:`ConfigError` naming ``logging.tensorboard`` /
    ``logging.wandb``; a W&B run that cannot start (e.g. online without ``wandb login``) is one
    naming ``logging.wandb_mode``. Usable as a context manager (``close`` on exit; an exception
    marks the run failed).
    """

    def __init__(self, cfg: Config, out_dir: str | Path, enabled: bool = True, resume_step: int | None = None):
        self.enabled = enabled
        self._tb: _EventFile | None = None
        self._tb_dir: Path | None = None
        self._run = None
        self._wandb_record: dict[str, Any] | None = None
        if not enabled:
            return
        tbx, wandb = _tensorboardx(cfg), _wandb(cfg)
        out = Path(out_dir).expanduser()
        out.mkdir(parents=True, exist_ok=True)
        cfg_dict = config_lib.to_dict(cfg)
        if tbx is not None:
            self._tb_dir = out / TENSORBOARD_DIR
            self._tb_dir.mkdir(exist_ok=True)
            for p in sorted(self._tb_dir.glob("events.out.tfevents.*")):
                if resume_step is None:  # a fresh run: the events of an earlier attempt would mix with ours
                    p.unlink()
                else:
                    _drop_events_after(p, resume_step)
            self._tb = _EventFile(tbx, self._tb_dir, 0 if resume_step is None else resume_step + 1)
            self._tb.text(0, "config", _config_markdown(cfg_dict))
            self._tb.hparams_start(_flat_config(cfg_dict), HPARAM_METRICS)
            self._tb.flush()
        if wandb is not None:
            self._run = self._open_wandb(wandb, cfg, out, cfg_dict, resume_step)

    # -- W&B -----------------------------------------------------------------------------------------

    def _open_wandb(self, wandb, cfg: Config, out: Path, cfg_dict: dict[str, Any], resume_step: int | None):
        id_file = out / WANDB_ID_FILE
        run_id = id_file.read_text().strip() if resume_step is not None and id_file.is_file() else ""
        resuming = bool(run_id)
        run_id = run_id or _new_run_id()
        mode = cfg.logging.wandb_mode
        try:
            run = wandb.init(
                project=cfg.logging.wandb_project,
                name=out.name,
                id=run_id,
                resume="allow" if resuming else None,
                mode=mode,
                dir=str(out),
                config=cfg_dict,
            )
        except wandb.errors.Error as e:
            msg = first_line(e)
            hint = "; run `wandb login`, or logging.wandb_mode=offline" if mode == "online" else ""
            raise ConfigError(f"logging.wandb_mode: could not start a {mode} W&B run: {msg}{hint}") from None
        id_file.write_text(run.id + "\n")
        run.define_metric(WANDB_STEP)
        run.define_metric("*", step_metric=WANDB_STEP)
        self._wandb_record = {
            "project": cfg.logging.wandb_project,
            "mode": mode,
            "run_id": run.id,
            "resumed": resuming,
            "dir": str(run.settings.sync_dir),
        }
        if mode == "online":
            self._wandb_record["url"] = run.url
        return run

    # -- the API the loop uses -----------------------------------------------------------------------

    def scalars(self, step: int, values: Mapping[str, Any], prefix: str) -> None:
        """Log ``values`` at ``step`` as ``"{prefix}/{key}"`` (see :func:`flatten_scalars` for the value types)."""
        if not self.enabled:
            return
        flat = flatten_scalars(values, prefix)
        if self._tb is not None and flat:
            self._tb.scalars(step, flat)
        if self._run is not None:
            self._run.log({WANDB_STEP: step, **flat})

    def text(self, tag: str, markdown: str, step: int = 0) -> None:
        """A Markdown note in TensorBoard's Text tab (W&B gets the config from its run config instead)."""
        if self._tb is not None:
            self._tb.text(step, tag, markdown)

    def flush(self) -> None:
        """Put every TensorBoard event logged so far on disk (done anyway every 30 s and by ``close``)."""
        if self._tb is not None:
            self._tb.flush()

    def close(self, ok: bool = True) -> None:
        """Flush and close the writer, finish the W&B run (``ok=False``: marked failed). Idempotent."""
        if self._tb is not None:
            self._tb.hparams_end(ok)
            self._tb.close()
            self._tb = None
        if self._run is not None:
            self._run.finish(exit_code=0 if ok else 1)
            self._run = None

    def record(self) -> dict[str, Any]:
        """What results.json records: ``{"tensorboard": dir | None, "wandb": {...} | None}``.

        The W&B entry holds ``project``, ``mode``, ``run_id``, ``resumed``, ``dir`` (the local run
        folder, the argument of ``wandb sync``) and, online, ``url``.
        """
        return {
            "tensorboard": str(self._tb_dir) if self._tb_dir is not None else None,
            "wandb": dict(self._wandb_record) if self._wandb_record is not None else None,
        }

    def __enter__(self) -> Trackers:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        self.close(ok=exc_type is None)
