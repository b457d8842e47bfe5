"""Metric loggers built from config: W&B one run per job, offline unless an API key says otherwise."""

from __future__ import annotations

import os

from lightning.pytorch.loggers import WandbLogger


def wandb_logger(offline: bool | None = None, **kwargs) -> WandbLogger:
    """A ``WandbLogger`` that is offline when ``offline`` is true, or, when it is null, whenever no
    ``WANDB_API_KEY`` is set or ``WANDB_MODE`` is ``offline`` (air-gapped clusters; `wandb sync` later).
    The key itself is read by wandb from the environment and never enters a config or a result file.
    """
    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not os.environ.get("WANDB_API_KEY")
    return WandbLogger(offline=offline, **kwargs)
