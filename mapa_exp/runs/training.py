"""A training job: config in, trained run folders out (resolved config, metrics, checkpoint, results).

``run_job(cfg)`` is what ``train.py`` calls (through ``mapa_exp.pipeline``): it trains the job's members (``mapa_exp.runs.members``) -- one
run, or a stack of runs of one configuration that differ in ``seed`` and ``dataset.draw`` -- as one model
in one process, and returns each member's results; ``run_training(cfg)`` is the same for a plain run and
returns its one result. Each member's ``results.json`` is written atomically whatever happens:
``status: completed`` with the final bounds and forward-pass counts, ``failed`` with the reason (members
fail alone: a non-finite loss freezes that member only), ``preempted`` (SIGTERM/SIGUSR2) or ``interrupted``
(SIGINT, Ctrl-C); a member killed outright stays ``running``. Rerun in the same folder(s), a job resumes exactly from its last checkpoint,
keeping the metrics rows of the epochs already done; completed members are not trained again.
"""

from __future__ import annotations

import json
import logging
import math
import os
import resource
import signal
import sys
import time
import warnings
from pathlib import Path
from typing import Callable

import hydra
import lightning as L
import torch
from lightning.fabric.utilities.exceptions import MisconfigurationException
from lightning.pytorch.utilities.exceptions import SIGTERMException
from omegaconf import DictConfig, OmegaConf

from mapa_exp.config import run_configuration, validate
from mapa_exp.errors import ConfigError, check
from mapa_exp.io import FolderLock, atomic_write_json, atomic_write_text, code_version
from mapa_exp.runs.allocator import check_malloc, keep_freed_memory
from mapa_exp.runs.callbacks import MemberLogging, StopOnSignal
from mapa_exp.runs.checkpoints import (
    RunIdentity, best_checkpoint, check_resumable, checkpoint_identities, load_checkpoint_safely, save_checkpoint,
    slice_checkpoint,
)
from mapa_exp.runs.members import Member, is_stacked, members_of

log = logging.getLogger(__name__)

RESUME = "to resume, run the command train.py printed (the same arguments, this folder pinned)"
CHUNK_ROWS_CPU = 32768  # chunk_rows=auto on the CPU: network rows per forward/backward chunk of members
STACK_FILE = "stack.json"


def build(cfg: DictConfig, seeds: list[int] | None = None, draws: list[int] | None = None):
    """Instantiate the data and the module of a config, for one run or for a stack of members with these
    seeds and draws (one per member); returns (datamodule, module)."""
    seeds = [int(cfg.seed)] if seeds is None else [int(s) for s in seeds]
    draws = [int(cfg.dataset.get("draw", 0))] * len(seeds) if draws is None else [int(d) for d in draws]
    truths = {d: hydra.utils.instantiate(cfg.dataset, draw=d) for d in sorted(set(draws))}
    gt = truths[draws[0]]
    module = hydra.utils.instantiate(  # the method: one module and its config (mapa_exp.methods.base)
        cfg.method.module,
        latent_dim=gt.latent_dim,
        obs_dim=gt.obs_dim,
        likelihood=gt.likelihood,
        net=hydra.utils.instantiate(cfg.net),
        optimizer=hydra.utils.instantiate(cfg.optimizer),
        seeds=seeds,
        nan_policy=cfg.get("nan_policy", "fail"),
        chunk_rows=_chunk_rows(cfg),
        compile_steps=bool(cfg.get("compile", False)),
    )
    make_datamodule = hydra.utils.instantiate(cfg.data, _partial_=True)  # objects and lists kept out of OmegaConf
    datamodule = make_datamodule(groundtruth=[truths[d] for d in draws], seeds=seeds)
    return datamodule, module


def _chunk_rows(cfg: DictConfig) -> int | None:
    """``chunk_rows``, with ``auto`` = CHUNK_ROWS_CPU on the CPU and all members at once on an accelerator."""
    value = cfg.get("chunk_rows", "auto")
    if value != "auto":
        return value
    accelerator = str(OmegaConf.select(cfg, "trainer.accelerator", default="cpu"))
    on_gpu = accelerator in ("gpu", "cuda", "mps") or (accelerator == "auto" and torch.cuda.is_available())
    return None if on_gpu else CHUNK_ROWS_CPU


