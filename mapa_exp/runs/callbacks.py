"""Lightning callbacks of a training job: preemption, and each member's metrics into its own loggers.

* ``StopOnSignal`` -- on SIGTERM or SIGUSR2 (how SLURM preempts) finish the current epoch, let the
  epoch-end checkpoint be written, and stop; ``run_job`` then reports ``status: preempted`` for every
  unfinished member and a rerun of the same command in the same folder resumes exactly.
* ``MemberLogging`` -- writes the per-member metrics the module hands out (``on_member_metrics``) as rows
  into each member's loggers (``mapa_exp.runs.loggers``), and gets them to disk before every checkpoint, so
  a run killed outright keeps the rows its last checkpoint covers.

The member identities written into each checkpoint are ``mapa_exp.runs.checkpoints.RunIdentity``'s.
"""

from __future__ import annotations

import logging
import signal

from lightning.pytorch.callbacks import Callback

log = logging.getLogger(__name__)


# -- preemption ---------------------------------------------------------------------------------
class StopOnSignal(Callback):
    """On one of ``signals``, stop at the end of the current epoch, after its checkpoint is written.

    The handlers replace Lightning's SIGTERM handler for the duration of training (Lightning would stop
    mid-epoch, where a resume cannot be exact); ``received`` holds the signal number afterwards.
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR2")):
        self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: stopping after this epoch's checkpoint", signal.Signals(signum).name)
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:  # after Lightning installs its own handlers
        self.received = None
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals to Lightning
                return

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # runs before ModelCheckpoint's hook (checkpoint callbacks run last), which then saves this epoch
        if trainer.strategy.reduce_boolean_decision(self.received is not None, all=False):
            trainer.should_stop = True

    # restore before Lightning's own teardown, which then puts back the handlers from before fit()
    def on_train_end(self, trainer, pl_module) -> None:
        self._restore()

    def on_exception(self, trainer, pl_module, exception: BaseException) -> None:
        self._restore()

    def _restore(self) -> None:
        for s, handler in self._previous.items():
            signal.signal(s, handler)
        self._previous = {}

# -- per-member metrics ---------------------------------------------------------------------------
class MemberLogging(Callback):
    """Rows ``{"epoch", "step", <metric>: value}`` for each member's loggers (one list of loggers per member)."""

    def __init__(self, loggers: list[list]):
        self.loggers = loggers

    def on_member_metrics(self, trainer, pl_module, metrics: dict, step: int, epoch: int) -> None:
        values = {k: (v.tolist() if hasattr(v, "tolist") else [v] * len(self.loggers)) for k, v in metrics.items()}
        active = pl_module.active.tolist()
        for e, loggers in enumerate(self.loggers):
            if not active[e]:  # a failed member's values are frozen: its rows end at the failure
                continue
            row = {"epoch": epoch, "step": step, **{k: _number(v[e]) for k, v in values.items()}}
            for lg in loggers:
                lg.log_metrics(row)

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self.save()

    def on_train_end(self, trainer, pl_module) -> None:
        self.save()

    def save(self) -> None:
        for loggers in self.loggers:
            for lg in loggers:
                lg.save()


def _number(v):
    return int(v) if isinstance(v, bool) else v
