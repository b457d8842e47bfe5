"""The evaluation stage: a finished run (or a sweep of them) in, ``eval.json`` beside each run out.

For each estimator (``mapa_exp.evaluation.estimators``) it reports, in nats per point:
``val_loglik/<est>``, ``test_loglik/<est>``, and when the data have a ground truth
``test_loglik_gt/<est>`` and ``test_kl/<est>`` = mean over test points of log p_GT(x) - log p_model(x)
(method.md §7; the truth scored by the same estimator). Mixture-IWAE numbers carry ``*_se/<est>``, the
Monte-Carlo standard error of the mean; quadrature carries ``convergence/<est>`` (J vs 2J, worst point).
With both estimators, ``test_loglik_gap/mog_iwae`` = mixture-IWAE minus quadrature.

MAPA's prior is recovered from its codes first (method.md §6), chosen per run on validation data among the
``prior_recovery`` candidates (``mapa_exp.math.prior_choice``): the *selector* -- the quadrature where the
latent dimension allows it, else the first estimator -- scores every candidate on validation and test data,
the highest validation log-likelihood wins, and the other estimators score the chosen model only.
``eval.json`` keeps every candidate's numbers under ``prior_candidates`` and names the chosen one.

**Provenance.** ``eval.json`` says what it scored: ``scored`` = the checkpoint (which, file, epoch, SHA-256),
the prior-recovery settings, the selector and the chosen prior; each estimator's block under ``diagnostics``
carries the ``scored`` it was computed under and its own settings. When a run is evaluated again, an earlier
estimator's numbers are kept only if they were computed under the same ``scored`` record; otherwise they are
removed, with a line in ``notes`` (never merged with numbers of other weights or another prior). A run whose
checkpoint changed since its evaluation (trained on) is not "already evaluated".

The ground truth's scores depend only on the data and the estimator, so they are cached and shared by every
run of a sweep.
"""

from __future__ import annotations

import json
import logging
import math
import sys
import time
from pathlib import Path

import torch

from mapa_exp.errors import ConfigError
from mapa_exp.evaluation.estimators import GenerativeModel, recovered_models, standard_model
from mapa_exp.math.prior_choice import check_prior_recovery, choose, plain_settings, prior_candidates
from mapa_exp.evaluation.runs import (
    Run, check_sweep_folder, checkpoint_file, checkpoint_sha256, load_member_weights, read_checkpoint, read_run_files,
)
from mapa_exp.io import ArrayCache, atomic_write_json, code_version, content_key, progress
from mapa_exp.math.quadrature import MAX_LATENT_DIM

log = logging.getLogger(__name__)

IDENTITY = ("dataset", "method", "K", "S", "seed", "draw")


def model_of(run: Run, estimators: dict | None = None, **prior_recovery) -> GenerativeModel:
    """The run's generative model with a prior: N(0, I) for the baselines, recovered for MAPA (chosen on the
    validation data by the selector of ``estimators``, default the quadrature)."""
    dm = run.datamodule
    x = {s: dm.x[s] for s in ("train", "val")}
    return model_of_module(run.module, x, 0, estimators, **prior_recovery)


def model_of_module(module, x: dict, e: int = 0, estimators: dict | None = None, **prior_recovery) -> GenerativeModel:
    """Member e's generative model: its decoder with N(0, I), or with the prior recovered from its codes of
    ``x["train"]``, the candidate of ``prior_recovery`` with the highest log-likelihood of ``x["val"]`` by the
    selector of ``estimators`` (default: the quadrature with its defaults)."""
    if module.standard_normal_prior:
        return standard_model(module.generative_decoder(e), module.likelihood, module.latent_dim)
    if estimators is None:
        from mapa_exp.evaluation.estimators import QuadratureEstimator

        estimators = {"quadrature": QuadratureEstimator(check_convergence=False)}
    fitted = _prior_choice(module, e, x, estimators, plain_settings(prior_recovery), gt=None, cache=None)
    return fitted["model"]


