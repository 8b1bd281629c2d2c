"""Several real JAX processes on this machine train one run (``lowrank-jax launch``).

Every run goes through the CLI in subprocesses: ``lowrank-jax launch --local-processes N train``
(N processes, a localhost coordinator, gloo CPU collectives, one device each unless stated) against
``lowrank-jax train`` in one process with the same number of fake devices. The mesh is data
parallel over every device, so each process feeds its own rows of the global batch.

- N processes give the per-step losses of one process over N devices (rtol 1e-5);
- SIGKILL of one process after a checkpoint: the launcher kills the rest and fails; a restart of
  all with ``resume=true`` reproduces the uninterrupted run's losses bitwise;
- a checkpoint written by 2 processes resumes in 1 process over 2 devices (and one written by
  1 process resumes in 4) with the same losses;
- a process that raises exits at once and the launcher stops the rest; an unreadable newest
  checkpoint is skipped by every process alike;
- the launcher itself (with a stand-in interpreter): first failure's status, Ctrl-C forwarding.

The kill is deterministic: a ``sitecustomize`` put on the children's PYTHONPATH SIGKILLs process
``P`` when it is about to save checkpoint ``S``, once an earlier checkpoint is on disk (the run
has then done steps past that checkpoint that are lost).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest

from lowrank_jax import storage
from lowrank_jax.train import cli
from lowrank_jax.train.checkpoint import checkpoint_steps
from lowrank_jax.train.launch import exit_status, launch, process_env
from lowrank_jax.train.metrics import read_metrics
from lowrank_jax.train.preemption import PREEMPTED_EXIT

STEPS, EVERY, KILL_AT = 12, 4, 8
RUN = [f"steps={STEPS}", f"checkpoint_every={EVERY}", "keep_checkpoints=5", "log_every=1", "mesh=-1,1,1"]

KILL_HOOK = """
import os, signal, time
_spec = os.environ.get("LRJ_TEST_KILL")
if _spec:
    _proc, _step, _how = _spec.split(":")
    _proc, _step = int(_proc), int(_step)
    from lowrank_jax.train import checkpoint as _ckpt

    _save = _ckpt.Checkpointer.save

    def save(self, step, state, meta):
        import jax

        if step == _step and jax.process_index() == _proc:
            deadline = time.time() + 120
            while not _ckpt.checkpoint_steps(self.directory) and time.time() < deadline:
                time.sleep(0.02)
            if _how == "raise":
                raise RuntimeError(f"test failure in process {_proc}")
            os.kill(os.getpid(), signal.SIGKILL)
        return _save(self, step, state, meta)

    _ckpt.Checkpointer.save = save
