"""The evaluation stage: a finished run (or a sweep of them) in, ``eval.json`` beside each run out.

For each estimator (``mapa_exp.evaluation.estimators``) it reports, in nats per point:
``val_loglik/<est>``, ``test_loglik/<est>``, and when the data have a ground truth
``test_loglik_gt/<est>`` and ``test_kl/<est>`` = mean over test points of log p_GT(x) - log p_model(x)
(method.md §7; the truth scored by the same estimator). Mixture-IWAE numbers carry ``*_se/<est>``, the
Monte-Carlo standard error of the mean; quadrature carries ``convergence/<est>`` (J vs 2J, worst point).
With both estimators, ``test_loglik_gap/mog_iwae`` = mixture-IWAE minus quadrature.

MAPA's prior is recovered from its codes first (method.md §6). The ground truth's scores depend only on the
data and the estimator, so they are cached and shared by every run of a sweep.
"""

from __future__ import annotations

import logging
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch

from mapa_exp.errors import ConfigError, check
from mapa_exp.evaluation.estimators import GenerativeModel, recovered_model, standard_model
from mapa_exp.evaluation.runs import Run, check_sweep_folder, checkpoint_file, load_member_weights, read_run_files
from mapa_exp.io import ArrayCache, atomic_write_json, content_key, progress

log = logging.getLogger(__name__)

IDENTITY = ("dataset", "method", "K", "S", "seed", "draw")


def model_of(run: Run, **prior_recovery) -> GenerativeModel:
    """The run's generative model with a prior: N(0, I) for the baselines, recovered for MAPA."""
    return model_of_module(run.module, run.datamodule.x["train"], 0, **prior_recovery)


def model_of_module(module, x_train: torch.Tensor, e: int = 0, **prior_recovery) -> GenerativeModel:
    """Member e's generative model: its decoder with N(0, I), or with the prior of its codes of x_train
    (``prior_recovery``: the keyword arguments of ``recovered_model``)."""
    decoder = module.generative_decoder(e)
    if module.standard_normal_prior:
        return standard_model(decoder, module.likelihood, module.latent_dim)
    with torch.no_grad():
        codes = module.codes(x_train, e)
    return recovered_model(decoder, module.likelihood, codes, **prior_recovery)


def _mean_se(ll: torch.Tensor, se: torch.Tensor | None) -> tuple[float, float | None]:
    mean = float(ll.double().mean())
    if se is None:
        return mean, None
    return mean, float(torch.sqrt((se.double() ** 2).sum()) / len(se))