def selector_of(estimators: dict, latent_dim: int) -> str:
    """The estimator that chooses the prior: the quadrature where it can score the latent dimension (exact and
    cheap), else the first estimator."""
    if "quadrature" in estimators and latent_dim <= MAX_LATENT_DIM:
        return "quadrature"
    return next(iter(estimators))


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
    if key in _GT_SCORES:  # every prior candidate of a run is compared with the same truth's scores
        return _GT_SCORES[key]

    def build():
        res, _ = estimator.evaluate(standard_model(gt.decoder, gt.likelihood, gt.latent_dim), x_fit, {"test": x_test})
        ll, se = res["test"]
        return {"ll": ll.numpy(), "se": (se if se is not None else torch.full_like(ll, math.nan)).numpy()}

    arrays = cache.load_or_build("gt_loglik", key, build)[0] if cache is not None else build()
    se = torch.from_numpy(arrays["se"])
    if len(_GT_SCORES) > 64:
        _GT_SCORES.clear()
    _GT_SCORES[key] = torch.from_numpy(arrays["ll"]), (None if torch.isnan(se).all() else se)
    return _GT_SCORES[key]


_GT_SCORES: dict = {}  # this process's ground-truth scores by cache key


def has_ground_truth(datamodule) -> bool:
    """Whether the data come with a ground-truth decoder (synthetic truths) or not (digits, user files)."""
    return getattr(datamodule.groundtruth, "has_ground_truth", True)


def _score(model: GenerativeModel, name: str, est, x: dict, gt, cache) -> dict:
    """One estimator's numbers for one model: metrics, diagnostics and the test points' log-likelihoods."""
    splits = {s: x[s] for s in ("val", "test") if s in x}
    res, diag = est.evaluate(model, x["train"], splits)
    metrics, points = {}, {}
    for split in splits:
        mean, se = _mean_se(*res[split])
        metrics[f"{split}_loglik/{name}"] = mean
        if se is not None:
            metrics[f"{split}_loglik_se/{name}"] = se
    if "convergence_max_abs_diff" in diag:
        metrics[f"convergence/{name}"] = diag["convergence_max_abs_diff"]
    if "test" in res:
        points = {"log p_model": res["test"][0].tolist()}
        if gt is not None:
            gt_ll, gt_se = ground_truth_scores(gt, x["train"], x["test"], est, cache)
            metrics[f"test_loglik_gt/{name}"] = _mean_se(gt_ll, gt_se)[0]
            metrics[f"test_kl/{name}"] = float((gt_ll.double() - res["test"][0].double()).mean())
            points["log p_truth"] = gt_ll.tolist()
    return {"metrics": metrics, "diagnostics": diag, "test_ll": res["test"][0] if "test" in res else None,
            "points": points}


def _prior_choice(module, e: int, x: dict, estimators: dict, settings: dict, gt, cache) -> dict:
    """``choose_prior`` for member e of a module: its decoder, likelihood and codes of ``x["train"]``."""
    with torch.no_grad():
        codes = module.codes(x["train"], e)
    return choose_prior(module.generative_decoder(e), module.likelihood, codes, x, estimators, settings, gt, cache)