"""


_COMPILE_CACHE: list[str] = []  # this module's persistent compilation cache (the runs repeat programs)
_WORK_DIR: list[Path] = []  # the working directory of this module's subprocesses: empty, never the repository


@pytest.fixture(scope="module", autouse=True)
def compile_cache(tmp_path_factory):
    _COMPILE_CACHE.append(str(tmp_path_factory.mktemp("jax_cache")))
    _WORK_DIR.append(tmp_path_factory.mktemp("cwd"))
    yield
    _COMPILE_CACHE.clear()
    _WORK_DIR.clear()


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "LOWRANK_JAX_"))}
    if _COMPILE_CACHE:  # ~25% faster; the kill/resume runs load what the uninterrupted run compiled
        env.update(JAX_COMPILATION_CACHE_DIR=_COMPILE_CACHE[0], JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
    return {**env, "JAX_PLATFORMS": "cpu", **extra}


def _run(args: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    t0 = time.time()
    res = subprocess.run(
        [sys.executable, "-m", "lowrank_jax.train.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        cwd=_WORK_DIR[0],
    )
    print(f"{time.time() - t0:5.1f}s  {' '.join(args[:4])} -> {res.returncode}")
    return res


def single(small_overrides, out: Path, devices: int, *extra: str, env=None) -> subprocess.CompletedProcess:
    """``lowrank-jax train`` in one process over ``devices`` fake CPU devices."""
    env = {**(env or _env()), "XLA_FLAGS": f"--xla_force_host_platform_device_count={devices}"}
    return _run(["train", "tiny", *small_overrides, f"out_dir={out}", *RUN, *extra], env)


def launched(small_overrides, out: Path, n: int, *extra: str, devices: int = 1, env=None):
    """``lowrank-jax launch --local-processes n train ...``."""
    args = ["launch", "--local-processes", str(n), "--devices-per-process", str(devices)]
    return _run([*args, "train", "tiny", *small_overrides, f"out_dir={out}", *RUN, *extra], env or _env())


def _ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, res.stdout[-3000:] + res.stderr[-3000:]
    return res


def losses(out: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in read_metrics(out / "metrics.jsonl") if "loss" in r}


def val_loss(out: Path) -> float:
    return [r["val_loss"] for r in read_metrics(out / "metrics.jsonl") if "val_loss" in r][-1]


def assert_close(got: Path, want: Path, rtol: float = 1e-5) -> None:
    g, w = losses(got), losses(want)
    assert sorted(g) == sorted(w) == list(range(1, STEPS + 1))
    np.testing.assert_allclose([g[s] for s in w], [w[s] for s in w], rtol=rtol)
    np.testing.assert_allclose(val_loss(got), val_loss(want), rtol=rtol)


@pytest.fixture(scope="module")
def runs(small_overrides, tmp_path_factory) -> dict[str, Path]:
    """The uninterrupted runs, made once: 1 process over 2 devices and 2 processes of 1 device."""
    root = tmp_path_factory.mktemp("mp")
    _ok(single(small_overrides, root / "one_x2", 2))  # also fills the data cache for the rest
    _ok(launched(small_overrides, root / "two", 2))
    return {"one_x2": root / "one_x2", "two": root / "two", "root": root}


@pytest.mark.slow  # 47 s on 2 cores
def test_two_processes_match_one_process(runs):
    assert_close(runs["two"], runs["one_x2"])
    assert checkpoint_steps(runs["two"] / "checkpoints") == list(range(EVERY, STEPS + 1, EVERY))
    # only process 0 writes the run's files; both wrote their part of every checkpoint
    assert (runs["two"] / "results.json").is_file() and (runs["two"] / "loss.png").is_file()


def _kill_env(tmp: Path, process: int, how: str = "sigkill") -> dict[str, str]:
    """An environment in which process ``process`` SIGKILLs itself (or raises) about to save checkpoint KILL_AT."""
    d = tmp / "hook"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(textwrap.dedent(KILL_HOOK))
    path = os.pathsep.join(p for p in (str(d), os.environ.get("PYTHONPATH")) if p)
    return _env(PYTHONPATH=path, LRJ_TEST_KILL=f"{process}:{KILL_AT}:{how}")


@pytest.mark.slow  # 46 s; the gs:// kill-and-resume test below covers two processes
def test_sigkill_one_process_then_resume_all_is_exact(small_overrides, runs, tmp_path):
    out = tmp_path / "killed"
    env = _kill_env(tmp_path, 1)
    t0 = time.time()
    res = launched(small_overrides, out, 2, env=env)
    assert res.returncode == 128 + signal.SIGKILL, res.stderr[-3000:]
    assert "process 1 exited with status 137; stopping the other processes" in res.stderr
    assert time.time() - t0 < 120  # process 0 did not hang in a collective
    saved = checkpoint_steps(out / "checkpoints")
    assert saved and max(saved) < KILL_AT, saved
    assert not (out / "results.json").exists()
    # the same checkpoint resumed by 1 process over 2 devices (another process count)
    shutil.copytree(out, tmp_path / "other_count")

    res = _ok(launched(small_overrides, out, 2, "resume=true"))
    resumed_from = int(res.stdout.split("resumed from step ")[1].split()[0])
    assert 0 < resumed_from < KILL_AT
    got, want = losses(out), losses(runs["two"])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in want), "resumed losses differ from the uninterrupted run's"
    assert val_loss(out) == val_loss(runs["two"])

    _ok(single(small_overrides, tmp_path / "other_count", 2, "resume=true"))
    assert_close(tmp_path / "other_count", runs["one_x2"])


@pytest.mark.slow  # 48 s on 2 cores
def test_gcs_prepare_two_processes_kill_resume_is_bitwise_local(small_overrides, runs, gcs, tmp_path):
    """On a GCS emulator: prepare to gs://, 2 processes checkpoint to gs://, one is killed, all resume from gs://.

    The per-step losses equal the same 2-process run on local disk bitwise; results.json, metrics.jsonl and
    the TensorBoard events are read back from the bucket.
    """
    shards, out = gcs.url("shards"), gcs.url("run")
    _ok(_run(["prepare", "tiny", *small_overrides, f"data.shards={shards}"], _env()))
    res = launched(small_overrides, out, 2, f"data.shards={shards}", env={**_kill_env(tmp_path, 1), **gcs.env})
    assert res.returncode == 128 + signal.SIGKILL, res.stderr[-3000:]
    saved = checkpoint_steps(f"{out}/checkpoints")
    assert saved and max(saved) < KILL_AT, saved
    assert not storage.as_path(f"{out}/results.json").exists()
    res = _ok(launched(small_overrides, out, 2, f"data.shards={shards}", "resume=true"))
    assert 0 < int(res.stdout.split("resumed from step ")[1].split()[0]) < KILL_AT

    back = tmp_path / "from_bucket"  # what a reader of the bucket sees
    storage.download_tree(out, back, skip=("checkpoints",))
    got, want = losses(back), losses(runs["two"])
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == want[s] for s in want), "losses on gs:// differ from the local run's"
    results = json.loads((back / "results.json").read_text())
    assert results["final_val_loss"] == val_loss(runs["two"])
    assert checkpoint_steps(f"{out}/checkpoints")[-1] == STEPS
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(back / "tensorboard"))
    events.Reload()
    tb = {e.step: e.value for e in events.Scalars("train/loss")}
    assert sorted(tb) == list(range(1, STEPS + 1)) and all(np.float32(want[s]) == tb[s] for s in want)
    assert not list(Path.cwd().iterdir())  # no local directory named "gs:"


TERM_HOOK = """
import os, signal, time
_spec = os.environ.get("LRJ_TEST_TERM")
if _spec:
    _proc, _step, _stamp = _spec.split(":", 2)
    from lowrank_jax.train import preemption as _preemption

    _reached = _preemption.PreemptionWatch.reached

    def reached(self, step):
        import jax

        if step == int(_step) and jax.process_index() == int(_proc):
            with open(_stamp, "w") as f:
                f.write(repr(time.time()))
            os.kill(os.getpid(), signal.SIGTERM)
        return _reached(self, step)

    _preemption.PreemptionWatch.reached = reached
