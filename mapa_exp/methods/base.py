"""What a method is: the one seam through which every method (and a user's own) enters the framework.

A method trains E *members* at once -- runs of one configuration that differ in ``seed`` (and, through the
datamodule, in ``dataset.draw``); a lone run is a stack of one. Every network is a stacked ``MLP`` (one
(E, P) parameter per network), the loss is the *sum* over members of each member's mean surrogate, and the
optimisers are element-wise, so each member gets exactly the gradient and the update it would get alone.

A method subclasses ``Method`` and says *what* it computes; the stacked step loop
(``mapa_exp.methods.loop.StackedLoop``) owns *how* it is trained. What a method declares:

* ``step(batch, members) -> StepOutput`` (required): for the members in the slice ``members`` (a batch's
  tensors are stacked along dim 0), the per-point bound (a log-likelihood bound in nats, all constants
  kept), the per-point surrogate whose gradient is the estimator, and each member's forward passes;
* ``rows_per_member(batch)`` (required): the network rows one member's step runs (chooses the chunks);
* ``batch_extras(split, idx, gens, data)``: what its batches carry beyond ``x`` and ``index`` -- the VAE's
  noise, MAPA's candidates -- drawn from each member's own generators (``None`` for a member that must not
  draw); ``setup_data(data)``: anything it precomputes from the data before training (MAPA's proposal);
* ``optimizer_groups()``: its parameter groups, one optimiser each (default: one group, every parameter);
* ``train_epoch(loop, data)``: its training scheme (default: one step of every optimiser per batch);
* ``standard_normal_prior``, ``codes`` / ``generative_decoder``: what the evaluation needs of its model;
* ``proposal_density(x, e, data)``: what it proposes for the latent of a few points, for the dashboards'
  posterior picture;
* ``identity_keys``: the config keys a results table shows for it (the run's identity is its whole config).

Each member's best validation bound, its epoch and its weights at that epoch are kept here (``keep_best``),
for its ``checkpoints/best.ckpt``; the per-member counters travel with the checkpoint.

Logged names (per member): ``train/bound_step`` (every ``log_every_n_steps``), ``train/bound_epoch``,
``val/bound`` (nats per point), ``{train,val}/passes_encoder`` and ``/passes_decoder`` (per step),
``/passes_per_point_decoder`` (the decoder-dominated accounting, method.md §5) and
``/passes_per_point_encoder_decoder`` (encoder ~ decoder), and the running totals
``train/passes_encoder_total`` and ``train/passes_decoder_total``; ``trainer/global_step`` and ``epoch``.
"""

from __future__ import annotations

import os
import shutil
from abc import ABC, abstractmethod
from typing import Callable, Iterable, Sequence

import lightning as L
import torch

from mapa_exp.errors import ConfigError, check
from mapa_exp.methods.loop import StackedLoop, StepOutput  # noqa: F401  (StepOutput: what step returns)
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


