"""Lightning callbacks that let a run survive kills, preemption and bad numbers.

* ``RNGStateCheckpoint`` -- torch (CPU and CUDA), NumPy and Python RNG states in every checkpoint, restored
  on resume, so the shuffling order, the MAPA tail samples and the reparameterisation noise after a
  restart are those of an uninterrupted run (Lightning saves none of them).
* ``FlushLoggers`` -- metrics rows reach the disk every epoch, so a killed run loses none it resumes past.
* ``StopOnSignal`` -- on SIGTERM or SIGUSR2 (how SLURM preempts) finish the current epoch, let the
  epoch-end checkpoint be written, and stop; ``run_training`` then reports ``status: preempted`` and a
  rerun of the same command in the same folder resumes exactly.
* ``NonFiniteGuard`` -- ``nan_policy``: a non-finite loss or gradient either stops the run
  (``fail``) or skips that batch's optimiser step (``skip_batch``), counting the skipped batches.
* ``RunIdentity`` -- writes what defines the run (data, method, net, optimiser, seed) into every
  checkpoint; ``check_resumable`` refuses to resume a checkpoint written by another configuration.

Checkpoints hold only tensors, numbers, strings and containers of them, so they load with
``torch.load(..., weights_only=True)``; ``load_checkpoint_safely`` is the one place that loads them.
"""

from __future__ import annotations

import json
import logging
import pickle
import random
import re
import signal
from pathlib import Path

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback

from mapa_exp.errors import ConfigError, check

log = logging.getLogger(__name__)

NAN_POLICIES = ("fail", "skip_batch")


# -- RNG states ---------------------------------------------------------------------------------
def rng_states() -> dict:
    """Every global RNG state the training loop draws from, as tensors and plain numbers (pickle-free)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, py_state, gauss_next = random.getstate()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "state": torch.tensor(py_state, dtype=torch.int64), "gauss_next": gauss_next},
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict) -> None:
    """Restore what ``rng_states`` returned."""
    torch.set_rng_state(states["torch"])
    n = states["numpy"]
    keys = n["keys"].numpy().astype(np.uint32)
    np.random.set_state((n["kind"], keys, n["pos"], n["has_gauss"], n["cached_gaussian"]))
    p = states["python"]
    random.setstate((p["version"], tuple(int(v) for v in p["state"].tolist()), p["gauss_next"]))
    cuda = states.get("torch_cuda")
    if cuda and torch.cuda.is_available():
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)
        else:
            log.warning("checkpoint has CUDA RNG states for %d devices, this run has %d: not restored",
                        len(cuda), torch.cuda.device_count())


class RNGStateCheckpoint(Callback):
    """Saves the global RNG states with every checkpoint and restores them on resume.

    Checkpoints are written at the end of a training epoch (after its validation), and the next epoch
    draws its shuffling seed, its MAPA tail samples (in the collate function) and its noise from the
    global generators; restoring them before the fit loop starts reproduces all three.
    """

    KEY = "rng_states"

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.KEY] = rng_states()

    def on_load_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        if self.KEY in checkpoint:
            set_rng_states(checkpoint[self.KEY])
        else:
            log.warning("the checkpoint holds no RNG states: the resumed run will not repeat an uninterrupted one")


class FlushLoggers(Callback):
    """Writes the loggers' buffered rows before every checkpoint and at the start of every epoch, so a run
    killed outright keeps the metrics rows its last checkpoint covers (Lightning's CSV logger flushes every
    100 steps). The one row Lightning logs after an epoch's checkpoint (the train epoch means) reaches the
    disk at the next epoch's start: a SIGKILL in between loses that row only."""

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        self._flush(trainer)

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self._flush(trainer)

    @staticmethod
    def _flush(trainer) -> None:
        for logger in trainer.loggers:
            logger.save()


# -- preemption ---------------------------------------------------------------------------------
class StopOnSignal(Callback):
    """On one of ``signals``, stop at the end of the current epoch, after its checkpoint is written.

    The handlers replace Lightning's SIGTERM handler for the duration of training (Lightning would stop
    mid-epoch, where a resume cannot be exact); ``received`` holds the signal number afterwards.
    """

    def __init__(self, signals: tuple[str, ...] | list[str] = ("SIGTERM", "SIGUSR2")):
        self.signals = [signal.Signals[s] if isinstance(s, str) else signal.Signals(s) for s in signals]
        self.received: int | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.received is None:
            log.warning("received %s: stopping after this epoch's checkpoint", signal.Signals(signum).name)
        self.received = signum

    def on_train_start(self, trainer, pl_module) -> None:  # after Lightning installs its own handlers
        self.received = None
        for s in self.signals:
            try:
                self._previous[s] = signal.signal(s, self._handle)
            except ValueError:  # not the main thread: leave signals to Lightning
                return

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        # runs before ModelCheckpoint's hook (checkpoint callbacks run last), which then saves this epoch
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