"""


def _term_env(tmp: Path, process: int, step: int) -> dict[str, str]:
    """An environment in which process ``process`` gets SIGTERM once it has run ``step`` steps."""
    d = tmp / "term_hook"
    d.mkdir(exist_ok=True)
    (d / "sitecustomize.py").write_text(textwrap.dedent(TERM_HOOK))
    path = os.pathsep.join(p for p in (str(d), os.environ.get("PYTHONPATH")) if p)
    return _env(PYTHONPATH=path, LRJ_TEST_TERM=f"{process}:{step}:{tmp / 'signal_time'}")


@pytest.mark.parametrize("n", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_sigterm_checkpoints_one_agreed_step_and_resume_is_bitwise(rng, small_overrides, runs, tmp_path, n):
    """SIGTERM to the last process at a random step: every process stops after the same step, saves it,
    exits 143 with "preempted at step N"; ``resume=true`` gives the uninterrupted run's losses bitwise."""
    at = int(rng.integers(1, STEPS - 2))
    out = tmp_path / "run"

    def train(*extra: str, env=None):
        if n == 1:
            return single(small_overrides, out, 2, *extra, env=env)
        return launched(small_overrides, out, 2, *extra, env=env)

    res = train(env=_term_env(tmp_path, n - 1, at))
    lag = time.time() - float((tmp_path / "signal_time").read_text())
    assert res.returncode == PREEMPTED_EXIT, res.stderr[-3000:]
    stopped = int(res.stderr.split("preempted at step ")[1].split()[0])
    print(f"SIGTERM at step {at} in process {n - 1}: stopped at step {stopped}, {lag:.2f}s from signal to exit")
    assert at <= stopped <= at + 2 and stopped in checkpoint_steps(out / "checkpoints")
    assert not (out / "results.json").exists()
    res = _ok(train("resume=true"))
    assert f"resumed from step {stopped} " in res.stdout
    want = runs["one_x2"] if n == 1 else runs["two"]
    got, ref = losses(out), losses(want)
    assert sorted(got) == list(range(1, STEPS + 1))
    assert all(got[s] == ref[s] for s in ref), "resumed losses differ from the uninterrupted run's"
    assert val_loss(out) == val_loss(want)