def choose_prior(decoder, likelihood, codes: torch.Tensor, x: dict, estimators: dict, settings: dict, gt=None,
                 cache=None) -> dict:
    """Fit every prior candidate of ``settings`` to the codes (N, Dz), score each with the selector
    (``selector_of``) on ``x["val"]`` (and ``x["test"]`` when given) and choose on validation data. Returns
    ``{model, label, selector, scores: {label: the selector's result}, candidates: {label: metrics}}``."""
    candidates = prior_candidates(codes.shape[1], **plain_settings(settings))
    name = selector_of(estimators, codes.shape[1])
    models = recovered_models(decoder, likelihood, codes, candidates)
    scores, table = {}, {}
    for label, model in models.items():
        if isinstance(model, Exception):
            table[label] = {"failed": f"{type(model).__name__}: {model}"}
            continue
        scores[label] = _score(model, name, estimators[name], x, gt, cache)
        table[label] = scores[label]["metrics"]
    chosen = choose({label: r["metrics"].get(f"val_loglik/{name}", math.nan) for label, r in scores.items()})
    return {"model": models[chosen], "label": chosen, "selector": name, "scores": scores, "candidates": table}


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

    prior_recovery = plain_settings(prior_recovery)
    check_prior_recovery(prior_recovery)
    loaded = [read_run_files(p, key) for p in paths]
    out: dict[Path, dict] = {}
    for group in _same_configuration(loaded):
        cfg = group[0][1]
        checkpoints = [read_checkpoint(path, checkpoint, key) for path, _, _ in group]  # checked before the build
        datamodule, module = build(cfg, [r[2].get("seed", cfg.seed) for r in group],
                                   [r[2].get("draw", cfg.dataset.get("draw", 0)) for r in group])
        datamodule.setup("evaluate")
        for e, ((path, _, _), (state, _)) in enumerate(zip(group, checkpoints)):
            load_member_weights(module, e, state, path, key)
        module.eval()
        cache = ArrayCache(cache_dir) if cache_dir else None
        for e, (path, _, results) in progress(list(enumerate(group)), f"evaluating {len(group)} runs"):
            out[path], points = _evaluate_member(path, results, module, e, datamodule, estimators,
                                                 prior_recovery, cache, checkpoints[e][1])
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


def scored_record(checkpoint: dict, prior_recovery: dict | None = None, selector: tuple[str, dict] | None = None,
                  chosen: str | None = None, latent_dim: int | None = None) -> dict:
    """What an evaluation scored: the checkpoint record (``read_checkpoint``) and, for a recovered prior, the
    settings, the latent dimension, the selector (name and settings) and the chosen candidate (None for a
    N(0, I) model)."""
    prior = None
    if chosen is not None:
        prior = {"settings": _jsonable(prior_recovery), "latent_dim": latent_dim, "selector": selector[0],
                 "selector_config": _jsonable(selector[1]), "chosen": chosen}
    return {"checkpoint": dict(checkpoint), "prior": prior}


def _evaluate_member(path: Path, results: dict, module, e: int, datamodule, estimators: dict, prior_recovery: dict,
                     cache: ArrayCache | None, checkpoint: dict) -> tuple[dict, dict]:
    """Score member e and write the run's eval.json -- only once every estimator is done, together with the
    earlier estimators' numbers computed under the same ``scored`` record (the others are removed, with a note),
    and renamed into place: an interrupted or failed evaluation destroys no result."""
    t0 = time.perf_counter()
    out = {k: results.get(k) for k in IDENTITY} | {"run_dir": str(path), "checkpoint": checkpoint["which"],
                                                  **code_version()}
    try:
        x = {s: datamodule.member_x(s, e) for s in ("train", "val", "test")}
        gt = datamodule.truth(e) if has_ground_truth(datamodule) else None
        blocks, candidates = {}, None
        if module.standard_normal_prior:
            model = standard_model(module.generative_decoder(e), module.likelihood, module.latent_dim)
            scored = scored_record(checkpoint)
        else:
            log.info("%s: fitting and scoring the prior candidates on validation data", path.name)
            choice = _prior_choice(module, e, x, estimators, prior_recovery, gt, cache)
            log.info("%s: prior %s chosen by val_loglik/%s", path.name, choice["label"], choice["selector"])
            model, candidates = choice["model"], choice["candidates"]
            sel = choice["selector"]
            scored = scored_record(checkpoint, prior_recovery, (sel, estimators[sel].config()), choice["label"],
                                   module.latent_dim)
            blocks[sel] = choice["scores"][choice["label"]]
        for name, est in estimators.items():
            if name not in blocks:
                log.info("%s: scoring with %s", path.name, name)
                blocks[name] = _score(model, name, est, x, gt, cache)
    except Exception as exc:
        earlier = _read_eval(path)
        if earlier is None:  # nothing to lose: the failure is the run's evaluation record
            out.update(status="failed", reason=f"{type(exc).__name__}: {exc}", wall_time_s=time.perf_counter() - t0)
            atomic_write_json(path / "eval.json", out)
        raise
    metrics, diagnostics = {}, {}
    for name, b in blocks.items():
        metrics.update(b["metrics"])
        diagnostics[name] = {**b["diagnostics"], "config": estimators[name].config(), "metrics": sorted(b["metrics"]),
                             "scored": scored, **code_version()}
    notes = []
    earlier = _read_eval(path)
    if earlier is not None and earlier.get("status") == "completed":
        for name, d in (earlier.get("diagnostics") or {}).items():
            if name in diagnostics:
                continue
            kept = _jsonable(d.get("scored")) == _jsonable(scored) and d.get("metrics")
            if kept:
                metrics.update({k: earlier["metrics"][k] for k in d["metrics"] if k in earlier.get("metrics", {})})
                diagnostics[name] = d
            else:
                notes.append(f"removed the {name} numbers of an earlier evaluation: they scored "
                             f"{_describe(d.get('scored'))}, this evaluation {_describe(scored)}")
                log.warning("%s: %s", path, notes[-1])
    test_ll = {n: b["test_ll"] for n, b in blocks.items()}
    if {"quadrature", "mog_iwae"} <= test_ll.keys() and all(v is not None for v in test_ll.values()):
        metrics["test_loglik_gap/mog_iwae"] = float((test_ll["mog_iwae"] - test_ll["quadrature"]).mean())
    elif {"quadrature", "mog_iwae"} <= diagnostics.keys() and "test_loglik_gap/mog_iwae" in (earlier or {}).get(
            "metrics", {}):
        metrics["test_loglik_gap/mog_iwae"] = earlier["metrics"]["test_loglik_gap/mog_iwae"]  # both kept: same weights
    out.update(status="completed", scored=scored, metrics=metrics, diagnostics=diagnostics,
               wall_time_s=time.perf_counter() - t0)
    if candidates is not None:
        out["prior_candidates"] = candidates
    if notes:
        out["notes"] = notes
    out = _jsonable(out)  # what eval.json holds, also to the caller
    atomic_write_json(path / "eval.json", out)
    return out, {n: b["points"] for n, b in blocks.items()}


