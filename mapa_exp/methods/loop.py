"""The one stacked step loop: *how* every method is trained, whatever it computes.

A method (``mapa_exp.methods.base.Method``) says what it computes on a batch (``step``: bound, surrogate,
forward passes), what its batches carry (``batch_extras``), its parameter groups and its training scheme.
``StackedLoop`` owns the rest, once for every method:

* **member chunks.** The members are processed in chunks of at most ``chunk_rows`` network rows (the CPU's
  caches; ``None`` on a GPU: all at once), each chunk's backward adding to its members' gradients; a method
  whose points are independent (``split_points``) may also be split by points.
* **compile.** With ``compile_steps`` a training chunk runs through ``torch.compile`` (inductor): one compiled,
  tensor-only function of the chunk's parameter rows and batch (``torch.func.functional_call`` of the
  module's ``forward``), so the same graph serves every member and chunk. Evaluation passes stay eager.
* **members fail alone, for any number of optimisers.** ``optimize`` steps the given optimisers, each for the
  members its mask allows; after the backward pass a member whose loss or gradient (of the parameters being
  stepped) is not finite is left out: its parameters and optimiser state are restored (a zero gradient would
  not do: Adam's momentum keeps moving). Under ``nan_policy=fail`` it is frozen from then on and reported as
  failed; under ``skip_batch`` only that step is skipped (counted per member). torch's Adam shares one step
  counter among a parameter's members, so after a skipped step that member's bias correction runs one step
  ahead of an unstacked run; a scheme that steps members unequally on purpose uses ``StackedAdam``
  (``mapa_exp.methods.optim``), whose counters are per member and restored with the rest.
* **metrics without a device sync per step**: accumulated on the device and handed to the callbacks'
  ``on_member_metrics`` every ``log_every_n_steps`` steps and at epoch ends.
* **best weights**: after each validation pass every member whose bound improved keeps its parameters.

The same loop runs without Lightning (``trainer=None``), which is what the benchmarks time
(``mapa_exp.benchmarking.bare_epoch``): there are then no callbacks and optional phase timers.

Fault injection and instrumentation hooks: a Lightning callback may define
``on_train_step_start(trainer, module, batch)`` and ``on_after_step_backward(trainer, module)``; they run
at every optimisation step.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import torch

PHASES = ("data", "forward", "backward", "optimizer")


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


def split_evenly(total: int, most: int) -> list[slice]:
    """``range(total)`` in as few slices of at most ``most`` as possible, their sizes differing by at most one
    (25 members at most 12 a chunk: 8, 8, 9, not 12, 12, 1). A chunk of one beside larger ones would cost a
    compiled step a second graph (inductor specialises sizes 0 and 1)."""
    k = -(-total // most)
    bounds = [i * total // k for i in range(k + 1)]
    return [slice(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:])]


POINT_KEYS = ("x", "index", "eps")  # the entries with one row per point (dim 1)


def take(batch: dict, members: slice, points: slice | None = None) -> dict:
    """The batch of the members in ``members`` (tensors are stacked along dim 0; other entries are shared), and
    of the points in ``points`` (dim 1 of the per-point entries ``x``, ``index`` and ``eps``)."""
    out = {k: (v[members] if torch.is_tensor(v) and v.dim() > 0 else v) for k, v in batch.items()}
    if points is not None:
        for k in POINT_KEYS:
            if k in out:
                out[k] = out[k][:, points]
    return out


class Timer:
    """Seconds per phase (``PHASES``) of the steps it times, with ``sync`` (e.g. ``torch.cuda.synchronize``)
    at each boundary so that asynchronous devices are timed, not queued."""

    def __init__(self, sync: Callable[[], None] | None = None):
        import time

        self.clock, self.sync, self.seconds = time.perf_counter, sync or (lambda: None), {p: 0.0 for p in PHASES}
        self._t = None

    def start(self) -> None:
        self.sync()
        self._t = self.clock()

    def lap(self, phase: str) -> None:
        self.sync()
        now = self.clock()
        self.seconds[phase] += now - self._t
        self._t = now


def _raw(optimizer) -> torch.optim.Optimizer:
    """The torch optimiser behind Lightning's wrapper (or the optimiser itself)."""
    return getattr(optimizer, "optimizer", optimizer)


