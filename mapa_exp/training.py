"""The training task: config in, trained run folder out (resolved config, metrics, checkpoint, results).

``run_training(cfg)`` is what ``train.py`` calls; tests call it in-process with a composed config.
It writes ``results.json`` atomically whatever happens: ``status: completed`` with the final bounds
and forward-pass counts, ``status: failed`` with the reason, or ``status: preempted`` (SIGTERM/SIGUSR2);
a run killed outright stays ``running``. Rerun in the same folder, a run resumes exactly from its last
checkpoint (see ``mapa_exp.callbacks``), keeping the metrics rows of the epochs already done.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import re
import signal
import sys
import time
import warnings
from pathlib import Path

import hydra
import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mapa_exp.callbacks import NonFiniteGuard, RunIdentity, StopOnSignal, check_resumable
from mapa_exp.errors import ConfigError, check
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
def mean_bound(module, loader, seed: int | None = None) -> float:
    """Mean per-point bound of ``module`` over a loader, in eval mode (nats per point).

    With ``seed`` the sampling (MAPA tail samples, VAE noise) runs on a forked RNG seeded with it, so the
    number depends only on the weights and the seed, not on how training got there (e.g. a resume).
    """
    if seed is not None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            return mean_bound(module, loader)
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


class RunFailed(RuntimeError):
    """A run stopped for a reason stated in one line that names the run (e.g. a non-finite loss)."""


def run_identity(cfg: DictConfig) -> dict:
    """What makes two runs the same run, flat ``{config key: value}``: data, method, net, optimiser, seed.

    A checkpoint resumes only into a run with the same identity; the trainer (e.g. more epochs), loggers,
    callbacks and paths may change between attempts.
    """
    full = OmegaConf.to_container(cfg, resolve=True)
    flat = _flatten({k: full[k] for k in IDENTITY_KEYS if k in full})
    return {k: v for k, v in flat.items() if k not in VOLATILE_KEYS}


IDENTITY_KEYS = ("dataset", "method", "net", "optimizer", "data", "seed")
VOLATILE_KEYS = {"dataset.cache_dir", "data.cache_dir", "data.num_workers"}


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_training(cfg: DictConfig) -> dict:
    """Train one configuration; returns the results dict also written to ``results.json``.

    In a folder that holds ``checkpoints/last.ckpt`` it resumes from it (after checking the checkpoint
    belongs to this configuration); in a folder whose run already completed with this very config it
    returns the stored results. Status: ``completed``, ``failed`` (with ``reason``) or ``preempted``
    (stopped by SIGTERM/SIGUSR2 after an epoch's checkpoint; rerun to resume).
    """
    run_dir = Path(cfg.paths.run_dir)
    check(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32, "seed", cfg.seed, "must be an integer in [0, 2**32)")
    nt = cfg.get("num_threads")
    check(nt is None or (isinstance(nt, int) and nt >= 1), "num_threads", nt, "must be an integer >= 1 or null")
    done = _completed_results(run_dir, cfg)
    if done is not None:
        log.info("run already completed in %s; nothing to do", run_dir)
        return done
    identity = run_identity(cfg)
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    # epochs done by earlier attempts; checked before anything in the folder is touched
    resume_epoch = check_resumable(ckpt, identity)["epoch"] + 1 if ckpt.exists() else None
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
        "resumed_from_epoch": resume_epoch,
    }
    atomic_write_json(run_dir / "results.json", results)  # a run killed outright stays marked "running"
    t0 = time.perf_counter()
    try:
        if resume_epoch is not None:
            _set_metrics_aside(run_dir, epochs_done=resume_epoch)
        atomic_write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        trainer, datamodule, module, callbacks = _fit(cfg, identity, ckpt if resume_epoch is not None else None)
        results.update(_outcome(cfg, trainer, datamodule, module, callbacks))
    except SIGTERMException:  # SIGTERM before StopOnSignal took over: Lightning stopped mid-epoch, saving nothing
        results.update(status="preempted", signal=int(signal.SIGTERM), reason="SIGTERM received before training "
                       "started; rerun the same command in this folder to resume from the last checkpoint, if any")
    except FloatingPointError as exc:  # a non-finite loss, gradient or final bound
        line = (f"{exc}: method={cfg.method.name} dataset={cfg.dataset.name} seed={cfg.seed} "
                f"(nan_policy={cfg.get('nan_policy')})")
        results.update(status="failed", reason=line)
        raise RunFailed(line) from exc
    except BaseException as exc:
        cause = config_error(exc) or _root_cause(exc)
        results.update(status="failed", reason=f"{type(cause).__name__}: {cause}")
        raise
    finally:
        _merge_metrics(run_dir)
        results["wall_time_s"] = time.perf_counter() - t0
        atomic_write_json(run_dir / "results.json", results)
        log.info("results: %s", run_dir / "results.json")
        _finish_wandb()
    return results


def _fit(cfg: DictConfig, identity: dict, ckpt: Path | None):
    """Seed, build, and fit (from ``ckpt`` when given); returns (trainer, datamodule, module, callbacks)."""
    # config.yaml sits in the run folder before metrics.csv does: that is expected, not a clash
    warnings.filterwarnings("ignore", message="Experiment logs directory .* exists and is not empty")
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    L.seed_everything(cfg.seed, workers=True, verbose=False)
    datamodule, module = build(cfg)
    datamodule.setup("fit")
    loggers = _instantiate_group(cfg.get("logger"))
    for lg in loggers:
        lg.log_hyperparams(_loggable_config(cfg))
    callbacks = [*_instantiate_group(cfg.get("callbacks")), RunIdentity(identity)]
    trainer = _build_trainer(cfg, callbacks, loggers)
    # weights_only: the checkpoint holds tensors and plain data only (mapa_exp.callbacks)
    trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt) if ckpt else None, weights_only=True)
    return trainer, datamodule, module, callbacks


def _outcome(cfg: DictConfig, trainer, datamodule, module, callbacks: list) -> dict:
    """The results of a fit that returned: preempted (a signal stopped it early), or completed with the
    final bounds, evaluated on a fixed seed so that they depend on the weights alone."""
    guard, stop = _find(callbacks, NonFiniteGuard), _find(callbacks, StopOnSignal)
    out = {"skipped_batches": guard.skipped} if guard is not None else {}
    if stop is not None and stop.received is not None and not _training_finished(trainer):
        return {**out, "status": "preempted", "signal": int(stop.received), "epochs": trainer.current_epoch,
                "reason": f"{signal.Signals(stop.received).name} received; stopped after epoch "
                          f"{trainer.current_epoch} of {trainer.max_epochs} and its checkpoint; "
                          "rerun the same command in this folder to resume"}
    out.update(
        status="completed",
        epochs=trainer.current_epoch,
        surrogate_mse=datamodule.groundtruth.surrogate_mse,
        proximity_cache_hit=datamodule.cache_hits.get("train"),
        train_bound=mean_bound(module, datamodule.train_eval_dataloader(), seed=cfg.seed),
        val_bound=mean_bound(module, datamodule.val_dataloader(), seed=cfg.seed),
        **module.forward_pass_summary(),
    )
    if not all(math.isfinite(out[k]) for k in ("train_bound", "val_bound")):
        raise FloatingPointError(f"final bound is not finite: {out['train_bound']}, {out['val_bound']}")
    return out


def _build_trainer(cfg: DictConfig, callbacks: list, loggers: list) -> L.Trainer:
    """The Trainer; its own argument checks become ConfigErrors naming the ``trainer.<arg>`` key."""
    try:
        return hydra.utils.instantiate(cfg.trainer, callbacks=callbacks, logger=loggers or False)
    except Exception as exc:
        root = _root_cause(exc)
        if config_error(exc) is not None or not isinstance(root, (ValueError, MisconfigurationException)):
            raise
        msg = str(root).strip().splitlines()[0]
        name = next((w for w in re.findall(r"\w+", msg) if w in cfg.trainer and not w.startswith("_")), None)
        raise ConfigError(f"trainer.{name}" if name else "trainer", cfg.trainer.get(name) if name else
                          cfg.trainer.get("_target_"), msg) from exc


def _find(callbacks: list, kind: type):
    return next((c for c in callbacks if isinstance(c, kind)), None)


def _training_finished(trainer) -> bool:
    max_epochs = trainer.max_epochs
    return max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs


def _completed_results(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The stored results if ``run_dir`` holds a completed run of this very config (Hydra's node aside)."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
        if not (isinstance(results, dict) and results.get("status") == "completed"):
            return None
        stored = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    except (OSError, ValueError):
        return None
    current = OmegaConf.to_container(cfg, resolve=True)
    for c in (stored, current):
        c.pop("hydra", None)
    return results if stored == current else None


METRICS, METRICS_ASIDE = "metrics.csv", "metrics.before_resume.csv"


def _set_metrics_aside(run_dir: Path, epochs_done: int) -> None:
    """On resume, keep the earlier attempts' metrics rows of the first ``epochs_done`` epochs (each once)
    beside ``metrics.csv``, which the CSV logger starts afresh; ``_merge_metrics`` puts them back in front."""
    rows = _read_csv_rows(run_dir / METRICS_ASIDE) + _read_csv_rows(run_dir / METRICS)
    _write_csv_rows(run_dir / METRICS_ASIDE, _unique([r for r in rows if _row_epoch(r) < epochs_done]))


def _merge_metrics(run_dir: Path) -> None:
    aside = run_dir / METRICS_ASIDE
    try:
        if aside.exists():
            _write_csv_rows(run_dir / METRICS, _unique(_read_csv_rows(aside) + _read_csv_rows(run_dir / METRICS)))
            aside.unlink()
    except OSError as exc:  # never mask the run's own outcome; the rows stay in the side file
        log.warning("could not merge %s into %s: %s", aside, METRICS, exc)


def _unique(rows: list[dict]) -> list[dict]:
    """Each row once (empty cells aside), in order of first appearance."""
    return list({tuple(sorted((k, v) for k, v in r.items() if v)): r for r in rows}.values())


def _read_csv_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


def _write_csv_rows(path: Path, rows: list[dict]) -> None:
    """Rows (strings kept verbatim) under the union of their columns, sorted like Lightning's CSV logger."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=sorted(set().union(*rows)) if rows else [], restval="")
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buf.getvalue())


