"""Shared fixtures: compose the project's Hydra configs in-process, outputs under tmp_path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from hydra.core.global_hydra import GlobalHydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import open_dict

from mapa_exp.config import compose  # the one compose helper (it also registers the resolvers and schemas)

torch.set_num_threads(1)  # as training does: these networks are tiny, and the machine is shared

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"



def script_env(**extra: str) -> dict[str, str]:
    """The environment for ``python scripts/<x>.py`` in a subprocess: this checkout's package first (a script's
    own folder, not the repository root, heads its sys.path), no display, W&B offline."""
    path = os.pathsep.join([str(ROOT), *filter(None, [os.environ.get("PYTHONPATH")])])
    return {**os.environ, "PYTHONPATH": path, "MPLBACKEND": "Agg", "WANDB_MODE": "offline", **extra}


# a fast variant of every data set: fewer points, a cheaper surrogate fit, few batches
FAST = [
    "dataset.n_train=200",
    "dataset.n_val=100",
    "dataset.n_test=100",
    "dataset.surrogate.steps=300",
    "dataset.surrogate.n_fit=512",
    "trainer.max_epochs=1",
    "trainer.limit_train_batches=2",
    "trainer.limit_val_batches=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.enable_progress_bar=false",
    "trainer.log_every_n_steps=1",
]


def compose_cfg(overrides: list[str], run_dir: Path, cache_dir: Path, config_name: str = "train"):
    """A fully composed config with hydra's runtime fields set, as ``@hydra.main`` would see it."""
    cfg = compose(config_name, overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.hydra.runtime.output_dir = str(run_dir)
        cfg.hydra.runtime.cwd = str(ROOT)
        cfg.hydra.job.num = 0
        cfg.paths.run_dir = str(run_dir)
        cfg.paths.output_dir = str(run_dir.parent)
        cfg.paths.cache_dir = str(cache_dir)
    HydraConfig().set_config(cfg)
    GlobalHydra.instance().clear()
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory) -> Path:
    """One cache for the whole test session, so surrogates are fitted once per data set."""
    return tmp_path_factory.mktemp("cache")