class StackedLoop:
    """The step loop of one stacked module (module doc). ``trainer`` is Lightning's (None for a bare loop)."""

    def __init__(self, module, trainer=None, optimizers: Sequence | None = None, timer: Timer | None = None):
        """``optimizers``: the module's, in ``Method.optimizer_groups`` order (default: Lightning's wrappers of
        ``configure_optimizers``'s, which keep the trainer's step count)."""
        self.module, self.trainer, self.timer = module, trainer, timer
        if optimizers is None:
            optimizers = module.optimizers()
        self.optimizers = list(optimizers) if isinstance(optimizers, (list, tuple)) else [optimizers]
        callbacks = trainer.callbacks if trainer is not None else []
        self.starts = [cb for cb in callbacks if hasattr(cb, "on_train_step_start")]
        self.backs = [cb for cb in callbacks if hasattr(cb, "on_after_step_backward")]
        self.every = max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        self.steps_done = int(trainer.global_step) if trainer is not None else 0  # optimiser steps, resumes included
        self._owned: dict[int, list] = {}
        self.new_epoch()

    # -- chunks -----------------------------------------------------------------------------
    def chunks(self, batch: dict) -> list[tuple[slice, slice]]:
        """(members, points) slices of at most ``chunk_rows`` network rows each, covering the batch."""
        m = self.module
        E, B = m.members, batch["x"].shape[1]
        if m.chunk_rows is None:
            return [(slice(0, E), slice(0, B))]
        rows = max(1, m.rows_per_member(batch))
        if rows > m.chunk_rows and m.split_points:  # one member at a time, a few points at a time
            per_point = max(1, rows // B)
            points = split_evenly(B, max(1, m.chunk_rows // per_point))
            return [(slice(e, e + 1), p) for e in range(E) for p in points]
        return [(mm, slice(0, B)) for mm in split_evenly(E, max(1, m.chunk_rows // rows))]

    def chunk_step(self, batch: dict, members: slice) -> StepOutput:
        """The method's ``step`` on one chunk of the training loop: compiled when ``compile_steps``, else eager."""
        m = self.module
        if not (m.compile_steps and m.training and torch.is_grad_enabled()):
            return m.step(batch, members)
        compiled = m.__dict__.get("_compiled_chunk")  # kept out of the module's attributes and state
        if compiled is None:
            def chunk(params: dict, chunk_batch: dict) -> StepOutput:
                return torch.func.functional_call(m, params, (chunk_batch, None), strict=False)

            compiled = m.__dict__["_compiled_chunk"] = torch.compile(chunk, dynamic=True)
        # every parameter is a stacked (E, ...) tensor: the chunk's members are rows of each
        return compiled({name: p[members] for name, p in m.named_parameters()}, batch)

    # -- one optimisation step ----------------------------------------------------------------
    def optimize(self, batch: dict, optimizers: Sequence, masks: Sequence[torch.Tensor | None] | None = None,
                 ) -> dict:
        """One step of ``optimizers`` on ``batch``: the chunks' forward and backward passes, the NaN guard, and
        each optimiser's step for the members its mask (E,) allows (None: all). Returns the step's
        ``{"bound", "enc", "dec", "B", "included", "counted", "steps"}``, per member: ``included`` the members a
        mask allowed (None: all), ``counted`` those of them still active; ``steps`` the number of optimiser steps
        taken."""
        m, t = self.module, self.timer
        E, dev = m.members, m.device
        masks = list(masks) if masks is not None else [None] * len(optimizers)
        partial = [k for k in masks if k is not None]
        # None: every member (the plain scheme's case, kept free of mask arithmetic)
        any_mask = None if len(partial) < len(masks) else torch.stack(partial).any(0)
        if t:
            t.lap("data")
        for optimizer in self.optimizers or optimizers:  # every parameter's: a step of some optimisers must not
            optimizer.zero_grad(set_to_none=True)  # leave the others' gradients to add up
        bound = torch.zeros(E, device=dev)
        loss_ok = torch.ones(E, dtype=torch.bool, device=dev)
        enc = torch.zeros(E, dtype=torch.long, device=dev)
        dec = torch.zeros(E, dtype=torch.long, device=dev)
        B = batch["x"].shape[1]
        for mm, pts in self.chunks(batch):
            out = self.chunk_step(take(batch, mm, pts), mm)
            loss = -out.surrogate.sum(1) / B  # (e,): each member's own mean; their sum keeps the gradients apart
            if t:
                t.lap("forward")
            loss.sum().backward()
            if t:
                t.lap("backward")
            bound[mm] += out.bound.detach().sum(1) / B
            loss_ok[mm] &= torch.isfinite(loss.detach())
            enc[mm] += out.passes_encoder
            dec[mm] += out.passes_decoder
        for cb in self.backs:
            cb.on_after_step_backward(self.trainer, m)
        for optimizer, mask in zip(optimizers, masks):
            bad_grad = self._finite_gradients(_raw(optimizer))
            self._guarded_step(optimizer, loss_ok & (bad_grad == 0), loss_ok, bad_grad, mask)
        if t:
            t.lap("optimizer")
        # a frozen (failed) or masked-out member's passes do not count
        counted = m.active if any_mask is None else m.active & any_mask
        m.passes_encoder_total += enc * counted
        m.passes_decoder_total += dec * counted
        m.train_steps_total += counted
        m.train_points_total += B * counted
        self.steps_done += len(optimizers)  # one per optimiser step, as Lightning's global_step counts them
        return {"bound": bound, "enc": enc, "dec": dec, "B": B, "included": any_mask,
                "counted": counted, "steps": len(optimizers)}

    def _finite_gradients(self, optimizer: torch.optim.Optimizer) -> torch.Tensor:
        """(E,) 0 when every gradient entry of each member is finite for the parameters of ``optimizer``, else
        1 + the index (in ``named_parameters``) of the first parameter whose gradient is not (no device sync)."""
        m = self.module
        owned = self._owned.get(id(optimizer))
        if owned is None:  # (index in the module, parameter) of this optimiser's parameters, found once
            own = {id(p) for g in optimizer.param_groups for p in g["params"]}
            owned = self._owned[id(optimizer)] = [(i, p) for i, p in enumerate(m.parameters()) if id(p) in own]
        bad = torch.zeros(m.members, dtype=torch.long, device=m.device)
        for i, p in owned:
            if p.grad is not None:
                bad = torch.where((bad == 0) & ~torch.isfinite(p.grad).flatten(1).all(1), i + 1, bad)
        return bad

    def _guarded_step(self, optimizer, ok: torch.Tensor, loss_ok: torch.Tensor, bad_grad: torch.Tensor,
                      mask: torch.Tensor | None) -> None:
        """The optimiser step for the members with ``ok``, in ``mask`` (None: all) and still active; the others
        keep their parameters and optimiser state (module doc). Records failures (fail) or skips (skip_batch)
        of the members in ``mask``. Returns the members it moved."""
        m = self.module
        keep = ok & m.active if mask is None else ok & m.active & mask
        on_cpu = keep.device.type == "cpu"  # there these reads are free; on a GPU they would sync every step
        if on_cpu and bool(keep.all()):  # the common case
            optimizer.step()
            return
        if mask is None:
            m.record_faults(ok, loss_ok, bad_grad)
        else:
            m.record_faults(ok | ~mask, loss_ok | ~mask, bad_grad)
        raw = _raw(optimizer)
        params = [p for g in raw.param_groups for p in g["params"] if p.grad is not None]
        if on_cpu and not bool(keep.any()):  # no member steps: without gradients the optimiser leaves every
            for p in params:  # parameter and its state (step counter too) as they are; called all the same, so
                p.grad = None  # that the trainer's step count stays the number of steps
            optimizer.step()
            return
        E, state_of = m.members, raw.state
        saved = []
        for p in params:
            state = state_of.get(p, {})
            per_member = {k: v.clone() for k, v in state.items() if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == E}
            saved.append((p, p.detach().clone(), per_member, bool(state)))
            p.grad = torch.nan_to_num(p.grad, nan=0.0, posinf=0.0, neginf=0.0)  # finite arithmetic for the others
        optimizer.step()
        for p, old, per_member, had_state in saved:
            k = keep.view(E, *([1] * (p.dim() - 1)))
            p.data.copy_(torch.where(k, p.data, old))
            for name, v in state_of[p].items():
                if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == E:
                    before = per_member.get(name, torch.zeros_like(v)) if had_state else torch.zeros_like(v)
                    v.copy_(torch.where(keep.view(E, *([1] * (v.dim() - 1))), v, before))

    # -- epochs -----------------------------------------------------------------------------
    def new_epoch(self) -> None:
        """Reset the epoch's on-device accumulators."""
        m = self.module
        zeros = lambda: torch.zeros(m.members, dtype=torch.float64, device=m.device)  # noqa: E731
        self.acc = {"bound": zeros(), "points": zeros(), "enc": zeros(), "dec": zeros(), "steps": zeros()}

    def account(self, stats: dict) -> None:
        """Add a step's numbers (``optimize``'s) to the epoch's means of the members it included, and emit the
        step's metrics whenever the step count passes a multiple of ``log_every_n_steps``."""
        m, acc = self.module, self.acc
        B, included = stats["B"], stats["included"]
        if included is None:  # every member
            acc["bound"] += stats["bound"].double() * B
            acc["points"] += B
            acc["enc"] += stats["enc"]
            acc["dec"] += stats["dec"]
            acc["steps"] += 1
        else:
            included = included.double()
            acc["bound"] += stats["bound"].double() * B * included
            acc["points"] += B * included
            acc["enc"] += stats["enc"] * included
            acc["dec"] += stats["dec"] * included
            acc["steps"] += included
        if self.steps_done // self.every > (self.steps_done - stats["steps"]) // self.every:
            self.emit({"train/bound_step": stats["bound"], **pass_metrics("train", stats, "_step"),
                       "train/passes_encoder_total": m.passes_encoder_total,
                       "train/passes_decoder_total": m.passes_decoder_total})

    def train_epoch(self, data) -> None:
        """One epoch of the method's training scheme (``Method.train_epoch``; by default ``standard_epoch``)."""
        self.new_epoch()
        with flushed_denormals():
            self.module.train_epoch(self, data)
        self.emit_epoch()

    def standard_epoch(self, data) -> None:
        """The plain scheme: one step of every optimiser per batch of the epoch."""
        for batch in self.batches(data.train_batches(extend=self.module.batch_extras)):
            for cb in self.starts:
                cb.on_train_step_start(self.trainer, self.module, batch)
            self.account(self.optimize(batch, self.optimizers))

    def batches(self, batches: Iterable[dict]) -> Iterable[dict]:
        """The batches on the module's device, the time to make them counted as the ``data`` phase."""
        m = self.module
        for batch in batches:
            if m.device.type != "cpu":
                batch = {k: v.to(m.device, non_blocking=True) if torch.is_tensor(v) else v for k, v in batch.items()}
            if self.timer:
                self.timer.lap("data")
            yield batch

    def emit_epoch(self) -> None:
        """The epoch's means, emitted before the epoch's checkpoint is written (so a kill cannot lose them)."""
        acc, m = self.acc, self.module
        if not bool((acc["steps"] > 0).any()):
            return
        steps, points = acc["steps"].clamp_min(1), acc["points"].clamp_min(1)
        self.emit({"train/bound_epoch": acc["bound"] / points,
                   "train/passes_encoder_epoch": acc["enc"] / steps, "train/passes_decoder_epoch": acc["dec"] / steps,
                   "train/passes_per_point_decoder_epoch": acc["dec"] / points,
                   "train/passes_per_point_encoder_decoder_epoch": (acc["enc"] + acc["dec"]) / points})
        if self.trainer is not None and not bool(m.active.any()):  # every member failed: nothing left to train
            self.trainer.should_stop = True

    def emit(self, metrics: dict) -> None:
        """Hand per-member metrics (tensors of shape (E,)) to the callbacks that write them."""
        if self.trainer is None:
            return
        m = self.module
        for cb in self.trainer.callbacks:
            hook = getattr(cb, "on_member_metrics", None)
            if hook is not None:
                hook(self.trainer, m, metrics, self.steps_done, m.current_epoch)

    # -- evaluation passes -------------------------------------------------------------------
    @torch.no_grad()
    def mean_bounds(self, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
        """Mean per-point bound (nats) and mean passes per step of each member over ``batches``, in eval mode:
        ``{"bound", "enc", "dec", "B"}``, tensors of shape (E,) in float64."""
        m = self.module
        was_training = m.training
        m.eval()
        E = m.members
        total = torch.zeros(E, dtype=torch.float64, device=m.device)
        enc = torch.zeros(E, dtype=torch.float64, device=m.device)
        dec = torch.zeros(E, dtype=torch.float64, device=m.device)
        points, steps = 0, 0
        with flushed_denormals():
            for batch in self.batches(batches):
                for mm, pts in self.chunks(batch):
                    out = m.step(take(batch, mm, pts), mm)
                    total[mm] += out.bound.double().sum(1)
                    enc[mm] += out.passes_encoder
                    dec[mm] += out.passes_decoder
                points += batch["x"].shape[1]
                steps += 1
        m.train(was_training)
        return {"bound": total / points, "enc": enc / steps, "dec": dec / steps, "B": points / steps}

    def validate(self, data) -> None:
        """A validation pass: the bound on the validation set, emitted, and each member's best weights kept."""
        m = self.module
        res = self.mean_bounds(data.eval_batches("val", "eval", m.current_epoch, limit=data.limits["val"],
                                                 extend=m.batch_extras))
        self.emit({"val/bound": res["bound"], **pass_metrics("val", res)})
        m.keep_best(res["bound"])


def pass_metrics(split: str, stats: dict, suffix: str = "") -> dict:
    """Forward passes per step and per point (method.md §5, both accountings) of a step's or pass's numbers."""
    B, enc, dec = stats["B"], stats["enc"], stats["dec"]
    return {f"{split}/passes_encoder{suffix}": enc, f"{split}/passes_decoder{suffix}": dec,
            f"{split}/passes_per_point_decoder{suffix}": dec / B,
            f"{split}/passes_per_point_encoder_decoder{suffix}": (enc + dec) / B}