def _malloc(cfg: DictConfig) -> dict | None:
    node = cfg.get("malloc")
    return OmegaConf.to_container(node) if isinstance(node, DictConfig) else node


def quiet_lightning() -> None:
    """No banners, tips or warnings that do not apply: Lightning's hardware lines and product tips, its
    logging-interval and SLURM-srun hints (a pass is one "batch" here; the SLURM launcher needs no srun)."""
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logging.getLogger(name).setLevel(logging.WARNING)
    for message in (".*is smaller than the logging interval.*", ".*The `srun` command is available.*",
                    ".*isinstance\\(treespec, LeafSpec\\)` is deprecated.*"):
        warnings.filterwarnings("ignore", message=message)


def configure_process(num_threads: int | None, malloc: dict | None = None) -> None:
    """The process settings training runs with: ``num_threads`` CPU threads (null: torch's default) and
    glibc's allocator settings (``malloc``; null: glibc's defaults; ``mapa_exp.runs.allocator``)."""
    if num_threads:
        torch.set_num_threads(int(num_threads))
    keep_freed_memory(malloc)


def _instantiate_group(node) -> list:
    return [hydra.utils.instantiate(c) for c in (node or {}).values() if c is not None and "_target_" in c]


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
VOLATILE_KEYS = {"dataset.cache_dir", "data.cache_dir"}
# how a run is computed or evaluated, not what it trains
COMPUTE_KEYS = ("hydra", "stack", "stack_members", "stack_subdir", "chunk_rows", "compile", "malloc",
                "evaluate", "eval_checkpoint", "evaluator", "prior_recovery")


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flatten(v, f"{prefix}{k}."))
        else:
            out[f"{prefix}{k}"] = v
    return out


def run_training(cfg: DictConfig, finish: Callable[["Trained"], None] | None = None) -> dict:
    """Train one plain run (no ``stack_members``); returns its results (also in ``results.json``).

    Raises RunFailed when it failed (e.g. a non-finite loss under ``nan_policy=fail``).
    """
    check(not is_stacked(cfg), "stack_members", cfg.get("stack_members"), "run_training trains one run; use run_job")
    (res,) = run_job(cfg, finish)
    if res.get("status") == "failed":
        raise RunFailed(res["reason"])
    return res


def run_job(cfg: DictConfig, finish: Callable[["Trained"], None] | None = None) -> list[dict]:
    """Train the job's members (one run or a stack, see the module doc); returns each member's results.
    ``finish(trained)`` runs after training, while the members' loggers are open (``mapa_exp.pipeline``: the
    dashboards' pictures and, with ``evaluate=true``, the evaluation)."""
    validate(cfg)  # keys, types, targets, trainer limits (mapa_exp.config): also what `+key=...` added
    check(isinstance(cfg.seed, int) and 0 <= cfg.seed < 2**32, "seed", cfg.seed, "must be an integer in [0, 2**32)")
    nt = cfg.get("num_threads")
    check(nt is None or (isinstance(nt, int) and nt >= 1), "num_threads", nt, "must be an integer >= 1 or null")
    check_malloc(_malloc(cfg))
    _absolute_data_path(cfg)
    members = members_of(cfg)
    for m in members:
        check(isinstance(m.seed, int) and 0 <= m.seed < 2**32, "seed", m.seed, "must be an integer in [0, 2**32)")
    done = {m.index: _completed_results(m.run_dir, m.cfg) for m in members}
    todo = [m for m in members if done[m.index] is None]
    if not todo:
        log.info("every run of this job already completed; nothing to do")
        return [done[m.index] for m in members]
    stack_dir = Path(cfg.paths.run_dir)
    stacked = is_stacked(cfg)
    # one writer per folder: a second process is refused here, before it reads or writes anything
    lock = FolderLock([stack_dir, *(m.run_dir for m in todo)], "hydra.run.dir" if not stacked else "run folder")
    with lock:
        return _run_members(cfg, members, todo, done, stack_dir, stacked, finish)