# -- non-finite losses and gradients --------------------------------------------------------------
class NonFiniteError(FloatingPointError):
    """A non-finite loss or gradient under ``nan_policy=fail``; names the step and what was non-finite."""

    def __init__(self, what: str, step: int, epoch: int):
        self.what, self.step, self.epoch = what, step, epoch
        super().__init__(f"non-finite {what} at step {step} (epoch {epoch})")


class NonFiniteGuard(Callback):
    """Checks the loss and every gradient before each optimiser step (``policy``: fail | skip_batch).

    ``skip_batch`` drops the gradients, so the optimiser leaves every parameter and its own state (Adam's
    moments and step count) untouched for that batch; ``skipped`` counts such batches and travels with
    the checkpoint.
    """

    def __init__(self, policy: str = "fail"):
        check(policy in NAN_POLICIES, "nan_policy", policy, f"must be one of {NAN_POLICIES}")
        self.policy = policy
        self.skipped = 0
        self._loss_finite: torch.Tensor | None = None

    def on_before_backward(self, trainer, pl_module, loss: torch.Tensor) -> None:
        self._loss_finite = torch.isfinite(loss.detach()).all()  # no device sync here

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = [(n, p.grad) for n, p in pl_module.named_parameters() if p.grad is not None]
        checks = [torch.isfinite(g).all() for _, g in grads]
        if self._loss_finite is not None:
            checks.append(self._loss_finite.to(checks[0].device) if checks else self._loss_finite)
        if not checks or bool(torch.stack(checks).all()):  # one device sync per step
            return
        if self._loss_finite is not None and not bool(self._loss_finite):
            what = "loss"
        else:
            what = "gradient of " + next(n for (n, _), ok in zip(grads, checks) if not bool(ok))
        if self.policy == "fail":
            raise NonFiniteError(what, trainer.global_step, trainer.current_epoch)
        for group in optimizer.param_groups:
            for p in group["params"]:
                p.grad = None
        self.skipped += 1
        log.warning("non-finite %s at step %d: batch skipped (%d so far)", what, trainer.global_step, self.skipped)

    def state_dict(self) -> dict:
        return {"skipped": self.skipped}

    def load_state_dict(self, state_dict: dict) -> None:
        self.skipped = int(state_dict.get("skipped", 0))


# -- which configuration a checkpoint belongs to -----------------------------------------------
class RunIdentity(Callback):
    """Stores ``identity`` (flat ``{config key: value}``, JSON) in every checkpoint; see ``check_resumable``."""

    KEY = "run_identity"

    def __init__(self, identity: dict):
        self.identity = identity

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[self.KEY] = json.dumps(self.identity, sort_keys=True, default=str)


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def load_checkpoint_safely(path: str | Path) -> dict:
    """The checkpoint at ``path`` loaded with ``weights_only=True``; ConfigError if that is impossible."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError("checkpoint", str(path), f"cannot be loaded safely ({_load_failure(exc)}); "
                          "delete it to start this run over") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError("checkpoint", str(path), "is not a Lightning checkpoint; delete it to start this run over")
    return ckpt


def _load_failure(exc: Exception) -> str:
    """A short reason from torch.load's (long, multi-line) error message."""
    msg = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
    if found:
        return f"it holds a pickled {found.group(1)} object, refused by weights_only loading"
    if isinstance(exc, pickle.UnpicklingError):
        return "not a torch checkpoint: unpickling failed"
    first = (msg.strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
    return first[:150]


def check_resumable(path: str | Path, identity: dict) -> dict:
    """Load the checkpoint at ``path`` safely and check it was written by a run with ``identity``.

    Returns the checkpoint; raises ConfigError naming the first differing config keys otherwise.
    """
    ckpt = load_checkpoint_safely(path)
    if RunIdentity.KEY not in ckpt:
        raise ConfigError("checkpoint", str(path), "records no run configuration (not written by mapa-exp); "
                          "use another run folder or delete it")
    saved = json.loads(ckpt[RunIdentity.KEY])
    current = json.loads(json.dumps(identity, sort_keys=True, default=str))
    diff = sorted((k for k in saved.keys() | current.keys() if saved.get(k, _ABSENT) != current.get(k, _ABSENT)),
                  key=lambda k: (not k.endswith("name"), k))  # names first: "method.name: 'vae' there, ..."
    if diff:
        shown = "; ".join(f"{k}: {saved.get(k, _ABSENT)!r} there, {current.get(k, _ABSENT)!r} here" for k in diff[:3])
        more = f" (+{len(diff) - 3} more)" if len(diff) > 3 else ""
        raise ConfigError("checkpoint", str(path), f"was written by a different configuration ({shown}{more}); "
                          "use another run folder or delete it")
    return ckpt


__all__ = [
    "NAN_POLICIES", "FlushLoggers", "NonFiniteError", "NonFiniteGuard", "RNGStateCheckpoint", "RunIdentity",
    "StopOnSignal", "check_resumable", "load_checkpoint_safely", "rng_states", "set_rng_states",
]
