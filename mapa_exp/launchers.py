"""SLURM launching: the hand-over that makes a preempted job requeue itself, and jobs grouped into one task.

A job's run folder is ``<sweep dir>/<job num>_...``; the sweep folder (its timestamp included) is fixed
when the sweep is submitted and travels, resolved, in the pickled launcher, so every attempt of a job --
a requeue after preemption or timeout, or ``scontrol requeue`` -- runs in the same folder and training
resumes from its ``checkpoints/last.ckpt``.

Preemption: SLURM sends SIGUSR2 ahead of a timeout (submitit's ``--signal``) or a preemption. During
training ``mapa_exp.callbacks.StopOnSignal`` holds that signal: it finishes the epoch, writes the
checkpoint and records ``status: preempted`` (and the signal) in results.json. submitit's own handler,
which would resubmit the job, never sees the signal then; ``HandBackPreemption`` therefore hands it back:
after a job stops as preempted it calls the handler now installed for that signal (submitit's, restored
when training ended), which re-dumps the job with the same arguments and runs ``scontrol requeue``.
``hydra_plugins.mapa_exp_launchers.slurm.SlurmLauncher`` (``hydra/launcher=slurm``) wraps its task function
in it, and with ``jobs_per_task > 1`` submits ``JobGroup``s: several jobs, one after the other, per task.
"""

from __future__ import annotations

import json
import logging
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def preempted_signal(run_dir: str | Path) -> int | None:
    """The signal number a run in ``run_dir`` stopped on (results.json ``status: preempted``), else None."""
    try:
        results = json.loads((Path(run_dir) / "results.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or results.get("status") != "preempted":
        return None
    sig = results.get("signal")
    return int(sig) if isinstance(sig, int) else int(signal.SIGUSR2)


def hand_back_signal(run_dir: str | Path) -> bool:
    """If the run in ``run_dir`` was preempted, call the handler installed for its signal (submitit's
    checkpoint-and-requeue inside a SLURM job); True when a Python handler was called."""
    sig = preempted_signal(run_dir)
    if sig is None:
        return False
    handler = signal.getsignal(sig)
    if not callable(handler):
        return False
    log.warning("run %s stopped on %s: handing the signal to %s", run_dir, signal.Signals(sig).name,
                getattr(handler, "__qualname__", handler))
    handler(sig, None)  # submitit: resubmits this very job (same folder) and exits the process
    return True


class HandBackPreemption:
    """A task function that, once the job's task returns or exits, hands a preemption signal back (above).

    A plain class (not a closure), so the launcher that holds it pickles for submitit's resubmission.
    """

    def __init__(self, task_function):
        self.task_function = task_function

    @classmethod
    def wrap(cls, task_function):
        return task_function if isinstance(task_function, cls) else cls(task_function)

    def __call__(self, cfg):
        from hydra.core.hydra_config import HydraConfig

        try:
            return self.task_function(cfg)
        finally:  # also when the task exits (train.py exits 128 + signal after a preemption)
            if HydraConfig.initialized():
                hand_back_signal(HydraConfig.get().runtime.output_dir)


class JobGroup:
    """Runs several jobs of a sweep in one SLURM task: ``JobGroup(launcher)(jobs)`` calls the launcher on each
    job's arguments in turn and returns their JobReturns. ``checkpoint`` makes submitit resubmit the whole
    group on preemption or timeout; there, completed jobs find their finished run and return at once."""

    def __init__(self, launcher):
        self.launcher = launcher

    def __call__(self, jobs: list) -> list:
        return [self.launcher(*job) for job in jobs]

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(self, *args, **kwargs)