class Method(L.LightningModule, ABC):
    #: True when the model's prior is N(0, I); False when it must be recovered from codes (method.md §6)
    standard_normal_prior = True
    #: whether a step's points may be split into chunks (each point's bound independent of the others'); the
    #: MAPA family shares one union of candidates across a batch's points, so it cannot
    split_points = False
    #: the config keys (below ``method.``) a results table names the method's configuration by
    identity_keys: tuple[str, ...] = ("S",)

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
        self.automatic_optimization = False  # the loop runs an epoch's steps itself (mapa_exp.methods.loop)
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

    # -- what a method computes ---------------------------------------------------------------
    @abstractmethod
    def step(self, batch: dict, members: slice) -> StepOutput:
        """The method's bound, surrogate and forward passes on one batch, for the members in ``members``."""

    @abstractmethod
    def rows_per_member(self, batch: dict) -> int:
        """How many network rows one member's step runs (chooses the member chunks)."""

    def batch_extras(self, split: str, idx: torch.Tensor, gens: Sequence[torch.Generator | None], data) -> dict:
        """What a batch of the points ``idx`` (E, b) of ``split`` carries beyond ``x`` and ``index``, drawn from
        member e's generator ``gens[e]`` (None: member e draws nothing, e.g. masked out of a step)."""
        return {}

    def setup_data(self, data) -> None:
        """Precompute from the data module what the batches need (called once before training)."""

    def optimizer_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        """The parameter groups, one optimiser each (``configure_optimizers``), in the loop's order."""
        return {"all": list(self.parameters())}

    def train_epoch(self, loop: StackedLoop, data) -> None:
        """One epoch of this method's training scheme (the loop's ``optimize`` is its step)."""
        loop.standard_epoch(data)

    def proposal_density(self, x: torch.Tensor, e: int, data) -> dict | None:
        """What the method proposes for the latents of the points ``x`` (n, Dx), for the posterior picture:
        ``{"z": (n, G) or (G,), "log_density": (n, G), "label": str, "kind": "density" | "points"}``, or None."""
        return None

    def log_likelihood(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return self.likelihood.log_prob(x, params)

    def generative_decoder(self, e: int = 0) -> torch.nn.Module:
        """Member e's decoder f_theta as a plain network (..., Dz) -> (..., Dx)."""
        return self.decoder.member(e)

    def forward(self, batch: dict, members: slice | None = None) -> StepOutput:
        """The method's ``step`` (``members=None``: every member of this module's parameters)."""
        return self.step(batch, members)

    # -- what the loop keeps per member --------------------------------------------------------
    def record_faults(self, ok: torch.Tensor, loss_ok: torch.Tensor, bad_grad: torch.Tensor) -> None:
        """Under ``fail`` freeze the active members without ``ok`` and note when and what; under ``skip_batch``
        count the skipped step."""
        bad = ~ok & self.active
        if self.nan_policy == "fail":
            steps = self.__dict__.get("_loop")
            self.failed_step.copy_(torch.where(bad, steps.steps_done if steps else 0, self.failed_step))
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

    @torch.no_grad()
    def keep_best(self, val_bound: torch.Tensor) -> None:
        """Each active member whose validation bound improved keeps its current parameters as its best."""
        improved = (val_bound > self.best_val_bound) & self.active  # a NaN never improves
        self.best_val_bound.copy_(torch.where(improved, val_bound, self.best_val_bound))
        self.best_epoch.copy_(torch.where(improved, self.current_epoch, self.best_epoch))
        for name in self._selected_nets:
            best = getattr(self, f"best_{name}")
            best.copy_(torch.where(improved[:, None], getattr(self, name).params, best))

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

    # -- Lightning: one pass is one "batch", whose steps the loop runs -------------------------
    def configure_optimizers(self):
        optimizers = [self.optimizer_factory(params) for params in self.optimizer_groups().values()]
        return optimizers[0] if len(optimizers) == 1 else optimizers

    def setup(self, stage: str) -> None:
        if stage == "fit" and self.trainer is not None and self.trainer.datamodule is not None:
            self.setup_data(self.trainer.datamodule)

    def _the_loop(self) -> StackedLoop:
        loop = self.__dict__.get("_loop")  # kept out of the module's attributes and state
        if loop is None:
            loop = self.__dict__["_loop"] = StackedLoop(self, self.trainer)
        return loop

    def on_train_start(self) -> None:
        self.__dict__.pop("_loop", None)  # counts from the trainer's step (a resumed run's included)
        self._the_loop()

    def training_step(self, _one_pass, _index) -> None:
        self._the_loop().train_epoch(self.trainer.datamodule)

    def validation_step(self, _one_pass, _index) -> None:
        self._the_loop().validate(self.trainer.datamodule)

    @torch.no_grad()
    def mean_bounds(self, batches: Iterable[dict]) -> dict[str, torch.Tensor]:
        """Mean per-point bound and passes of each member over ``batches`` (``StackedLoop.mean_bounds``)."""
        return StackedLoop(self, None, optimizers=[]).mean_bounds(batches)
