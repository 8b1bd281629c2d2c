"""``lowrank-jax launch --local-processes N CMD ...``: one multi-process JAX run on this machine.

Starts N processes of ``lowrank-jax CMD ...`` (usually ``train``) that form one JAX distributed
job over CPU devices: a coordinator on a free localhost port (process 0 serves it),
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID`` for
:func:`lowrank_jax.sharding.maybe_initialize_distributed`, ``JAX_PLATFORMS=cpu`` and
``--devices-per-process K`` host devices each (``--xla_force_host_platform_device_count``), so
the run's mesh spans N*K devices with cross-process (gloo) collectives. It is how multi-host code
paths (global batches from each process's rows, collective orbax checkpoints, resume in another
process count) are exercised on one machine; pods and clusters start one process per host with
their own tools and ``LOWRANK_JAX_DISTRIBUTED=auto`` instead (README).

Output: process 0 (the one that logs, writes the run's files and shows the progress bar) keeps
the launcher's stdout/stderr unchanged; every other process's output goes to stderr line by line,
prefixed ``[process i]``.

Supervision: if a process fails (non-zero exit or a signal) the others are killed at once (a
survivor would otherwise sit in a collective that can never complete) and the launcher exits with
the failed process's status (``128 + signal`` for a signal). The cause is the process that exited
first (one waiter thread per process records the order); a process killed by a signal is taken as
the cause over one seen failing at the same time with a non-zero status, because a survivor's
collective fails within milliseconds of its peer's death and it then exits 1. Ctrl-C / SIGTERM are forwarded as
SIGINT / SIGTERM; processes still running ``--grace`` seconds later are killed. A forwarded SIGTERM is a preemption
notice (:mod:`lowrank_jax.train.preemption`): every process stops after the same step, checkpoints and exits 143,
which the launcher returns; ``--grace`` must cover one step and one checkpoint write. The children get
SIGKILL if the launcher itself dies (Linux).
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from typing import IO

DEVICE_COUNT_FLAG = "--xla_force_host_platform_device_count"
PREEMPTED_EXIT = 128 + signal.SIGTERM  # lowrank_jax.train.preemption.PREEMPTED_EXIT (that module imports jax)
# set by the launcher; a value inherited from the caller's environment would mix two jobs
_CLEARED_ENV = ("LOWRANK_JAX_DISTRIBUTED", "JAX_LOCAL_DEVICE_IDS", "JAX_COORDINATOR_BIND_ADDRESS")


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free on ``host`` right now (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _xla_flags(existing: str, devices: int) -> str:
    kept = [f for f in existing.split() if not f.startswith(DEVICE_COUNT_FLAG)]
    return " ".join([*kept, f"{DEVICE_COUNT_FLAG}={devices}"])


def process_env(
    base: dict[str, str], process_id: int, num_processes: int, devices_per_process: int, port: int
) -> dict[str, str]:
    """The environment of process ``process_id`` of a local run."""
    env = {k: v for k, v in base.items() if k not in _CLEARED_ENV}
    env.update(
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_COORDINATOR_BIND_ADDRESS=f"127.0.0.1:{port}",  # not every interface (JAX's default)
        JAX_NUM_PROCESSES=str(num_processes),
        JAX_PROCESS_ID=str(process_id),
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=_xla_flags(base.get("XLA_FLAGS", ""), devices_per_process),
    )
    if process_id:
        env["PYTHONUNBUFFERED"] = "1"  # its lines reach the launcher as they are printed
    return env


def _child_setup() -> None:  # pragma: no cover - runs in the child between fork and exec
    """Default SIGINT, and on Linux a SIGKILL when the launcher dies (PR_SET_PDEATHSIG).

    An ignored SIGINT survives exec, and Python only turns SIGINT into KeyboardInterrupt when it
    starts with the signal not ignored: a launcher started from a background job (or a test
    worker) would otherwise hand its children an ignored SIGINT, and Ctrl-C could not stop them.
    """
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def exit_status(returncode: int) -> int:
    """A shell-style exit status: ``128 + N`` for a process killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _forward(stream: IO[bytes], prefix: str, out: IO[str]) -> None:
    for raw in iter(stream.readline, b""):
        line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
        out.write(f"{prefix}{line}\n")
        out.flush()
    stream.close()


def _kill(procs: Sequence[subprocess.Popen], sig: int) -> None:
    for p in procs:
        if p.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(p.pid, sig)  # the child leads its own process group (start_new_session)


