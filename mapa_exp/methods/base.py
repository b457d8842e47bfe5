"""The shared shell of every method: a stack of members, the training step loop, guards and metrics.

A module trains E *members* at once -- runs of one configuration that differ in ``seed`` (and, through the
datamodule, in ``dataset.draw``); a lone run is a stack of one. Every network is a stacked ``MLP`` (one
(E, P) parameter per network), the loss is the *sum* over members of each member's mean surrogate, and the
optimiser (Adam by default) is element-wise, so each member gets exactly the gradient and the update it
would get alone.

A method subclasses ``LatentVariableModule`` and implements ``step(batch, members) -> StepOutput`` for the
members in the slice ``members`` (a batch's tensors are stacked along dim 0): the per-point bound (a
log-likelihood bound in nats, all constants kept), the per-point surrogate whose gradient is the
estimator, and each member's forward passes of each network. Everything else lives here once:

* **the step loop.** Lightning runs a training epoch (and a validation pass) as *one* batch; the module
  runs the epoch's optimisation steps itself (manual optimisation), so Lightning's per-batch overhead is
  paid once per epoch. The members are processed in chunks of at most ``chunk_rows`` network rows (the
  CPU's caches; ``None`` on a GPU: all at once), each chunk's backward adding to its members' gradients.
  With ``compile_steps=True`` a training chunk runs through ``torch.compile`` (inductor): one compiled,
  tensor-only function of the chunk's parameter rows and batch (``torch.func.functional_call`` of
  ``forward``), so the same graph serves every member and chunk instead of recompiling per member slice.
  It fuses the element-wise work around the small matrix products (measured in docs/benchmarks.md,
  "Compiled training steps"); its first epoch pays the compilation, and it changes numbers only by float
  rounding. Evaluation passes stay eager.
* **members fail alone.** After each backward pass a member whose loss or gradient is not finite is left
  out of that optimiser step: its parameters and optimiser state are restored (a zero gradient would not
  do: Adam's momentum keeps moving). Under ``nan_policy=fail`` it is frozen from then on and reported as
  failed; under ``skip_batch`` only that step is skipped (counted per member). With torch's Adam the
  step counter is shared by a parameter's members, so after a skipped step that member's bias correction
  runs one step ahead of an unstacked run that skipped the same batch.
* **no device sync per step.** Metrics are accumulated on the device and read (and written, through the
  callbacks' ``on_member_metrics``) every ``trainer.log_every_n_steps`` steps and at epoch ends.

Logged names (per member): ``train/bound_step`` (every ``log_every_n_steps``), ``train/bound_epoch``,
``val/bound`` (nats per point), ``{train,val}/passes_encoder`` and ``/passes_decoder`` (per step),
``/passes_per_point_decoder`` (the decoder-dominated accounting, method.md §5) and
``/passes_per_point_encoder_decoder`` (encoder ~ decoder), and the running totals
``train/passes_encoder_total`` and ``train/passes_decoder_total``; ``trainer/global_step`` and ``epoch``.

Fault injection and instrumentation hooks: a Lightning callback may define
``on_train_step_start(trainer, module, batch)`` and ``on_after_step_backward(trainer, module)``; they run
at every optimisation step.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable

import lightning as L
import torch

from mapa_exp.errors import ConfigError, check
from mapa_exp.nets import MLP, NetSpec
from mapa_exp.seeding import generators

NAN_POLICIES = ("fail", "skip_batch")


def _check_optimizer(factory: Callable[..., torch.optim.Optimizer]) -> None:
    """Build the optimiser once on a dummy parameter, so bad settings fail before any work (ConfigError)."""
    settings = getattr(factory, "keywords", None) or {}
    try:
        probe = factory([torch.nn.Parameter(torch.zeros(1))])
    except (ValueError, TypeError) as exc:
        msg = str(exc).strip().splitlines()[0]
        named = {"lr": "learning rate", "betas": "beta", "eps": "epsilon"}  # how torch's messages say them
        key = next((k for k in settings if k in msg or named.get(k, k) in msg), None)
        raise ConfigError(f"optimizer.{key}" if key else "optimizer", settings[key] if key else settings, msg) from exc
    for group in probe.param_groups:
        if "lr" in group:
            check(float(group["lr"]) > 0, "optimizer.lr", float(group["lr"]), "must be > 0")


@contextmanager
def flushed_denormals():
    """Denormal floats flushed to zero on the CPU inside the block (the default, off, afterwards).

    IWAE's importance weights underflow into the denormal range (below 1.2e-38 in float32), where the CPU
    computes 10-100x slower: flushing made the IWAE S = 100 step about 1.6x faster (docs/benchmarks.md) and
    changes nothing but contributions below 1e-38. Only around the step loops: scipy's k-d tree, for one,
    crashes with flushing on.
    """
    torch.set_flush_denormal(True)
    try:
        yield
    finally:
        torch.set_flush_denormal(False)


@dataclass
class StepOutput:
    bound: torch.Tensor  # (e, B) lower bound on log p(x_n) per member and point, nats
    surrogate: torch.Tensor  # (e, B) its gradient is the estimator's
    passes_encoder: torch.Tensor | int  # (e,) or one number for every member: forward passes in this step
    passes_decoder: torch.Tensor | int


def _split(total: int, most: int) -> list[slice]:
    """``range(total)`` in as few slices of at most ``most`` as possible, their sizes differing by at most one
    (25 members at most 12 a chunk: 8, 8, 9, not 12, 12, 1). A chunk of one beside larger ones would cost a
    compiled step a second graph (inductor specialises sizes 0 and 1)."""
    k = -(-total // most)
    bounds = [i * total // k for i in range(k + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


def take(batch: dict, members: slice, points: slice | None = None) -> dict:
    """The batch of the members in ``members`` (tensors are stacked along dim 0; other entries are shared), and
    of the points in ``points`` (dim 1 of the per-point entries ``x``, ``index`` and ``eps``)."""
    out = {k: (v[members] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
    if points is not None:
        for k in POINT_KEYS:
            if k in out:
                out[k] = out[k][:, points]
    return out


POINT_KEYS = ("x", "index", "eps")  # the entries with one row per point (dim 1)


class LatentVariableModule(L.LightningModule, ABC):
    #: True when the model's prior is N(0, I); False when it must be recovered from codes (method.md §6)
    standard_normal_prior = True

    def __init__(
        self,
        latent_dim: int,
        obs_dim: int,
        likelihood,
        net: NetSpec | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
        seeds: Iterable[int] = (0,),
        nan_policy: str = "fail",
        chunk_rows: int | None = None,
        compile_steps: bool = False,
    ):
        super().__init__()
        check(nan_policy in NAN_POLICIES, "nan_policy", nan_policy, f"must be one of {NAN_POLICIES}")
        check(chunk_rows is None or (isinstance(chunk_rows, int) and chunk_rows >= 1), "chunk_rows", chunk_rows,
              "must be an integer >= 1 or null")
        self.automatic_optimization = False  # the module runs an epoch's steps itself (module doc)
        self.latent_dim, self.obs_dim, self.likelihood = latent_dim, obs_dim, likelihood
        self.seeds = [int(s) for s in seeds]
        self.members = len(self.seeds)
        check(isinstance(compile_steps, bool), "compile", compile_steps, "must be true or false")
        check(not compile_steps or shutil.which(os.environ.get("CXX", "g++")) is not None, "compile", compile_steps,
              f"torch.compile needs a C++ compiler and {os.environ.get('CXX', 'g++')!r} is not on PATH (set CXX)")
        self.nan_policy, self.chunk_rows, self.compile_steps = nan_policy, chunk_rows, compile_steps
        self.net = net or NetSpec()
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        _check_optimizer(self.optimizer_factory)
        self.decoder = self.make_net(latent_dim, obs_dim, "decoder")
        E = self.members
        # per-member counters and states travel with the checkpoint, so a resumed run keeps counting
        for name in ("passes_encoder_total", "passes_decoder_total", "train_steps_total", "train_points_total",
                     "skipped_batches", "failed_what"):  # failed_what: 0 the loss, 2 + i the i-th parameter
            self.register_buffer(name, torch.zeros(E, dtype=torch.long))
        self.register_buffer("failed_step", torch.full((E,), -1, dtype=torch.long))
        self.register_buffer("failed_epoch", torch.full((E,), -1, dtype=torch.long))
        self.register_buffer("active", torch.ones(E, dtype=torch.bool))
        # model selection on validation data: each member's best validation bound and its epoch
        self.register_buffer("best_val_bound", torch.full((E,), -torch.inf, dtype=torch.float64))
        self.register_buffer("best_epoch", torch.full((E,), -1, dtype=torch.long))

    def make_net(self, in_dim: int, out_dim: int, name: str) -> MLP:
        """A stacked network, member e initialised from its own ``init`` stream for this network's name.

        Its parameters at each member's best validation bound so far are kept beside it (buffer
        ``best_<name>``), for the member's ``checkpoints/best.ckpt``."""
        net = self.net(in_dim, out_dim, members=self.members, role=name)
        net.reset_parameters(generators(self.seeds, "init", name))
        self.register_buffer(f"best_{name}", net.params.detach().clone())
        self._selected_nets = [*getattr(self, "_selected_nets", []), name]
        return net

    @abstractmethod
    def step(self, batch: dict, members: slice) -> StepOutput:
        """The method's bound, surrogate and forward passes on one batch, for the members in ``members``."""

    @abstractmethod
    def rows_per_member(self, batch: dict) -> int:
        """How many network rows one member's step runs (chooses the member chunks)."""

    def log_likelihood(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return self.likelihood.log_prob(x, params)

    def generative_decoder(self, e: int = 0) -> torch.nn.Module:
        """Member e's decoder f_theta as a plain network (..., Dz) -> (..., Dx)."""
        return self.decoder.member(e)

    # -- the step loop -----------------------------------------------------------------------
    #: whether a step's points may be split into chunks (each point's bound independent of the others'); the
    #: MAPA family shares one union of candidates across a batch's points, so it cannot
    split_points = False

    def chunks(self, batch: dict) -> list[tuple[slice, slice]]:
        """(members, points) slices of at most ``chunk_rows`` network rows each, covering the batch."""
        E, B = self.members, batch["x"].shape[1]
        if self.chunk_rows is None:
            return [(slice(0, E), slice(0, B))]
        rows = max(1, self.rows_per_member(batch))
        if rows > self.chunk_rows and self.split_points:  # one member at a time, a few points at a time
            per_point = max(1, rows // B)
            points = _split(B, max(1, self.chunk_rows // per_point))
            return [(slice(e, e + 1), p) for e in range(E) for p in points]
        return [(m, slice(0, B)) for m in _split(E, max(1, self.chunk_rows // rows))]

    def forward(self, batch: dict, members: slice | None = None) -> StepOutput:
        """The method's ``step`` (``members=None``: every member of this module's parameters)."""
        return self.step(batch, members)

    def chunk_step(self, batch: dict, members: slice) -> StepOutput:
        """``step`` on one chunk of the training loop: compiled when ``compile_steps`` (module doc), else eager."""
        if not (self.compile_steps and self.training and torch.is_grad_enabled()):
            return self.step(batch, members)
        compiled = self.__dict__.get("_compiled_chunk")  # kept out of the module's attributes and state
        if compiled is None:
            def chunk(params: dict, chunk_batch: dict) -> StepOutput:
                return torch.func.functional_call(self, params, (chunk_batch, None), strict=False)

            compiled = self.__dict__["_compiled_chunk"] = torch.compile(chunk, dynamic=True)
        # every parameter is a stacked (E, ...) tensor: the chunk's members are rows of each
        return compiled({name: p[members] for name, p in self.named_parameters()}, batch)

    def _to_device(self, batch: dict) -> dict:
        if self.device.type == "cpu":
            return batch
        return {k: v.to(self.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}

    def on_train_start(self) -> None:
        self._steps_done = self.trainer.global_step  # one step per optimiser step (resumed runs included)

    def training_step(self, _one_pass, _index) -> None:
        trainer, dm = self.trainer, self.trainer.datamodule
        optimizer = self.optimizers()  # Lightning's wrapper: ~20 us a step, and the trainer's global_step counts
        starts = [cb for cb in trainer.callbacks if hasattr(cb, "on_train_step_start")]
        backs = [cb for cb in trainer.callbacks if hasattr(cb, "on_after_step_backward")]
        every = max(1, int(trainer.log_every_n_steps or 1))
        self._epoch = {"bound": torch.zeros(self.members, dtype=torch.float64, device=self.device),
                       "points": torch.zeros(self.members, dtype=torch.float64, device=self.device),
                       "enc": torch.zeros(self.members, dtype=torch.float64, device=self.device),
                       "dec": torch.zeros(self.members, dtype=torch.float64, device=self.device), "steps": 0}
        with flushed_denormals():
            for batch in dm.train_batches():
                batch = self._to_device(batch)
                for cb in starts:
                    cb.on_train_step_start(trainer, self, batch)
                stats = self._train_step(batch, optimizer, backs)
                self._steps_done += 1
                if self._steps_done % every == 0:
                    self._emit({"train/bound_step": stats["bound"], **self._pass_metrics("train", stats, "_step"),
                                "train/passes_encoder_total": self.passes_encoder_total,
                                "train/passes_decoder_total": self.passes_decoder_total})
        self._emit_epoch()  # the whole epoch is this one Lightning batch

    def _train_step(self, batch: dict, optimizer, backs: list) -> dict:
        E, dev = self.members, self.device
        optimizer.zero_grad(set_to_none=True)
        bound = torch.empty(E, device=dev)
        loss_ok = torch.empty(E, dtype=torch.bool, device=dev)
        enc = torch.empty(E, dtype=torch.long, device=dev)
        dec = torch.empty(E, dtype=torch.long, device=dev)
        B = batch["x"].shape[1]
        bound.zero_()
        loss_ok.fill_(True)
        enc.zero_()
        dec.zero_()
        for m, pts in self.chunks(batch):
            out = self.chunk_step(take(batch, m, pts), m)
            loss = -out.surrogate.sum(1) / B  # (e,): each member's own mean; their sum keeps the gradients apart
            loss.sum().backward()
            bound[m] += out.bound.detach().sum(1) / B
            loss_ok[m] &= torch.isfinite(loss.detach())
            enc[m] += out.passes_encoder
            dec[m] += out.passes_decoder
        for cb in backs:
            cb.on_after_step_backward(self.trainer, self)
        bad_grad = self._finite_gradients()
        self._guarded_step(optimizer, loss_ok & (bad_grad == 0), loss_ok, bad_grad)
        counted = self.active  # a frozen (failed) member's passes no longer count
        self.passes_encoder_total += enc * counted
        self.passes_decoder_total += dec * counted
        self.train_steps_total += counted
        self.train_points_total += B * counted
        acc = self._epoch
        acc["bound"] += bound.double() * B
        acc["points"] += B
        acc["enc"] += enc
        acc["dec"] += dec
        acc["steps"] += 1
        return {"bound": bound, "enc": enc, "dec": dec, "B": B}

    def _finite_gradients(self) -> torch.Tensor:
        """(E,) 0 when every gradient entry of each member is finite, else 1 + the index (in
        ``named_parameters``) of the first parameter whose gradient is not (no device sync)."""
        bad = torch.zeros(self.members, dtype=torch.long, device=self.device)
        for i, p in enumerate(self.parameters()):
            if p.grad is not None:
                bad = torch.where((bad == 0) & ~torch.isfinite(p.grad).flatten(1).all(1), i + 1, bad)
        return bad

    def _guarded_step(self, optimizer, ok: torch.Tensor, loss_ok: torch.Tensor, bad_grad: torch.Tensor) -> None:
        """The optimiser step for the members with ``ok`` and still active; the others keep their parameters
        and optimiser state (see the module doc). Records failures (fail) or skips (skip_batch)."""
        keep = ok & self.active
        on_cpu = keep.device.type == "cpu"  # there these reads are free; on a GPU they would sync every step
        if on_cpu and bool(keep.all()):  # the common case
            optimizer.step()
            return
        self._record_faults(ok, loss_ok, bad_grad)
        if on_cpu and not bool(keep.any()):  # no member steps: without gradients the optimiser leaves every
            optimizer.zero_grad(set_to_none=True)  # parameter and its state (step counter too) as they are;
            optimizer.step()  # called all the same, so that the trainer's step count stays the number of steps
            return
        E, state_of = self.members, optimizer.optimizer.state
        params = [p for p in self.parameters() if p.grad is not None]
        saved = []
        for p in params:
            state = state_of.get(p, {})
            per_member = {k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == E}
            saved.append((p, p.detach().clone(), per_member, bool(state)))
            p.grad = torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0)  # finite arithmetic for the others
        optimizer.step()
        for p, old, per_member, had_state in saved:
            m = keep.view(E, *([1] * (p.dim() - 1)))
            p.data.copy_(torch.where(m, p.data, old))
            for k, v in state_of[p].items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == E:
                    before = per_member.get(k, torch.zeros_like(v)) if had_state else torch.zeros_like(v)
                    v.copy_(torch.where(m.view(E, *([1] * (v.dim() - 1))), v, before))

    def _record_faults(self, ok: torch.Tensor, loss_ok: torch.Tensor, bad_grad: torch.Tensor) -> None:
        """Under ``fail`` freeze the active members without ``ok`` and note when and what; under ``skip_batch``
        count the skipped step."""
        bad = ~ok & self.active
        if self.nan_policy == "fail":
            self.failed_step.copy_(torch.where(bad, self._steps_done, self.failed_step))
            self.failed_epoch.copy_(torch.where(bad, torch.full_like(self.failed_epoch, self.current_epoch),
                                                self.failed_epoch))
            self.failed_what.copy_(torch.where(bad, torch.where(loss_ok, 1 + bad_grad, 0), self.failed_what))
            self.active &= ok
        else:
            self.skipped_batches += bad

    def failure_reasons(self) -> dict[int, str]:
        """member -> one line saying what went wrong and when (nan_policy=fail), for the failed members."""
        steps, epochs, what = self.failed_step.tolist(), self.failed_epoch.tolist(), self.failed_what.tolist()
        names = [n for n, _ in self.named_parameters()]
        said = {e: "loss" if what[e] == 0 else f"gradient of {names[what[e] - 2]}" for e in range(self.members)}
        return {e: f"non-finite {said[e]} at step {steps[e]} (epoch {epochs[e]})"
                for e in range(self.members) if steps[e] >= 0}

    def _emit_epoch(self) -> None:
        """The epoch's means, emitted before the epoch's checkpoint is written (so a kill cannot lose them)."""
        acc = self._epoch
        if not acc["steps"]:
            return
        steps, points = acc["steps"], acc["points"]
        self._emit({"train/bound_epoch": acc["bound"] / points,
                    "train/passes_encoder_epoch": acc["enc"] / steps, "train/passes_decoder_epoch": acc["dec"] / steps,
                    "train/passes_per_point_decoder_epoch": acc["dec"] / points,
                    "train/passes_per_point_encoder_decoder_epoch": (acc["enc"] + acc["dec"]) / points})
        if not bool(self.active.any()):  # every member failed: nothing left to train
            self.trainer.should_stop = True

    def _pass_metrics(self, split: str, stats: dict, suffix: str = "") -> dict:
        B, enc, dec = stats["B"], stats["enc"], stats["dec"]
        return {f"{split}/passes_encoder{suffix}": enc, f"{split}/passes_decoder{suffix}": dec,
                f"{split}/passes_per_point_decoder{suffix}": dec / B,
                f"{split}/passes_per_point_encoder_decoder{suffix}": (enc + dec) / B}

    def _emit(self, metrics: dict) -> None:
        """Hand per-member metrics (tensors of shape (E,)) to the callbacks that write them."""
        for cb in self.trainer.callbacks:
            hook = getattr(cb, "on_member_metrics", None)
            if hook is not None:
                hook(self.trainer, self, metrics, getattr(self, "_steps_done", 0), self.current_epoch)

    # -- evaluation passes -------------------------------------------------------------------
    @torch.no_grad()
    def mean_bounds(self, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
        """Mean per-point bound (nats) and mean passes per step of each member over ``batches``, in eval mode:
        ``{"bound", "enc", "dec", "B"}``, tensors of shape (E,) in float64."""
        was_training = self.training
        self.eval()
        E = self.members
        total = torch.zeros(E, dtype=torch.float64, device=self.device)
        enc = torch.zeros(E, dtype=torch.float64, device=self.device)
        dec = torch.zeros(E, dtype=torch.float64, device=self.device)
        points, steps = 0, 0
        with flushed_denormals():
            for batch in batches:
                batch = self._to_device(batch)
                for m, pts in self.chunks(batch):
                    out = self.step(take(batch, m, pts), m)
                    total[m] += out.bound.double().sum(1)
                    enc[m] += out.passes_encoder
                    dec[m] += out.passes_decoder
                points += batch["x"].shape[1]
                steps += 1
        self.train(was_training)
        return {"bound": total / points, "enc": enc / steps, "dec": dec / steps, "B": points / steps}

    def validation_step(self, _one_pass, _index) -> None:
        dm = self.trainer.datamodule
        res = self.mean_bounds(dm.eval_batches("val", "eval", self.current_epoch, limit=dm.limits["val"]))
        self._emit({"val/bound": res["bound"], **self._pass_metrics("val", res)})
        self._keep_best(res["bound"])

    @torch.no_grad()
    def _keep_best(self, val_bound: torch.Tensor) -> None:
        """Each active member whose validation bound improved keeps its current parameters as its best."""
        improved = (val_bound > self.best_val_bound) & self.active  # a NaN never improves
        self.best_val_bound.copy_(torch.where(improved, val_bound, self.best_val_bound))
        self.best_epoch.copy_(torch.where(improved, self.current_epoch, self.best_epoch))
        for name in self._selected_nets:
            best = getattr(self, f"best_{name}")
            best.copy_(torch.where(improved[:, None], getattr(self, name).params, best))

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())

    def forward_pass_summary(self, e: int = 0) -> dict:
        """Member e's training forward passes so far: totals and per-point / per-step averages."""
        steps = max(int(self.train_steps_total[e]), 1)
        points = max(int(self.train_points_total[e]), 1)
        enc, dec = int(self.passes_encoder_total[e]), int(self.passes_decoder_total[e])
        return {
            "passes_encoder_total": enc,
            "passes_decoder_total": dec,
            "train_steps": int(self.train_steps_total[e]),
            # per point per step: total passes / total points processed
            "passes_per_point_encoder": enc / points,
            "passes_per_point_decoder": dec / points,
            "passes_per_point_encoder_decoder": (enc + dec) / points,
            "passes_per_step_encoder": enc / steps,
            "passes_per_step_decoder": dec / steps,
        }
