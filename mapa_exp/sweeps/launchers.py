"""SLURM launching: the hand-over that makes a preempted job (a run or a stack) requeue itself.

A job's run folder is ``<sweep dir>/<job num>_...``; the sweep folder (its timestamp included) is fixed
when the sweep is submitted and travels, resolved, in the pickled launcher, so every attempt of a job --
a requeue after preemption or timeout, or ``scontrol requeue`` -- runs in the same folder and training
resumes from its ``checkpoints/last.ckpt``.

Preemption: SLURM sends SIGUSR2 ahead of a timeout (submitit's ``--signal``) or a preemption. During
training ``mapa_exp.runs.callbacks.StopOnSignal`` holds that signal: it finishes the epoch, writes the
checkpoint and records ``status: preempted`` (and the signal) in results.json. submitit's own handler,
which would resubmit the job, never sees the signal then; ``HandBackPreemption`` therefore hands it back:
after a job stops as preempted it calls the handler now installed for that signal (submitit's, restored
when training ended), which re-dumps the job with the same arguments and runs ``scontrol requeue``.
``hydra_plugins.mapa_exp_launchers.slurm.SlurmLauncher`` (``hydra/launcher=slurm``) wraps its task function
in it. A stacked job (``stack=true``, ``mapa_exp.sweeps.stacking``) is one array task and requeues as one.
"""

from __future__ import annotations

import json
import logging
import os
import signal
from pathlib import Path

log = logging.getLogger(__name__)


def preempted_signal(run_dir: str | Path) -> int | None:
    """The signal number this process's job in ``run_dir`` stopped on (``status: preempted`` in a stack's
    ``stack.json`` or a run's ``results.json``, written by this process), else None. A status an earlier attempt
    left is not this attempt's: an attempt that fails before training (e.g. on a busy folder) must fail, not
    requeue itself again and again."""
    run_dir = Path(run_dir)
    status_file = run_dir / "stack.json" if (run_dir / "stack.json").exists() else run_dir / "results.json"
    try:
        results = json.loads(status_file.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(results, dict) or results.get("status") != "preempted" or results.get("pid") != os.getpid():
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