@pytest.mark.slow
def test_sigterm_to_the_launcher_stops_every_process_at_one_step(small_overrides, runs, tmp_path):
    out = tmp_path / "run"
    args = ["launch", "--local-processes", "2", "--grace", "60", "train", "tiny", *small_overrides]
    cmd = [sys.executable, "-m", "lowrank_jax.train.cli", *args, f"out_dir={out}", *RUN, "steps=400"]
    proc = subprocess.Popen(
        cmd, env=_env(), cwd=_WORK_DIR[0], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.time() + 240
    while not (out / "metrics.jsonl").is_file() or len((out / "metrics.jsonl").read_text().splitlines()) < 3:
        assert time.time() < deadline and proc.poll() is None
        time.sleep(0.2)
    t0 = time.time()
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    print(f"launcher SIGTERM to exit: {time.time() - t0:.2f}s")
    assert proc.returncode == PREEMPTED_EXIT, err[-3000:]
    stopped = int(err.split("preempted at step ")[1].split()[0])
    assert stopped in checkpoint_steps(out / "checkpoints")
    assert err.count(f"preempted at step {stopped}") == 2  # process 0 and, prefixed, process 1


@pytest.mark.slow
def test_four_processes_match_one_process_and_resume_across_counts(small_overrides, runs, tmp_path):
    """4 processes of 1 device and 2 of 2 devices equal 1 process over 4; a 1-process checkpoint resumes in 4."""
    one = tmp_path / "one_x4"
    _ok(single(small_overrides, one, 4))
    _ok(launched(small_overrides, tmp_path / "four", 4))
    assert_close(tmp_path / "four", one)
    _ok(launched(small_overrides, tmp_path / "two_x2", 2, devices=2))
    assert_close(tmp_path / "two_x2", one)
    # a 1-process run killed after a checkpoint (the same hook; steps= must stay: it sets the schedule)
    part = tmp_path / "part"
    res = single(small_overrides, part, 4, env=_kill_env(tmp_path, 0))
    assert res.returncode == -signal.SIGKILL and checkpoint_steps(part / "checkpoints"), res.stderr[-3000:]
    _ok(launched(small_overrides, part, 4, "resume=true"))
    assert_close(part, one)


@pytest.mark.slow
def test_an_exception_in_one_process_fails_the_run_at_once(small_overrides, tmp_path):
    """Process 1 raises mid-run: it exits 1 at once (no wait in JAX's shutdown barrier), the launcher stops 0."""
    t0 = time.time()
    res = launched(small_overrides, tmp_path / "raised", 2, env=_kill_env(tmp_path, 1, "raise"))
    assert res.returncode == 1, res.stderr[-3000:]
    assert "[process 1] RuntimeError: test failure in process 1" in res.stderr
    assert "process 1 exited with status 1; stopping the other processes" in res.stderr
    assert time.time() - t0 < 90


@pytest.mark.slow
def test_damaged_checkpoint_falls_back_in_every_process(small_overrides, runs, tmp_path):
    """The newest checkpoint of a 2-process run is unreadable: both processes take the older one, one moves it."""
    out = tmp_path / "damaged"
    shutil.copytree(runs["two"], out)
    newest = out / "checkpoints" / str(STEPS)
    for f in (newest / "state").rglob("*"):
        if f.is_file():
            f.write_bytes(b"garbage")
    res = _ok(launched(small_overrides, out, 2, "resume=true"))
    assert f"resumed from step {STEPS - EVERY}" in res.stdout
    assert res.stderr.count(f"moved unreadable checkpoint {STEPS}") == 1
    assert checkpoint_steps(out / "checkpoints")[-1] == STEPS and (out / "checkpoints" / f"damaged_{STEPS}").is_dir()
    assert losses(out) == losses(runs["two"])


def test_launch_errors(small_overrides, tmp_path, capsys):
    assert cli.main(["launch", "--local-processes", "2"]) == 2
    assert "give a subcommand to run (train, " in capsys.readouterr().err
    assert cli.main(["launch", "--local-processes", "2", "launch", "train"]) == 2
    assert cli.main(["launch", "--local-processes", "0", "configs"]) == 2
    assert "--local-processes: must be >= 1" in capsys.readouterr().err
    # a config error in every process: the launcher returns their status
    run = ["train", "tiny", *small_overrides, f"out_dir={tmp_path / 'run'}", "mesh=1,1,1"]
    res = _run(["launch", "--local-processes", "2", *run], _env())
    assert res.returncode == 2, res.stderr[-3000:]
    assert "mesh: (1, 1, 1) is one device, but 2 processes share this run" in res.stderr


def _fake_python(tmp_path: Path, body: str) -> str:
    """An executable that stands in for the child interpreter: runs ``body`` whatever its arguments."""
    (tmp_path / "fake.py").write_text(textwrap.dedent(body))
    wrapper = tmp_path / "py"
    wrapper.write_text(f"#!/bin/sh\nexec {sys.executable} {tmp_path / 'fake.py'}\n")
    wrapper.chmod(0o755)
    return str(wrapper)


def test_a_failing_process_stops_the_others(tmp_path):
    """Process 1 exits with status 3 while process 0 would wait forever: 0 is killed, the status is 3."""
    python = _fake_python(
        tmp_path,
        """
        import os, sys, time
        print("hello from", os.environ["JAX_PROCESS_ID"], flush=True)
        if os.environ["JAX_PROCESS_ID"] == "1":
            sys.exit(3)
        time.sleep(600)
        """,
    )
    lines: list[str] = []
    t0 = time.time()
    assert launch(["train"], 2, python=python, log=lines.append, env=_env()) == 3
    assert time.time() - t0 < 30
    assert lines == ["process 1 exited with status 3; stopping the other processes"]


def test_a_killed_process_is_blamed_over_the_survivor_whose_collective_failed(tmp_path):
    """Process 1 is SIGKILLed and process 0 exits 1 a moment later (as gloo does): the status is 137."""
    python = _fake_python(
        tmp_path,
        f"""
        import os, pathlib, signal, sys, time
        mark = pathlib.Path({str(tmp_path)!r}, "dying")
        if os.environ["JAX_PROCESS_ID"] == "1":
            mark.touch()
            os.kill(os.getpid(), signal.SIGKILL)
        while not mark.exists():
            time.sleep(0.001)
        time.sleep(0.002)
        sys.exit(1)
        """,
    )
    lines: list[str] = []
    assert launch(["train"], 2, python=python, log=lines.append, env=_env()) == 128 + signal.SIGKILL
    assert lines == ["process 1 exited with status 137; stopping the other processes"]


def test_the_cause_is_the_first_signal_then_the_first_exit():
    from lowrank_jax.train.launch import _cause

    assert _cause([]) is None and _cause([(1, 0), (0, 0)]) is None
    assert _cause([(0, 1), (1, -signal.SIGKILL)]) == 1  # seen together: the signal is the cause
    assert _cause([(1, 0), (2, 3), (0, 1)]) == 2  # in exit order
    assert _cause([(2, -15), (0, -9)]) == 2


@pytest.mark.parametrize("ignores_sigint", [False, True])
def test_ctrl_c_is_forwarded(tmp_path, ignores_sigint):
    """SIGINT to the launcher reaches every process; one that ignores it is killed after the grace period."""
    python = _fake_python(
        tmp_path,
        f"""
        import os, pathlib, signal, time
        if {ignores_sigint}:
            signal.signal(signal.SIGINT, signal.SIG_IGN)
        pathlib.Path({str(tmp_path)!r}, "ready_" + os.environ["JAX_PROCESS_ID"]).touch()
        time.sleep(600)
        """,
    )
    # a process that honours SIGINT gets a long grace (a loaded machine may take seconds to exit it)
    grace = 1 if ignores_sigint else 15
    code = (
        "import sys; from lowrank_jax.train.launch import launch; "
        f"sys.exit(launch(['train'], 3, python=sys.argv[1], grace_s={grace}))"
    )
    # the launcher starts with SIGINT ignored, as under a background job or a test worker: an ignored
    # SIGINT survives exec, so the launcher must give its children the default back
    launcher = subprocess.Popen(
        [sys.executable, "-c", code, python],
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
        cwd=tmp_path,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN),
    )
    deadline = time.time() + 60
    while len(list(tmp_path.glob("ready_*"))) < 3 and time.time() < deadline:
        time.sleep(0.05)
    t0 = time.time()
    launcher.send_signal(signal.SIGINT)
    _, err = launcher.communicate(timeout=60)
    assert launcher.returncode == 130, err
    assert time.time() - t0 < 30
    assert (f"still running {grace}s after SIGINT; killing them" in err) == ignores_sigint, err


def test_process_env():
    base = {"XLA_FLAGS": "--xla_foo=1 --xla_force_host_platform_device_count=8", "LOWRANK_JAX_DISTRIBUTED": "auto"}
    env = process_env(base, 1, 4, 2, 12345)
    assert env["JAX_COORDINATOR_ADDRESS"] == "127.0.0.1:12345"
    assert (env["JAX_NUM_PROCESSES"], env["JAX_PROCESS_ID"], env["JAX_PLATFORMS"]) == ("4", "1", "cpu")
    assert env["XLA_FLAGS"] == "--xla_foo=1 --xla_force_host_platform_device_count=2"
    assert "LOWRANK_JAX_DISTRIBUTED" not in env
    assert exit_status(-9) == 137 and exit_status(2) == 2
