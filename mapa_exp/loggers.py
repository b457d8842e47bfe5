"""Metric loggers built from config: W&B one run per job, offline unless an API key says otherwise."""

from __future__ import annotations

import logging
import os

from lightning.pytorch.loggers import WandbLogger

log = logging.getLogger(__name__)


class SurvivingWandbLogger(WandbLogger):
    """A ``WandbLogger`` whose run survives losing the W&B service process.

    On preemption or ``scontrol requeue`` SLURM signals every process of the job, the ``wandb-core`` service
    included, which exits on SIGTERM; W&B calls then raise ``ConnectionResetError``. Training must still
    finish its epoch, write the checkpoint and report ``preempted`` (``mapa_exp.callbacks.StopOnSignal``), so
    this logger warns once and stops logging to W&B; metrics.csv keeps every row, and the requeued attempt
    continues the same W&B run (its id comes from the run folder).
    """

    lost = False

    def _lose(self, exc: BaseException) -> None:
        if not self.lost:
            log.warning("W&B service lost (%s: %s); logging to metrics.csv only for the rest of this attempt",
                        type(exc).__name__, exc)
        self.lost = True

    def _guarded(self, send, *args, **kwargs) -> None:
        """Call ``send`` unless the service is gone; a lost connection is noted once, not raised."""
        if self.lost:
            return
        try:
            send(*args, **kwargs)
        except ConnectionError as exc:
            self._lose(exc)

    def log_metrics(self, *args, **kwargs) -> None:
        self._guarded(super().log_metrics, *args, **kwargs)

    def log_hyperparams(self, *args, **kwargs) -> None:
        self._guarded(super().log_hyperparams, *args, **kwargs)

    def after_save_checkpoint(self, *args, **kwargs) -> None:
        if not self.lost:
            super().after_save_checkpoint(*args, **kwargs)

    def finalize(self, status: str) -> None:
        if self.lost:
            return
        try:
            super().finalize(status)
        except ConnectionError as exc:
            self._lose(exc)


def wandb_logger(offline: bool | None = None, **kwargs) -> WandbLogger:
    """A ``WandbLogger`` (``SurvivingWandbLogger``) that is offline when ``offline`` is true, or, when it is
    null, whenever no ``WANDB_API_KEY`` is set or ``WANDB_MODE`` is ``offline`` (air-gapped clusters;
    `wandb sync` later). The key itself is read by wandb from the environment and never enters a config or a
    result file.
    """
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not os.environ.get("WANDB_API_KEY")
    return SurvivingWandbLogger(offline=offline, **kwargs)
