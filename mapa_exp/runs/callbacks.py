"""Lightning callbacks of a training job: preemption, and each member's metrics into its own loggers.

* ``StackCheckpoint`` -- ``checkpoints/last.ckpt`` of the job (all its members), written atomically every
  ``every_n_epochs`` epochs, at the last epoch, and whenever training is about to stop early (a signal, every
  member failed): a rerun resumes exactly from any of them.
* ``StopOnSignal`` -- on SIGTERM or SIGUSR2 (how SLURM preempts), or SIGINT (Ctrl-C), finish the current
  epoch, let the epoch-end checkpoint be written, and stop; ``run_job`` then reports ``status: preempted``
  (``interrupted`` for SIGINT) for every unfinished member and a rerun of the same command in the same folder
  resumes exactly.
* ``MemberLogging`` -- writes the per-member metrics the module hands out (``on_member_metrics``) as rows
  into each member's loggers (``mapa_exp.runs.loggers``), and gets them to disk before every checkpoint, so
  a run killed outright keeps the rows its last checkpoint covers.

The member identities written into each checkpoint are ``mapa_exp.runs.checkpoints.RunIdentity``'s.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path

from lightning.pytorch.callbacks import Callback, Checkpoint

log = logging.getLogger(__name__)


# -- checkpoints ---------------------------------------------------------------------------------
class StackCheckpoint(Checkpoint):
    """``<dirpath>/last.ckpt`` every ``every_n_epochs`` epochs, at the last epoch, and before an early stop.

    Resuming is exact from any epoch's end (the members' random streams are in the checkpoint), so the
    frequency only bounds the work a SIGKILL can lose; writing one costs about 5 ms, which at every epoch was
    a third of a small run's time. As a ``Checkpoint`` it runs after every other callback, so it sees the
    stop that ``StopOnSignal`` decided in the same epoch-end hook.
    """

    def __init__(self, dirpath: str, every_n_epochs: int = 10):
        if not (isinstance(every_n_epochs, int) and every_n_epochs >= 1):
            from mapa_exp.errors import ConfigError

            raise ConfigError("callbacks.checkpoint.every_n_epochs", every_n_epochs, "must be an integer >= 1")
        self.path = Path(dirpath) / "last.ckpt"
        self.every_n_epochs = every_n_epochs

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        done = trainer.current_epoch + 1
        last = trainer.max_epochs is not None and trainer.max_epochs >= 0 and done >= trainer.max_epochs
        if last or trainer.should_stop or done % self.every_n_epochs == 0:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            trainer.save_checkpoint(self.path, weights_only=False)  # all state; written to a temporary name, renamed


# -- preemption ---------------------------------------------------------------------------------
class StopOnSignal(Callback):
    """On one of ``signals``, stop at the end of the current epoch, after its checkpoint is written.

    The handlers replace Lightning's SIGTERM handler and Python's SIGINT handler (Ctrl-C) for the duration of
    training (stopping mid-epoch, a resume could not be exact); ``received`` holds the signal number
    afterwards. A second Ctrl-C while the epoch finishes stops at once (KeyboardInterrupt): the run is then
    ``interrupted`` and resumes from its previous checkpoint.
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR2", "SIGINT")):
        self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: do not wait for the epoch
        if self.received is None:
            log.warning("received %s: stopping after this epoch's checkpoint%s", signal.Signals(signum).name,
                        " (Ctrl-C again to stop at once)" if signum == signal.SIGINT else "")
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:  # after Lightning installs its own handlers
        self.received = None
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals to Lightning
                return

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # runs before StackCheckpoint's hook (checkpoint callbacks run last), which then saves this epoch
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