def _run_members(cfg: DictConfig, members: list[Member], todo: list[Member], done: dict, stack_dir: Path,
                 stacked: bool, finish) -> list[dict]:
    """``run_job`` for the members still to train (``todo``), the folders locked."""
    identities = [run_identity(m.cfg) for m in todo]
    resume = _resume_point(stack_dir / "checkpoints" / "last.ckpt", identities)  # checked before anything is touched
    if resume is not None:
        log.info("resuming %s from checkpoints/last.ckpt: %d epoch(s) done", stack_dir, resume.epochs)
    t0 = time.perf_counter()
    results = {m.index: _initial_results(m, resume.epochs if resume else None, stack_dir if stacked else None,
                                         len(todo)) for m in todo}
    for m in todo:  # a member killed outright stays marked "running"
        atomic_write_json(m.run_dir / "results.json", results[m.index])
    if stacked:
        _write_stack_file(stack_dir, "running", todo)
    loggers: list[list] = []
    try:
        for m in todo:
            atomic_write_text(m.run_dir / "config.yaml", OmegaConf.to_yaml(m.cfg, resolve=True))
            loggers.append(_member_loggers(m.cfg, keep_epochs=resume.epochs if resume else None))
        fit = _fit(cfg, todo, identities, resume, loggers)
        outcome = _outcome(fit, todo)
    except SIGTERMException:  # SIGTERM before StopOnSignal took over: Lightning stopped mid-epoch, saving nothing
        outcome = {m.index: dict(status="preempted", signal=int(signal.SIGTERM), reason="SIGTERM received before "
                   f"training started; {RESUME} from the last checkpoint, if any") for m in todo}
    except BaseException as exc:
        if _ctrl_c(exc):  # Ctrl-C outside the epochs StopOnSignal guards, or a second one
            outcome = {m.index: dict(status="interrupted", signal=int(signal.SIGINT), reason="interrupted (SIGINT) "
                       f"outside an epoch; {RESUME} from the last checkpoint, if any") for m in todo}
        else:
            _record_failure(exc, results, todo, loggers, stack_dir if stacked else None, t0)
            raise
    for m in todo:
        results[m.index].update(outcome[m.index])
    completed = [(e, m) for e, m in enumerate(todo) if results[m.index]["status"] == "completed"]
    stopped = any(results[m.index]["status"] in STOPPED for m in todo)
    if (completed or stopped) and (stack_dir / "checkpoints" / "last.ckpt").exists():
        _write_member_checkpoints(stack_dir / "checkpoints" / "last.ckpt", todo, results, stacked)
    _write_results(results, todo, stack_dir if stacked else None, t0)
    try:
        for e, m in completed:
            for lg in loggers[e]:
                lg.log_summary(results[m.index])
        if finish is not None and completed:  # before the loggers close: what it logs joins the same runs
            finish(Trained(cfg, fit, completed, results, loggers))
    finally:
        _close_loggers(results, todo, loggers)
    return [results.get(m.index) or done[m.index] for m in members]


def _ctrl_c(exc: BaseException) -> bool:
    """A Ctrl-C: KeyboardInterrupt itself, or the ``SystemExit(1)`` Lightning turns it into inside ``fit``."""
    return isinstance(exc, KeyboardInterrupt) or (isinstance(exc, SystemExit) and exc.code == 1
                                                  and isinstance(exc.__context__, KeyboardInterrupt))


def _record_failure(exc: BaseException, results: dict, todo: list, loggers: list, stack_dir, t0: float) -> None:
    cause = config_error(exc) or _root_cause(exc)
    for m in todo:
        results[m.index].update(status="failed", reason=f"{type(cause).__name__}: {cause}")
    _write_results(results, todo, stack_dir, t0)
    _close_loggers(results, todo, loggers)


