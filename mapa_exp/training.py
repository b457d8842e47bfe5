"""The training task: config in, trained run folder out (resolved config, metrics, checkpoint, results).

``run_training(cfg)`` is what ``train.py`` calls; tests call it in-process with a composed config.
It writes ``results.json`` atomically whatever happens: ``status: completed`` with the final bounds
and forward-pass counts, or ``status: failed`` with the reason.
"""

from __future__ import annotations

import logging
import math
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from omegaconf import DictConfig, OmegaConf

from mapa_exp.errors import ConfigError
from mapa_exp.io import atomic_write_json, atomic_write_text

log = logging.getLogger(__name__)


def build(cfg: DictConfig):
    """Instantiate ground truth, datamodule and module from a config; returns (datamodule, module)."""
    groundtruth = hydra.utils.instantiate(cfg.dataset)
    proposal = hydra.utils.instantiate(cfg.method.proposal) if cfg.method.get("proposal") else None
    datamodule = hydra.utils.instantiate(cfg.data, groundtruth=groundtruth, proposal=proposal)
    module = hydra.utils.instantiate(
        cfg.method.module,
        latent_dim=groundtruth.latent_dim,
        obs_dim=groundtruth.obs_dim,
        likelihood=groundtruth.likelihood,
        net=hydra.utils.instantiate(cfg.net),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
    )
    return datamodule, module


def _instantiate_group(node) -> list:
    return [hydra.utils.instantiate(c) for c in (node or {}).values() if c is not None and "_target_" in c]


@torch.no_grad()
def mean_bound(module, loader) -> float:
    """Mean per-point bound of ``module`` over a loader, in eval mode (nats per point)."""
    was_training = module.training
    module.eval()
    total, count = 0.0, 0
    for batch in loader:
        batch = {k: v.to(module.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        b = module.step(batch).bound
        total += b.double().sum().item()
        count += b.shape[0]
    module.train(was_training)
    return total / count


def run_training(cfg: DictConfig) -> dict:
    """Train one configuration; returns the results dict also written to ``results.json``."""
    run_dir = Path(cfg.paths.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    results = {
        "status": "running",
        "dataset": cfg.dataset.name,
        "method": cfg.method.name,
        "K": cfg.method.get("K"),
        "S": cfg.method.get("S"),
        "seed": cfg.seed,
        "draw": cfg.dataset.get("draw", 0),
        "run_dir": str(run_dir),
    }
    t0 = time.perf_counter()
    # config.yaml sits in the run folder before metrics.csv does: that is expected, not a clash
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    try:
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        if cfg.get("num_threads"):
            torch.set_num_threads(int(cfg.num_threads))
        L.seed_everything(cfg.seed, workers=True, verbose=False)
        datamodule, module = build(cfg)
        datamodule.setup("fit")
        loggers = _instantiate_group(cfg.get("logger"))
        for lg in loggers:
            lg.log_hyperparams(_loggable_config(cfg))
        trainer = hydra.utils.instantiate(cfg.trainer, callbacks=_instantiate_group(cfg.get("callbacks")), logger=loggers or False)
        ckpt = run_dir / "checkpoints" / "last.ckpt"
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt.exists() else None)
        results.update(
            status="completed",
            epochs=trainer.current_epoch,
            surrogate_mse=datamodule.groundtruth.surrogate_mse,
            proximity_cache_hit=datamodule.cache_hits.get("train"),
            train_bound=mean_bound(module, datamodule.train_eval_dataloader()),
            val_bound=mean_bound(module, datamodule.val_dataloader()),
            **module.forward_pass_summary(),
        )
        if not all(math.isfinite(results[k]) for k in ("train_bound", "val_bound")):
            raise FloatingPointError(f"final bound is not finite: {results['train_bound']}, {results['val_bound']}")
    except BaseException as exc:
        results.update(status="failed", reason=f"{type(_root_cause(exc)).__name__}: {_root_cause(exc)}")
        raise
    finally:
        results["wall_time_s"] = time.perf_counter() - t0
        atomic_write_json(run_dir / "results.json", results)
        log.info("results: %s", run_dir / "results.json")
        _finish_wandb()
    return results


def _loggable_config(cfg: DictConfig) -> dict:
    """The resolved run config without Hydra's own node, for logger hyperparameters."""
    out = OmegaConf.to_container(cfg, resolve=True)
    out.pop("hydra", None)
    return out


def _finish_wandb() -> None:
    """Close any W&B run so the next job of a multirun starts its own (never merged)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause (Hydra wraps constructor errors in InstantiationException)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind ``exc``, if that is what it is."""
    root = _root_cause(exc)
    return root if isinstance(root, ConfigError) else None