def _row_epoch(row: dict) -> float:
    try:
        return float(row.get("epoch") or "nan")
    except ValueError:
        return math.nan


def _loggable_config(cfg: DictConfig) -> dict:
    """The resolved run config without Hydra's own node, for logger hyperparameters."""
    out = OmegaConf.to_container(cfg, resolve=True)
    out.pop("hydra", None)
    return out


def _finish_wandb() -> None:
    """Close any W&B run so the next job of a multirun starts its own (never merged)."""
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        try:
            wandb.finish()
        except ConnectionError as exc:  # the W&B service died (SLURM signals it too on preemption)
            log.warning("W&B run not closed cleanly (%s: %s); its offline files hold what was logged",
                        type(exc).__name__, exc)


def _root_cause(exc: BaseException) -> BaseException:
    """The innermost cause (Hydra wraps constructor errors in InstantiationException)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def config_error(exc: BaseException) -> ConfigError | None:
    """The ConfigError behind ``exc`` (itself, a cause, or the error being handled when it was raised:
    OmegaConf re-raises resolver errors without ``from``), if that is what it is."""
    seen = set()
    while exc is not None and not isinstance(exc, ConfigError) and id(exc) not in seen:
        seen.add(id(exc))
        exc = exc.__cause__ or exc.__context__
    return exc if isinstance(exc, ConfigError) else None
