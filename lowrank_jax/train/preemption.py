"""Preemption: SIGTERM to any process of a run → every process stops after the same step, checkpoints, exits.

A preempted VM (a Cloud TPU / spot GPU) or a cluster scheduler (SLURM ``--signal``, Kubernetes)
sends SIGTERM some seconds before it kills the job. :class:`PreemptionWatch` answers, after every
step, "is this the step to stop at?": a SIGTERM handler sets a flag in the process that got the
signal, and with several processes one tiny all-gather of the flags after each step makes every
process see it after the same step (jax's own preemption sync point,
``multihost_utils.reached_preemption_sync_point``, did not report the notice of a CPU process
within a run of a dozen steps here, so the agreement is explicit).

The loop then saves a checkpoint of that step, waits for it, and raises :class:`Preempted`; the
command line prints ``preempted at step N`` and exits with :data:`PREEMPTED_EXIT` (143, the status
of a process ended by SIGTERM, which schedulers treat as "terminated, may be requeued").
``resume=true`` continues from that checkpoint exactly. From the signal to the exit takes at most
one step (the one in flight), one checkpoint write and the exit.
"""

from __future__ import annotations

import signal
import threading
import time

import jax

PREEMPTED_EXIT = 128 + signal.SIGTERM  # 143


class Preempted(Exception):  # noqa: N818 - an outcome, not an error
    """The run stopped at ``step`` on a preemption notice, after saving checkpoint ``step``."""

    def __init__(self, step: int, signal_time: float | None):
        super().__init__(f"preempted at step {step}")
        self.step = step
        self.signal_time = signal_time  # time.time() of the SIGTERM in this process (None: seen from another)


class PreemptionWatch:
    """After each step, :meth:`reached` says whether to stop there (the same step in every process)."""

    def __init__(self) -> None:
        self.signal_time: float | None = None
        self._previous = None
        self._distributed = jax.process_count() > 1
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGTERM, self._on_sigterm)

    def _on_sigterm(self, signum, frame) -> None:
        self.signal_time = time.time()

    def reached(self, step: int) -> bool:
        """Whether the run must stop after ``step`` steps (call it after every step, in every process)."""
        seen = self.signal_time is not None
        if self._distributed:
            import numpy as np
            from jax.experimental import multihost_utils

            return bool(np.any(multihost_utils.process_allgather(np.asarray(seen, np.int32))))
        return seen

    def close(self) -> None:
        """Give SIGTERM back its previous handler."""
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None


def stop_preempted(loop, step: int) -> None:
    """Save checkpoint ``step`` of ``loop`` (a :class:`lowrank_jax.train.loop.Loop`), close its records, raise.

    Every process calls it at the same step (:meth:`PreemptionWatch.reached`), so the collective
    save completes; the records of a gs:// out_dir are uploaded before the exit.
    """
    run, outputs = loop.run, loop.outputs
    loop.preemption.close()
    outputs.flush_metrics(run.cfg.tokens_per_step)
    if step not in outputs.checkpointer.manager.all_steps():
        outputs.save(run, step, loop.state)
    outputs.checkpointer.close()  # waits for the write
    outputs.mlog.close()
    if outputs.outdir is not None:
        outputs.outdir.push()
    raise Preempted(step, loop.preemption.signal_time)
