"""The shared shell of every method: decoder, likelihood, optimiser, logging of bounds and forward passes.

A method subclasses ``LatentVariableModule`` and implements ``step(batch) -> StepOutput``: the
per-point bound (a log-likelihood bound in nats, all constants kept), the per-point surrogate whose
gradient is the estimator, and the forward passes of each network in that step. Everything else
(losses, logging under the same names for every method, pass counters saved in the checkpoint) lives
here once.

Logged names: ``{train,val}/bound`` (nats per point), ``{train,val}/passes_encoder`` and
``/passes_decoder`` (per step), ``{train,val}/passes_per_point_decoder`` (the decoder-dominated
accounting, spec §5) and ``/passes_per_point_encoder_decoder`` (encoder ~ decoder), and the running
totals ``train/passes_encoder_total`` and ``train/passes_decoder_total``.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable

import lightning as L
import torch

from mapa_exp.errors import ConfigError, check
from mapa_exp.nets import MLP


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


@dataclass
class StepOutput:
    bound: torch.Tensor  # (B,) lower bound on log p(x_n), nats
    surrogate: torch.Tensor  # (B,) its gradient is the estimator's
    passes_encoder: int
    passes_decoder: int


class LatentVariableModule(L.LightningModule, ABC):
    #: True when the model's prior is N(0, I); False when it must be recovered from codes (spec §6)
    standard_normal_prior = True

    def __init__(
        self,
        latent_dim: int,
        obs_dim: int,
        likelihood,
        net: Callable[..., torch.nn.Module] | None = None,
        optimizer: Callable[..., torch.optim.Optimizer] | None = None,
    ):
        super().__init__()
        self.latent_dim, self.obs_dim, self.likelihood = latent_dim, obs_dim, likelihood
        self.net = net or MLP
        self.optimizer_factory = optimizer or (lambda params: torch.optim.Adam(params, lr=1e-3))
        _check_optimizer(self.optimizer_factory)
        self.decoder = self.net(latent_dim, obs_dim)
        # running totals travel with the checkpoint, so a resumed run keeps counting
        self.register_buffer("passes_encoder_total", torch.zeros((), dtype=torch.long))
        self.register_buffer("passes_decoder_total", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_steps_total", torch.zeros((), dtype=torch.long))
        self.register_buffer("train_points_total", torch.zeros((), dtype=torch.long))

    @abstractmethod
    def step(self, batch: dict) -> StepOutput:
        """The method's bound, surrogate and forward passes on one batch."""

    def log_likelihood(self, x: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
        return self.likelihood.log_prob(x, params)

    # -- Lightning hooks -----------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        out = self.step(batch)
        B = out.bound.shape[0]
        self.passes_encoder_total += out.passes_encoder
        self.passes_decoder_total += out.passes_decoder
        self.train_steps_total += 1
        self.train_points_total += B
        self._log_step("train", out, B)
        self.log("train/passes_encoder_total", self.passes_encoder_total.float(), on_step=True, on_epoch=False)
        self.log("train/passes_decoder_total", self.passes_decoder_total.float(), on_step=True, on_epoch=False)
        return -out.surrogate.mean()

    def validation_step(self, batch: dict, batch_idx: int) -> None:
        out = self.step(batch)
        self._log_step("val", out, out.bound.shape[0])

    def _log_step(self, split: str, out: StepOutput, B: int) -> None:
        on_step = split == "train"
        kw = dict(on_step=on_step, on_epoch=True, batch_size=B)
        self.log(f"{split}/bound", out.bound.mean(), prog_bar=True, **kw)
        self.log(f"{split}/passes_encoder", float(out.passes_encoder), **kw)
        self.log(f"{split}/passes_decoder", float(out.passes_decoder), **kw)
        self.log(f"{split}/passes_per_point_decoder", out.passes_decoder / B, **kw)
        self.log(f"{split}/passes_per_point_encoder_decoder", (out.passes_encoder + out.passes_decoder) / B, **kw)

    def configure_optimizers(self):
        return self.optimizer_factory(self.parameters())

    def forward_pass_summary(self) -> dict:
        """Totals and per-point-per-step averages of the training forward passes so far."""
        steps = max(int(self.train_steps_total), 1)
        points = max(int(self.train_points_total), 1)
        enc, dec = int(self.passes_encoder_total), int(self.passes_decoder_total)
        return {
            "passes_encoder_total": enc,
            "passes_decoder_total": dec,
            "train_steps": int(self.train_steps_total),
            # per point per step: total passes / total points processed
            "passes_per_point_encoder": enc / points,
            "passes_per_point_decoder": dec / points,
            "passes_per_point_encoder_decoder": (enc + dec) / points,
            "passes_per_step_encoder": enc / steps,
            "passes_per_step_decoder": dec / steps,
        }
