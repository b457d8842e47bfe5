"""Training and what follows it, as ``train.py`` runs them: train the job (``mapa_exp.runs.training``), then,
while the members' loggers are open, draw each completed member's pictures for the loggers that take them
(``mapa_exp.evaluation.pictures``) and, with ``evaluate=true``, evaluate the members in one pass
(``mapa_exp.evaluation.evaluate``), their numbers joining the same dashboards.

This module sits above training and evaluation, so that neither imports the other's stage.
"""

from __future__ import annotations

import logging

from omegaconf import DictConfig

from mapa_exp.runs.training import Trained, run_job, run_training

log = logging.getLogger(__name__)


def finish(trained: Trained) -> None:
    """Pictures (to the loggers that take them) and, with ``evaluate=true``, the evaluation of the completed
    members (``eval/...`` summary values and the test points' log-likelihoods into their loggers)."""
    cfg, fit = trained.cfg, trained.fit
    for e, m in trained.completed:
        group = trained.loggers[e]
        if any(lg.takes_pictures for lg in group):
            from mapa_exp.evaluation.pictures import run_pictures

            try:
                figures = run_pictures(fit.module, e, fit.datamodule, dict(cfg.get("prior_recovery") or {}))
            except Exception as exc:  # noqa: BLE001 -- a picture must never cost a run
                log.warning("pictures of %s failed: %s", m.run_dir, exc)
                continue
            for lg in group:
                lg.log_images(figures, int(trained.results[m.index].get("train_steps") or 0))
    if cfg.get("evaluate"):
        from mapa_exp.evaluation.evaluate import evaluate_configured

        evaluate_configured([m.run_dir for _, m in trained.completed], cfg,
                            on_result=lambda path, out, points: log_evaluation(trained.loggers_of(path), out, points))


def log_evaluation(loggers: list, out: dict, points: dict) -> None:
    """One member's evaluation into its loggers: ``eval/...`` summary values and, per estimator, a table of the
    test points' log-likelihoods under the model and the truth."""
    for lg in loggers:
        lg.log_summary({f"eval/{k}": v for k, v in out["metrics"].items()})
        for name, cols in points.items():
            columns = list(cols)
            lg.log_table(f"eval/test_points_{name}", ["point", *columns],
                         [[i, *row] for i, row in enumerate(zip(*(cols[c] for c in columns)))])


def train(cfg: DictConfig) -> list[dict]:
    """Train the job and finish it (module doc); each member's results."""
    return run_job(cfg, finish)


def train_one(cfg: DictConfig) -> dict:
    """``train`` for a plain run: its results (``RunFailed`` when it failed)."""
    return run_training(cfg, finish)
