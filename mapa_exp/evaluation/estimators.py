"""Estimators of log p(x) behind one interface, and the generative models they score.

A ``GenerativeModel`` is a decoder, a likelihood and a prior (N(0, I), or one recovered from codes).
An estimator's ``evaluate(model, x_fit, xs)`` returns, per split in ``xs``, the per-point log-likelihood
(float64, nats, all constants) and its Monte-Carlo standard error (None when exact), plus diagnostics:

* ``QuadratureEstimator`` -- exact to tolerance for latent dimension <= 2 (``mapa_exp.math.quadrature``);
* ``MogIwaeEstimator`` -- the paper's mixture-of-Gaussians IWAE (``mapa_exp.evaluation.mog_iwae``).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch

from mapa_exp.config import MogIwaeConf, QuadratureConf
from mapa_exp.errors import ConfigError, check
from mapa_exp.evaluation.mog_iwae import ESTIMATORS, fit_mog_iwae, mog_iwae_log_likelihood
from mapa_exp.math.prior_choice import PriorCandidate
from mapa_exp.math.prior_recovery import CopulaPrior1D, MixturePrior, compose_decoder
from mapa_exp.math.quadrature import (MAX_LATENT_DIM, RULES, StandardNormalPrior, convergence_check,
                                     quadrature_log_likelihood)

log = logging.getLogger(__name__)


@dataclass
class GenerativeModel:
    decode: Callable[[torch.Tensor], torch.Tensor]  # (..., Dz) -> likelihood parameters (..., Dx)
    likelihood: object
    latent_dim: int
    prior: object  # StandardNormalPrior | MixturePrior: log_prob, sample, quadrature_grid
    copula: object = None  # the recovered map h (CopulaPrior1D) when decode = f ∘ h


def recovered_model(decoder, likelihood, codes: torch.Tensor, tail_knots: int = 10, n_components: int = 10,
                    seed: int = 0, bins: int | None = None) -> GenerativeModel:
    """A generative model from a decoder and codes without a prior (MAPA, method.md §6).

    Dz = 1: the Gaussian copula map h (smooth through ``bins`` bin means, or interpolating with None),
    giving z^ ~ N(0, 1), x ~ p(x | f(h(z^))); Dz > 1: a Gaussian mixture fitted to the codes as the prior.
    """
    Dz = codes.shape[1]
    if Dz == 1:
        copula = CopulaPrior1D.fit(codes[:, 0].double(), tail_knots=tail_knots, bins=bins)
        decode = compose_decoder(lambda z: decoder(z.to(torch.get_default_dtype())), copula)
        return GenerativeModel(decode, likelihood, 1, StandardNormalPrior(1), copula)
    prior = MixturePrior.fit(codes.double(), n_components=n_components, seed=seed)
    return GenerativeModel(lambda z: decoder(z.to(torch.get_default_dtype())), likelihood, Dz, prior)


def recovered_models(decoder, likelihood, codes, candidates: list[PriorCandidate]) -> dict:
    """Each prior candidate's recovered model (``recovered_model``), by label; a candidate that cannot be fitted
    (e.g. more mixture components than codes) maps to the exception instead."""
    out = {}
    for c in candidates:
        try:
            out[c.label] = recovered_model(decoder, likelihood, codes, **c.kwargs)
        except (ValueError, RuntimeError) as exc:
            out[c.label] = exc
    return out


def standard_model(decoder, likelihood, latent_dim: int) -> GenerativeModel:
    """A model whose prior is N(0, I): the VAE/IWAE baselines and the ground truth."""
    return GenerativeModel(lambda z: decoder(z.to(torch.get_default_dtype())), likelihood, latent_dim,
                           StandardNormalPrior(latent_dim))


Result = dict[str, tuple[torch.Tensor, torch.Tensor | None]]


_QUADRATURE, _MOG = QuadratureConf(), MogIwaeConf()  # the one home of the estimators' defaults (conf/ extends it)


class QuadratureEstimator:
    name = "quadrature"

    def __init__(self, J_1d: int = _QUADRATURE.J_1d, J_2d: int = _QUADRATURE.J_2d, rule: str = _QUADRATURE.rule,
                 check_convergence: bool = _QUADRATURE.check_convergence):
        check(rule in RULES, "evaluator.quadrature.rule", rule, f"must be one of {', '.join(RULES)}")
        for key, J in (("J_1d", J_1d), ("J_2d", J_2d)):
            check(isinstance(J, int) and J >= 2, f"evaluator.quadrature.{key}", J, "must be an integer >= 2")
        self.J = {1: int(J_1d), 2: int(J_2d)}
        self.rule, self.check_convergence = rule, check_convergence

    def config(self) -> dict:
        return {"J": self.J, "rule": self.rule}

    @torch.no_grad()
    def evaluate(self, model: GenerativeModel, x_fit: torch.Tensor, xs: dict[str, torch.Tensor]) -> tuple[Result, dict]:
        if model.latent_dim > MAX_LATENT_DIM:
            raise ConfigError("evaluator", "quadrature", f"needs latent_dim <= {MAX_LATENT_DIM}, the model has "
                              f"latent_dim={model.latent_dim}; use evaluator=mog_iwae")
        J = self.J[model.latent_dim]
        out, gaps = {}, {}
        for split, x in xs.items():
            kw = dict(prior=model.prior, rule=self.rule)
            if self.check_convergence:
                conv = convergence_check(x, model.decode, model.likelihood, J, model.latent_dim, **kw)
                out[split] = (conv.log_px_2J, None)
                gaps[split] = conv.max_abs_diff
            else:
                out[split] = (quadrature_log_likelihood(x, model.decode, model.likelihood, J, model.latent_dim, **kw), None)
        diag = {"J": J}
        if gaps:
            diag["convergence_max_abs_diff"] = max(gaps.values())  # |log p at J - log p at 2J|, worst point
        return out, diag


class MogIwaeEstimator:
    """The paper's evaluator. ``restarts`` q's are fitted on ``x_fit`` (seeds ``seed``, ``seed + 1``, ...; one by
    default), each for ``steps``; with more than one, the one with the highest bound on the validation split
    (``S_select`` samples, the same for every fit) scores every split, and without a validation split the last
    tenth of ``x_fit`` is held out of the fits for that choice. With ``check_every`` > 0 each fit also stops
    early on that split. Scoring uses the defensive mixture (1 − ``defensive``) q + ``defensive`` p(z) as its
    proposal (``mog_iwae_log_likelihood``): on MAPA models over tightly grouped codes about one fit in four
    leaves part of a posterior uncovered, and q alone then scores 0.01-0.04 nats per point low (a second fit
    did not repair that; the prior's stratum does, docs/benchmarks.md). Any proposal gives a valid bound."""
    name = "mog_iwae"

    def __init__(self, n_components: int = _MOG.n_components, S_train: int = _MOG.S_train, S_eval: int = _MOG.S_eval,
                 steps: int = _MOG.steps, restarts: int = _MOG.restarts, S_select: int = _MOG.S_select,
                 batch_size: int = _MOG.batch_size, lr: float = _MOG.lr, estimator: str = _MOG.estimator,
                 seed: int = _MOG.seed, check_every: int = _MOG.check_every, patience: int = _MOG.patience,
                 min_delta: float = _MOG.min_delta, min_steps: int = _MOG.min_steps,
                 defensive: float = _MOG.defensive):
        check(estimator in ESTIMATORS, "evaluator.mog_iwae.estimator", estimator, f"must be one of {', '.join(ESTIMATORS)}")
        for key, value in (("restarts", restarts), ("steps", steps), ("S_select", S_select), ("S_eval", S_eval)):
            check(isinstance(value, int) and value >= 1, f"evaluator.mog_iwae.{key}", value, "must be an integer >= 1")
        check(isinstance(defensive, (int, float)) and 0 <= defensive < 1 and (defensive == 0 or defensive * S_eval >= 1),
              "evaluator.mog_iwae.defensive", defensive, "must be 0 (off) or in (0, 1) with at least 2 prior samples")
        self.kw = dict(n_components=n_components, S_train=S_train, steps=steps, batch_size=batch_size, lr=lr,
                       estimator=estimator)
        self.stopping = (dict(check_every=check_every, patience=patience, min_delta=min_delta, min_steps=min_steps)
                         if check_every else {})
        self.S_eval, self.seed, self.restarts, self.S_select = S_eval, seed, int(restarts), int(S_select)
        self.defensive = float(defensive)

    def config(self) -> dict:
        return {**self.kw, "seed": self.seed, "S_eval": self.S_eval, "defensive": self.defensive,
                **({"restarts": self.restarts, "S_select": self.S_select} if self.restarts > 1 else {}),
                **({"stopping": self.stopping} if self.stopping else {})}

    def score(self, model: GenerativeModel, q_net, x: torch.Tensor, S: int):
        """The stratified IWAE_S of x under q (with the prior's stratum when ``defensive`` > 0)."""
        defensive = self.defensive if self.defensive * S >= 1 else 0.0
        return mog_iwae_log_likelihood(x, q_net, model.decode, model.likelihood, S_eval=S, seed=self.seed,
                                       log_prior=model.prior.log_prob, defensive=defensive,
                                       sample_prior=None if isinstance(model.prior, StandardNormalPrior)
                                       else lambda n, g: model.prior.sample(n, generator=g))  # None: N(0, I) on x's device

    def evaluate(self, model: GenerativeModel, x_fit: torch.Tensor, xs: dict[str, torch.Tensor]) -> tuple[Result, dict]:
        x_held = None
        if self.stopping or self.restarts > 1:
            if "val" in xs:
                x_held = xs["val"]
            else:
                n_held = max(1, x_fit.shape[0] // 10)
                x_fit, x_held = x_fit[:-n_held], x_fit[-n_held:]
        stop = dict(self.stopping, x_stop=x_held) if self.stopping else {}
        fits, held = [], []
        for r in range(self.restarts):
            if self.restarts > 1:
                log.info("mixture IWAE: fit %d of %d", r + 1, self.restarts)
            fit = fit_mog_iwae(x_fit, model.decode, model.likelihood, model.latent_dim, log_prior=model.prior.log_prob,
                               seed=self.seed + r, **self.kw, **stop)
            fits.append(fit)
            if self.restarts > 1:  # the same samples for every restart: the scores differ by q alone
                held.append(float(self.score(model, fit.q_net, x_held, self.S_select).log_px.mean()))
        best = max(range(self.restarts), key=lambda r: held[r]) if held else 0
        fit = fits[best]
        if held:
            log.info("mixture IWAE: held-out bounds of the fits %s nats per point; fit %d chosen",
                     ", ".join(f"{v:.4f}" for v in held), best + 1)
        out = {}
        for split, x in xs.items():
            log.info("mixture IWAE: scoring %d %s points with S_eval=%d", x.shape[0], split, self.S_eval)
            est = self.score(model, fit.q_net, x, self.S_eval)
            out[split] = (est.log_px, est.std_err)
        diag = {"fit_steps": int(fit.train_bound.shape[0])}
        if held:
            diag.update(fit_restart=best, fit_restart_held_out=held)
        if fit.best_step is not None:
            diag["fit_best_step"] = fit.best_step
        return out, {**diag, "final_train_bound": float(fit.train_bound[-50:].mean())}