def _describe(scored: dict | None) -> str:
    """'checkpoint best, epoch 30, sha256 1a2b3c4d5e6f, prior bins=null' (or 'an unrecorded checkpoint')."""
    if not scored or not scored.get("checkpoint"):
        return "an unrecorded checkpoint"
    c = scored["checkpoint"]
    text = f"checkpoint {c.get('which')}, epoch {c.get('epoch')}, sha256 {str(c.get('sha256'))[:12]}"
    prior = scored.get("prior")
    if prior:
        text += f", prior {prior.get('chosen')} of {prior.get('settings')} chosen by {prior.get('selector')}"
    return text


def _read_eval(path: Path) -> dict | None:
    try:
        data = json.loads((path / "eval.json").read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def already_evaluated(path: Path, estimators: dict, prior_recovery: dict, checkpoint: str) -> bool:
    """Whether ``path``'s eval.json holds every one of ``estimators`` with the same settings, computed from the
    checkpoint file that is there now (same SHA-256) and, for a recovered prior, the same prior settings and
    selector."""
    done = _read_eval(path)
    if done is None or done.get("status") != "completed":
        return False
    try:
        sha = checkpoint_sha256(checkpoint_file(path, checkpoint))
    except (ConfigError, OSError):
        return False
    diag = done.get("diagnostics", {})
    for name, est in estimators.items():
        d = diag.get(name) or {}
        scored = d.get("scored") or {}
        ckpt = scored.get("checkpoint") or {}
        if d.get("config") != _jsonable(est.config()) or ckpt.get("which") != checkpoint or ckpt.get("sha256") != sha:
            return False
        prior = scored.get("prior")
        if prior is not None:
            sel = selector_of(estimators, int(prior.get("latent_dim") or 1))
            if (prior.get("settings") != _jsonable(prior_recovery) or prior.get("selector") != sel
                    or prior.get("selector_config") != _jsonable(estimators[sel].config())):
                return False
    return True


def _jsonable(obj):
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
    prior_recovery = plain_settings(prior_recovery)
    check_prior_recovery(prior_recovery)
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