def ground_truth_scores(gt, x_fit: torch.Tensor, x_test: torch.Tensor, estimator,
                        cache: ArrayCache | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """log p_GT(x_test) per point by ``estimator``, cached by (data, truth's weights, estimator config)."""
    weights = [p.detach().numpy() for p in gt.decoder.parameters()]
    key = content_key(x_fit.numpy(), x_test.numpy(), *weights, repr(gt.likelihood), estimator.name, estimator.config())

    def build():
        res, _ = estimator.evaluate(standard_model(gt.decoder, gt.likelihood, gt.latent_dim), x_fit, {"test": x_test})
        ll, se = res["test"]
        return {"ll": ll.numpy(), "se": (se if se is not None else torch.full_like(ll, math.nan)).numpy()}

    arrays = cache.load_or_build("gt_loglik", key, build)[0] if cache is not None else build()
    se = torch.from_numpy(arrays["se"])
    return torch.from_numpy(arrays["ll"]), (None if torch.isnan(se).all() else se)


def has_ground_truth(datamodule) -> bool:
    """Whether the data come with a ground-truth decoder (synthetic truths) or not (digits, user files)."""
    return getattr(datamodule.groundtruth, "has_ground_truth", True)


def evaluate_run(path: str | Path, estimators: dict, prior_recovery: dict | None = None, cache_dir: str | None = None,
                 key: str = "run", checkpoint: str = "best") -> dict:
    """Evaluate one run folder with every estimator; writes and returns ``eval.json``'s content."""
    return evaluate_runs([path], estimators, prior_recovery, cache_dir, key, checkpoint)[0]


def evaluate_runs(paths, estimators: dict, prior_recovery: dict | None = None, cache_dir: str | None = None,
                  key: str = "run", checkpoint: str = "best", on_result=None) -> list[dict]:
    """Evaluate run folders of one configuration (e.g. a stack's members, differing in seed and draw) in one
    pass: one data module holding every draw, one stacked module holding every member's weights, each
    estimator (and its grid) shared; the ground truth's scores are cached per draw. ``checkpoint``: ``best``
    (each run's weights at its best validation bound: model selection on validation data) or ``last``.
    Writes each run's ``eval.json`` and returns their contents. Runs of different configurations are evaluated
    group by group. ``on_result(path, eval, points)`` is called after each run with its eval.json content and,
    per estimator, the test points' log-likelihoods ``{"model": [...], "truth": [...]}`` (the training job logs
    them into the run's own dashboard); without it a run that logged to W&B gets them by resuming its run."""
    from mapa_exp.runs.training import build  # the one place that turns a config into objects

    loaded = [read_run_files(p, key) for p in paths]
    out: dict[Path, dict] = {}
    for group in _same_configuration(loaded):
        cfg = group[0][1]
        datamodule, module = build(cfg, [r[2].get("seed", cfg.seed) for r in group],
                                   [r[2].get("draw", cfg.dataset.get("draw", 0)) for r in group])
        datamodule.setup("evaluate")
        files = [checkpoint_file(path, checkpoint, key) for path, _, _ in group]
        for e, f in enumerate(files):
            load_member_weights(module, e, f, key)
        module.eval()
        cache = ArrayCache(cache_dir) if cache_dir else None
        for e, (path, _, results) in progress(list(enumerate(group)), f"evaluating {len(group)} runs"):
            out[path], points = _evaluate_member(path, results, module, e, datamodule, estimators,
                                                 prior_recovery or {}, cache, files[e].stem)
            if on_result is not None:
                on_result(path, out[path], points)
            else:
                log_to_wandb(path, out[path]["metrics"], points)
    return [out[p] for p, _, _ in loaded]


def _same_configuration(loaded: list) -> list[list]:
    """Groups of (path, cfg, results) whose configs differ at most in seed, dataset.draw and paths."""
    from omegaconf import OmegaConf

    def shape(cfg) -> str:
        c = OmegaConf.to_container(cfg, resolve=False)
        c.pop("seed", None)
        c.pop("paths", None)
        c.get("dataset", {}).pop("draw", None)
        return repr(c)

    groups: dict[str, list] = {}
    for item in loaded:
        groups.setdefault(shape(item[1]), []).append(item)
    return list(groups.values())


def _evaluate_member(path: Path, results: dict, module, e: int, datamodule, estimators: dict, prior_recovery: dict,
                     cache: ArrayCache | None, checkpoint: str) -> dict:
    """Score member e and write the run's eval.json -- only once every estimator is done, merged into what an
    earlier evaluation of the same checkpoint holds (a new estimator's numbers replace its own, never another's),
    and renamed into place: an interrupted or failed evaluation destroys no result."""
    t0 = time.perf_counter()
    out = {k: results.get(k) for k in IDENTITY} | {"run_dir": str(path), "checkpoint": checkpoint}
    try:
        x = {s: datamodule.member_x(s, e) for s in ("train", "val", "test")}
        model = model_of_module(module, x["train"], e, **prior_recovery)
        gt = datamodule.truth(e)
        metrics, diagnostics, test_ll, points = {}, {}, {}, {}
        for name, est in estimators.items():
            res, diag = est.evaluate(model, x["train"], {"val": x["val"], "test": x["test"]})
            for split in ("val", "test"):
                mean, se = _mean_se(*res[split])
                metrics[f"{split}_loglik/{name}"] = mean
                if se is not None:
                    metrics[f"{split}_loglik_se/{name}"] = se
            test_ll[name] = res["test"][0]
            if "convergence_max_abs_diff" in diag:
                metrics[f"convergence/{name}"] = diag["convergence_max_abs_diff"]
            if has_ground_truth(datamodule):
                gt_ll, gt_se = ground_truth_scores(gt, x["train"], x["test"], est, cache)
                metrics[f"test_loglik_gt/{name}"] = _mean_se(gt_ll, gt_se)[0]
                metrics[f"test_kl/{name}"] = float((gt_ll.double() - res["test"][0].double()).mean())
                points[name] = {"log p_model": res["test"][0].tolist(), "log p_truth": gt_ll.tolist()}
            else:
                points[name] = {"log p_model": res["test"][0].tolist()}
            diagnostics[name] = {**diag, "config": est.config(), "prior_recovery": prior_recovery}
        if {"quadrature", "mog_iwae"} <= test_ll.keys():
            metrics["test_loglik_gap/mog_iwae"] = float((test_ll["mog_iwae"] - test_ll["quadrature"]).mean())
    except Exception as exc:
        earlier = _read_eval(path)
        if earlier is None:  # nothing to lose: the failure is the run's evaluation record
            out.update(status="failed", reason=f"{type(exc).__name__}: {exc}", wall_time_s=time.perf_counter() - t0)
            atomic_write_json(path / "eval.json", out)
        raise
    earlier = _read_eval(path)
    if earlier is not None and earlier.get("status") == "completed" and earlier.get("checkpoint") == checkpoint:
        metrics = {**earlier.get("metrics", {}), **metrics}
        diagnostics = {**earlier.get("diagnostics", {}), **diagnostics}
    out.update(status="completed", metrics=metrics, diagnostics=diagnostics, wall_time_s=time.perf_counter() - t0)
    atomic_write_json(path / "eval.json", out)
    return out, points


def _read_eval(path: Path) -> dict | None:
    import json

    try:
        data = json.loads((path / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def already_evaluated(path: Path, estimators: dict, prior_recovery: dict, checkpoint: str) -> bool:
    """Whether ``path``'s eval.json already holds every one of ``estimators`` with the same settings."""
    done = _read_eval(path)
    if done is None or done.get("status") != "completed" or done.get("checkpoint") != checkpoint:
        return False
    diag = done.get("diagnostics", {})
    return all(name in diag and diag[name].get("config") == _jsonable(est.config())
               and diag[name].get("prior_recovery") == _jsonable(prior_recovery) for name, est in estimators.items())


def _jsonable(obj):
    import json

    return json.loads(json.dumps(obj, default=str))


def build_estimators(cfg) -> dict:
    """The estimators a config's ``evaluator`` group names, built by ``_target_``."""
    import hydra

    return {name: hydra.utils.instantiate(node) for name, node in cfg.evaluator.items()}


def evaluate_configured(paths, cfg, on_result=None) -> dict | list[dict]:
    """``evaluate_runs`` with the estimators, prior recovery and cache of a train or evaluate config, for one
    run folder or a list of them (a stack's members)."""
    estimators = build_estimators(cfg)
    which = cfg.get("eval_checkpoint", "best")
    many = isinstance(paths, (list, tuple))
    out = evaluate_runs(paths if many else [paths], estimators, dict(cfg.prior_recovery), cfg.paths.cache_dir,
                        checkpoint=which, on_result=on_result)
    return out if many else out[0]


def evaluate_sweep(folder: str | Path, estimators: dict, prior_recovery: dict | None = None,
                   cache_dir: str | None = None, checkpoint: str = "best") -> dict:
    """Evaluate every completed run below ``folder``, printing ``k/N`` as it goes; failed runs are recorded, not
    evaluated. Resumable: runs whose eval.json already holds these estimators with the same settings are
    skipped, and an interrupted sweep keeps every eval.json it finished. The runs of one configuration
    (a stack's members) are evaluated in one pass.

    Returns counts and writes ``summary.csv`` in ``folder``: the best restart per configuration (by
    validation log-likelihood) and mean +- standard error over draws of every evaluation metric.
    """
    folder, runs = check_sweep_folder(folder)
    prior_recovery = prior_recovery or {}
    counts = {"evaluated": 0, "already": 0, "skipped": 0, "failed": 0}
    todo = []
    for path in runs:
        try:
            read_run_files(path)
        except ConfigError as exc:  # a run that did not complete: kept as it is, said once
            log.warning("skipped %s: %s", path, exc.reason)
            counts["skipped"] += 1
            continue
        if already_evaluated(path, estimators, prior_recovery, checkpoint):
            counts["already"] += 1
        else:
            todo.append(path)
    done = counts["already"]
    print(f"evaluating {len(todo)} of {len(runs)} runs ({done} already evaluated, {counts['skipped']} not "
          "completed)", file=sys.stderr, flush=True)
    total = len(runs) - counts["skipped"]
    t0 = time.perf_counter()

    def report(path, out, points):
        nonlocal done, t0
        log_to_wandb(path, out["metrics"], points)
        counts["evaluated"] += 1
        done += 1
        kl = ", ".join(f"test_kl {v:.4f} ({k.split('/')[1]})" for k, v in sorted(out["metrics"].items())
                       if k.startswith("test_kl/"))
        print(f"[{done}/{total}] {path.relative_to(folder)}: {kl or 'done'} in {time.perf_counter() - t0:.1f} s",
              file=sys.stderr, flush=True)
        t0 = time.perf_counter()

    for group in _same_configuration([read_run_files(p) for p in todo]):
        paths = [path for path, _, _ in group]
        before = counts["evaluated"]
        try:  # one pass for the whole configuration (a stack's members)
            evaluate_runs(paths, estimators, prior_recovery, cache_dir, checkpoint=checkpoint, on_result=report)
            continue
        except Exception as exc:  # noqa: BLE001 -- then run by run, so that one broken run costs only itself
            log.warning("evaluating %d runs in one pass stopped (%s: %s); going on run by run", len(paths),
                        type(exc).__name__, exc)
        for path in paths[counts["evaluated"] - before:]:
            try:
                evaluate_runs([path], estimators, prior_recovery, cache_dir, checkpoint=checkpoint, on_result=report)
            except Exception as exc:  # noqa: BLE001 - one broken run must not stop the sweep's evaluation
                log.error("evaluation of %s failed: %s", path, exc)
                counts["failed"] += 1
                done += 1
                print(f"[{done}/{total}] {path.relative_to(folder)}: failed: {type(exc).__name__}", file=sys.stderr,
                      flush=True)
    write_summary(folder)
    return counts


def write_summary(folder: Path) -> None:
    """summary.csv: best restart per configuration, mean and standard error over draws."""
    from mapa_exp.io import atomic_write_text
    from mapa_exp.sweeps.results import best_restarts, collect, mean_se_over_draws

    table = collect([folder])
    table = table[table["status"] == "completed"]
    if table.empty:
        return
    best = best_restarts(table)  # wide: one column per metric
    metrics = sorted(c for c in best.columns if "/" in c and best[c].notna().any())
    frames = [mean_se_over_draws(best, m).assign(metric=m) for m in metrics]
    if frames:
        import pandas as pd

        atomic_write_text(folder / "summary.csv", pd.concat(frames, ignore_index=True).to_csv(index=False))


def log_to_wandb(run_dir: Path, metrics: dict, points: dict | None = None) -> None:
    """Add the evaluation to the training job's W&B run, if it had one: resumed by its id (offline, a second
    run folder with the same id, which `wandb sync` appends to the same run), ``eval/...`` summary values and
    a table of the test points' log-likelihoods per estimator."""
    runs = sorted((run_dir / "wandb").glob("*run-*")) if (run_dir / "wandb").exists() else []
    if not runs:
        return
    import wandb

    latest = runs[-1].name  # offline-run-<date>_<time>-<id> or run-<date>_<time>-<id>
    run_id, offline = latest.rsplit("-", 1)[1], latest.startswith("offline-")
    with wandb.init(id=run_id, resume="allow", dir=str(run_dir), mode="offline" if offline else "online",
                    project=_wandb_project(run_dir), reinit="create_new",
                    settings=wandb.Settings(console="off", silent=True)) as wb:
        wb.summary.update({f"eval/{k}": v for k, v in metrics.items()})
        for name, cols in (points or {}).items():
            columns = list(cols)
            wb.log({f"eval/test_points_{name}": wandb.Table(
                columns=["point", *columns], data=[[i, *row] for i, row in enumerate(zip(*(cols[c] for c in columns)))])})


def _wandb_project(run_dir: Path) -> str | None:
    from omegaconf import OmegaConf

    cfg = OmegaConf.load(run_dir / "config.yaml")
    return OmegaConf.select(cfg, "logger.wandb.project", default=None)