class Trained:
    """A job's completed members after training, for a ``finish`` step (``mapa_exp.pipeline``): the config, the
    fit (module, datamodule), ``completed`` = [(stack index, Member)], the results and each member's loggers."""

    def __init__(self, cfg, fit, completed: list, results: dict, loggers: list[list]):
        self.cfg, self.fit, self.completed, self.results, self.loggers = cfg, fit, completed, results, loggers

    def loggers_of(self, run_dir) -> list:
        """The loggers of the member whose run folder is ``run_dir``."""
        e = next(e for e, m in self.completed if Path(m.run_dir).resolve() == Path(run_dir).resolve())
        return self.loggers[e]


def _close_loggers(results: dict, todo: list[Member], loggers: list[list]) -> None:
    for m, group in zip(todo, loggers):
        for lg in group:
            try:
                lg.finalize(results[m.index]["status"])
            except Exception as exc:  # noqa: BLE001 -- never mask the run's own outcome
                log.warning("closing a logger of %s failed: %s", m.run_dir, exc)


class _Resume:
    """Where a job resumes: the checkpoint (its file, or a slice of it in memory) and the epochs done."""

    def __init__(self, path: Path, ckpt: dict | None, epochs: int):
        self.path, self.ckpt, self.epochs = path, ckpt, epochs


def _resume_point(path: Path, identities: list[dict]) -> _Resume | None:
    """The checkpoint to resume ``identities`` from: the stack's own, or its slice when some of its members
    need no more training (completed); None when there is none."""
    if not path.exists():
        return None
    ckpt, where = check_resumable(path, identities)
    whole = where == list(range(len(checkpoint_identities(ckpt))))
    return _Resume(path, None if whole else slice_checkpoint(ckpt, where), ckpt["epoch"] + 1)


def _initial_results(m: Member, resume_epoch: int | None, stack_dir: Path | None, stack_size: int) -> dict:
    out = {
        "status": "running",
        "dataset": m.cfg.dataset.name,
        "method": m.cfg.method.name,
        "K": m.cfg.method.get("K"),
        "S": m.cfg.method.get("S"),
        "seed": m.seed,
        "draw": m.draw,
        "run_dir": str(m.run_dir),
        "resumed_from_epoch": resume_epoch,
        **code_version(),  # code_commit, code_dirty: the code that trained it (mapa_exp.io.code_version)
        "configuration": run_configuration(OmegaConf.to_container(m.cfg, resolve=True)),  # what results group by
    }
    if stack_dir is not None:
        out.update(stack_dir=str(stack_dir), stack_size=stack_size)
    return out


def _write_results(results: dict, todo: list[Member], stack_dir: Path | None, t0: float) -> None:
    """Write the members' results (and the stack's status)."""
    wall = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    for m in todo:
        results[m.index].update(wall_time_s=wall, peak_rss_mib=peak)
        if results[m.index].get("status") in STOPPED:  # whose stop it is: a later attempt must not act on it
            results[m.index]["pid"] = os.getpid()
        atomic_write_json(m.run_dir / "results.json", results[m.index])
    log.info("results: %s", ", ".join(str(m.run_dir / "results.json") for m in todo))
    if stack_dir is not None:
        statuses = [results[m.index]["status"] for m in todo]
        worst = next((s for s in ("interrupted", "preempted", "failed", "running") if s in statuses), "completed")
        extra = {"signal": results[todo[0].index]["signal"], "pid": os.getpid()} if worst in STOPPED else {}
        _write_stack_file(stack_dir, worst, todo, wall_time_s=wall, **extra)


def _write_stack_file(stack_dir: Path, status: str, members: list[Member], **extra) -> None:
    """``stack.json``: the stack's status (the worst of its members') and its members' run folders."""
    atomic_write_json(stack_dir / STACK_FILE, {"status": status, "members": [str(m.run_dir) for m in members],
                                               **extra})


class _Fit:
    def __init__(self, trainer, datamodule, module, callbacks):
        self.trainer, self.datamodule, self.module, self.callbacks = trainer, datamodule, module, callbacks