def launch(
    command: Sequence[str],
    num_processes: int,
    devices_per_process: int = 1,
    port: int | None = None,
    grace_s: float = 10.0,
    python: str = sys.executable,
    env: dict[str, str] | None = None,
    log: Callable[[str], None] = lambda msg: print(f"launch: {msg}", file=sys.stderr, flush=True),
) -> int:
    """Run ``lowrank-jax COMMAND`` as ``num_processes`` local JAX processes; returns the exit status.

    0 when every process exits 0; otherwise the status of the first process that failed (the rest
    are killed), 130 / 143 after Ctrl-C / SIGTERM.
    """
    if num_processes < 1:
        raise ValueError(f"--local-processes: must be >= 1, got {num_processes}")
    if devices_per_process < 1:
        raise ValueError(f"--devices-per-process: must be >= 1, got {devices_per_process}")
    if not command:
        raise ValueError("launch: give the subcommand to run, e.g. `launch --local-processes 2 train tiny`")
    port = port or free_port()
    base = dict(os.environ if env is None else env)
    argv = [python, "-m", "lowrank_jax.train.cli", *command]
    procs: list[subprocess.Popen] = []
    try:
        for i in range(num_processes):
            procs.append(
                subprocess.Popen(
                    argv,
                    env=process_env(base, i, num_processes, devices_per_process, port),
                    stdout=None if i == 0 else subprocess.PIPE,
                    stderr=None if i == 0 else subprocess.STDOUT,
                    start_new_session=True,  # signals reach it only through the launcher
                    preexec_fn=_child_setup,
                )
            )
    except BaseException:
        _kill(procs, signal.SIGKILL)
        raise
    # threads start only after every fork (preexec_fn is not safe with threads running)
    threads = [
        threading.Thread(target=_forward, args=(p.stdout, f"[process {i}] ", sys.stderr), daemon=True)
        for i, p in enumerate(procs)
        if p.stdout is not None
    ]
    for t in threads:
        t.start()

    received: list[int] = []

    def on_signal(signum: int, _frame) -> None:
        if received:  # a second Ctrl-C: no more waiting
            _kill(procs, signal.SIGKILL)
        received.append(signum)
        _kill(procs, signal.SIGINT if signum == signal.SIGINT else signal.SIGTERM)

    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous = {s: signal.signal(s, on_signal) for s in handled}
    exits: list[int] = []  # process indices in the order they exited

    def wait_for(i: int, p: subprocess.Popen) -> None:
        p.wait()
        exits.append(i)  # list.append is atomic

    waiters = [threading.Thread(target=wait_for, args=(i, p), daemon=True) for i, p in enumerate(procs)]
    for t in waiters:
        t.start()
    failed, deadline = None, None
    try:
        while True:
            done = len(exits) == len(procs)  # read first: every exit up to here is judged below
            if failed is None and not received:
                failed = _cause([(i, procs[i].returncode) for i in list(exits)])
                if failed is not None:
                    status = exit_status(procs[failed].returncode)
                    log(f"process {failed} exited with status {status}; stopping the other processes")
                    _kill(procs, signal.SIGKILL)
            if received and deadline is None:
                deadline = time.monotonic() + grace_s
            if deadline is not None and time.monotonic() > deadline:
                log(f"processes still running {grace_s:g}s after {signal.Signals(received[0]).name}; killing them")
                _kill(procs, signal.SIGKILL)
                deadline = float("inf")
            if done:
                break
            time.sleep(0.02)
    finally:
        for s, h in previous.items():
            signal.signal(s, h)
        _kill(procs, signal.SIGKILL)
        for t in (*waiters, *threads):
            t.join(timeout=5)
    if received:
        return 128 + received[0]
    if failed is None and any(p.returncode == PREEMPTED_EXIT for p in procs):
        log(f"preempted: every process saved the checkpoint and exited with status {PREEMPTED_EXIT}")
        return PREEMPTED_EXIT
    return 0 if failed is None else exit_status(procs[failed].returncode)


def _cause(exited: Sequence[tuple[int, int]]) -> int | None:
    """The failed process to blame among ``(index, returncode)`` in exit order: a signal first.

    A process that exits with :data:`~lowrank_jax.train.preemption.PREEMPTED_EXIT` saved its part of the
    preemption checkpoint and is not a failure: the others stop at the same step on their own.
    """
    failures = [(i, rc) for i, rc in exited if rc not in (0, PREEMPTED_EXIT)]
    signalled = [i for i, rc in failures if rc < 0]
    return signalled[0] if signalled else failures[0][0] if failures else None