def _fit(cfg: DictConfig, members: list[Member], identities: list[dict], resume: _Resume | None,
         loggers: list[list]) -> _Fit:
    """Build the stack of ``members`` and fit it (from ``resume`` when given)."""
    quiet_lightning()
    configure_process(cfg.get("num_threads"), _malloc(cfg))
    L.seed_everything(cfg.seed, workers=True, verbose=False)  # only for code outside the members' own streams
    datamodule, module = build(cfg, [m.seed for m in members], [m.draw for m in members])
    datamodule.setup("fit")
    for m, group in zip(members, loggers):
        config = _loggable_config(m.cfg)
        for lg in group:
            lg.log_hyperparams(config)
    callbacks = [*_instantiate_group(cfg.get("callbacks")), RunIdentity(identities), MemberLogging(loggers)]
    trainer = _build_trainer(cfg, callbacks, datamodule)
    ckpt_path = None
    if resume is not None:
        ckpt_path = resume.path
        if resume.ckpt is not None:  # a slice: resumed from a file of its own
            ckpt_path = resume.path.with_name("resume.ckpt")
            save_checkpoint(resume.ckpt, ckpt_path)
    try:
        # weights_only: the checkpoint holds tensors and plain data only (mapa_exp.runs.checkpoints)
        trainer.fit(module, datamodule=datamodule, ckpt_path=str(ckpt_path) if ckpt_path else None, weights_only=True)
    finally:
        if ckpt_path is not None and ckpt_path.name == "resume.ckpt":
            ckpt_path.unlink(missing_ok=True)
    return _Fit(trainer, datamodule, module, callbacks)


def _member_loggers(cfg: DictConfig, keep_epochs: int | None) -> list:
    """The member's loggers from its ``logger`` group (a resumed CSV keeps the rows of the epochs done)."""
    out = []
    for c in (cfg.get("logger") or {}).values():
        if c is None or "_target_" not in c:
            continue
        csv = str(c._target_).endswith("MetricsCSV")
        out.append(hydra.utils.instantiate(c, keep_epochs=keep_epochs) if csv else hydra.utils.instantiate(c))
    return out


def _outcome(fit: _Fit, members: list[Member]) -> dict[int, dict]:
    """Each member's results after the fit returned: preempted (a signal stopped it early), failed (frozen
    after a non-finite loss or gradient), or completed with the final bounds, evaluated on the member's
    ``final`` random stream so that they depend on the weights alone."""
    trainer, dm, module = fit.trainer, fit.datamodule, fit.module
    stop = next((c for c in fit.callbacks if isinstance(c, StopOnSignal)), None)
    skipped = module.skipped_batches.tolist()
    if stop is not None and stop.received is not None and not _training_finished(trainer):
        reason = (f"{signal.Signals(stop.received).name} received; stopped after epoch {trainer.current_epoch} of "
                  f"{trainer.max_epochs} and its checkpoint; {RESUME}")
        status = "interrupted" if stop.received == signal.SIGINT else "preempted"
        return {m.index: {"status": status, "signal": int(stop.received), "epochs": trainer.current_epoch,
                          "skipped_batches": skipped[e], "reason": reason} for e, m in enumerate(members)}
    train = module.mean_bounds(dm.eval_batches("train", "final", extend=module.batch_extras))["bound"].tolist()
    val = module.mean_bounds(dm.eval_batches("val", "final", extend=module.batch_extras))["bound"].tolist()
    failures = module.failure_reasons()
    best_epoch, best_val = module.best_epoch.tolist(), module.best_val_bound.tolist()
    out = {}
    for e, m in enumerate(members):
        res = {"skipped_batches": skipped[e], "epochs": trainer.current_epoch}
        if e in failures or not (math.isfinite(train[e]) and math.isfinite(val[e])):
            why = failures.get(e) or f"final bound is not finite: {train[e]}, {val[e]}"
            res.update(status="failed", reason=f"{why}: method={m.cfg.method.name} dataset={m.cfg.dataset.name} "
                       f"seed={m.seed} draw={m.draw} (nan_policy={m.cfg.get('nan_policy')})")
        else:
            res.update(status="completed", train_bound=train[e], val_bound=val[e],
                       best_epoch=best_epoch[e] + 1 if best_epoch[e] >= 0 else None,  # epochs done at its best
                       best_val_bound=best_val[e] if best_epoch[e] >= 0 else None,
                       surrogate_mse=dm.groundtruth.surrogate_mse, proximity_cache_hit=dm.member_cache_hit(e),
                       **module.forward_pass_summary(e))
        out[m.index] = res
    return out


STOPPED = ("interrupted", "preempted")  # a signal stopped the member after a checkpoint: it resumes later


def _write_member_checkpoints(stack_ckpt: Path, members: list[Member], results: dict, stacked: bool) -> None:
    """Each completed or stopped member's ``checkpoints/best.ckpt`` (its weights at its best validation bound so
    far) and, for a completed member of a stack, its own ``checkpoints/last.ckpt``: its slice of the stack's, a
    complete checkpoint (a stopped stack resumes from the stack's own)."""
    ckpt = load_checkpoint_safely(stack_ckpt)
    for e, m in enumerate(members):
        status = results[m.index]["status"]
        if status == "completed" or status in STOPPED:
            own = slice_checkpoint(ckpt, [e]) if stacked else ckpt
            if stacked and status == "completed":
                save_checkpoint(own, m.run_dir / "checkpoints" / "last.ckpt")
            save_checkpoint(best_checkpoint(own), m.run_dir / "checkpoints" / "best.ckpt")


def _absolute_data_path(cfg: DictConfig) -> None:
    """A data file's path as the run stores it: ``~`` expanded and relative to the launch folder, made absolute,
    so that the run's config.yaml still finds the file from another folder."""
    from omegaconf import open_dict, read_write

    path = OmegaConf.select(cfg, "dataset.path", default=None)
    if isinstance(path, str) and path:
        with read_write(cfg), open_dict(cfg):
            cfg.dataset.path = str(Path(path).expanduser().resolve())


def _build_trainer(cfg: DictConfig, callbacks: list, datamodule) -> L.Trainer:
    """The Trainer; its own argument checks become ConfigErrors naming the ``trainer.<arg>`` key.

    ``limit_train_batches`` / ``limit_val_batches`` limit the steps of the module's own step loop (Lightning
    sees one batch per pass)."""
    import re

    node = OmegaConf.to_container(cfg.trainer, resolve=True)
    node["enable_progress_bar"] = bool(node.get("enable_progress_bar", True)) and sys.stderr.isatty()  # no redraws in logs
    for split in ("train", "val"):
        datamodule.limits[split] = node.pop(f"limit_{split}_batches", None)  # checked by mapa_exp.config.check_trainer
    try:
        return hydra.utils.instantiate(node, callbacks=callbacks, logger=False)
    except Exception as exc:
        root = _root_cause(exc)
        if config_error(exc) is not None or not isinstance(root, (ValueError, MisconfigurationException)):
            raise
        msg = str(root).strip().splitlines()[0]
        name = next((w for w in re.findall(r"\w+", msg) if w in cfg.trainer and not w.startswith("_")), None)
        raise ConfigError(f"trainer.{name}" if name else "trainer", cfg.trainer.get(name) if name else
                          cfg.trainer.get("_target_"), msg) from exc


def _training_finished(trainer) -> bool:
    max_epochs = trainer.max_epochs
    return max_epochs is not None and max_epochs >= 0 and trainer.current_epoch >= max_epochs


def _completed_results(run_dir: Path, cfg: DictConfig) -> dict | None:
    """The stored results if ``run_dir`` holds a completed run of this very config (how it was computed aside)."""
    try:
        results = json.loads((run_dir / "results.json").read_text())
        if not (isinstance(results, dict) and results.get("status") == "completed"):
            return None
        stored = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml"))
    except (OSError, ValueError):
        return None
    current = OmegaConf.to_container(cfg, resolve=True)
    for c in (stored, current):
        for k in COMPUTE_KEYS:
            c.pop(k, None)
    return results if stored == current else None


def _loggable_config(cfg: DictConfig) -> dict:
    """The resolved run config without Hydra's own node, for logger hyperparameters."""
    out = OmegaConf.to_container(cfg, resolve=True)
    for k in ("hydra", "stack_members", "stack_subdir"):
        out.pop(k, None)
    return out


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
