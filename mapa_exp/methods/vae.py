"""VAE and IWAE: a mean-field Gaussian encoder q(z|x) with S importance samples (method.md §1).

One module, two objectives: ``elbo`` (the VAE with S samples, averaged) and ``iwae`` (IWAE_S), and
three gradient estimators for the encoder: ``standard``, ``stl`` and ``dreg``. The reparameterisation
noise comes with the batch (``eps``, ``batch_extras``: drawn from each member's own data stream).
"""

from __future__ import annotations

import math

import torch

from mapa_exp.errors import check
from mapa_exp.math.bounds import ESTIMATORS, elbo, iwae_bound, iwae_surrogate, log_weights_gaussian_q
from mapa_exp.methods.base import Method, StepOutput

OBJECTIVES = ("elbo", "iwae")


class GaussianEncoderVAE(Method):
    split_points = True  # each point's bound is its own

    def __init__(self, *args, S: int = 1, objective: str = "elbo", estimator: str = "standard", **kwargs):
        check(isinstance(S, int) and S >= 1, "method.S", S, "must be an integer >= 1 for a VAE or IWAE")
        check(objective in OBJECTIVES, "method.objective", objective, f"must be one of {OBJECTIVES}")
        check(estimator in ESTIMATORS, "method.estimator", estimator, f"must be one of {ESTIMATORS}")
        super().__init__(*args, **kwargs)
        self.S, self.objective, self.estimator = S, objective, estimator
        self.encoder = self.make_net(self.obs_dim, 2 * self.latent_dim, "encoder")

    def batch_extras(self, split, idx, gens, data) -> dict:
        """``eps`` (E, b, S, Dz): the standard normal reparameterisation noise of each point, member e's from its
        own generator (zeros for a member that draws nothing)."""
        b, shape = idx.shape[1], (idx.shape[1], self.S, self.latent_dim)
        return {"eps": torch.stack([torch.randn(shape, generator=g) if g is not None else torch.zeros(shape)
                                    for g in gens])}

    def proposal_density(self, x, e, data) -> dict:
        """q(z|x) of member e's encoder, on a grid of z (Dz = 1)."""
        if self.latent_dim != 1:
            return None
        with torch.no_grad():
            mean, logvar = self.encode(x, e)
        z = torch.linspace(-4, 4, 801, dtype=mean.dtype)
        log_q = -0.5 * ((z[None, :] - mean) ** 2 / logvar.exp() + logvar + math.log(2 * math.pi))  # (n, G)
        return {"z": z, "log_density": log_q, "label": "encoder q(z|x)", "kind": "density"}

    def encode(self, x: torch.Tensor, e: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        """Member e's q(z|x): mean and log-variance, each (..., Dz)."""
        mean, logvar = self.encoder.member(e)(x).chunk(2, dim=-1)
        return mean, logvar

    def rows_per_member(self, batch: dict) -> int:
        B = batch["x"].shape[1]
        return B * (self.S + 1)

    def step(self, batch: dict, members: slice) -> StepOutput:
        x = batch["x"]  # (e, B, Dx)
        mean, logvar = self.encoder(x, members).chunk(2, dim=-1)  # (e, B, Dz) each
        estimator = self.estimator if self.training else "standard"
        log_w, z = log_weights_gaussian_q(x, mean, logvar, lambda z: self.decoder(z, members), self.log_likelihood,
                                          estimator=estimator, eps=batch["eps"])  # (e, B, S), (e, B, S, Dz)
        if self.objective == "elbo":
            bound = elbo(log_w)
            surrogate = bound
        else:
            bound = iwae_bound(log_w)
            surrogate = iwae_surrogate(log_w, z, estimator) if self.training else bound
        B = x.shape[1]
        return StepOutput(bound=bound, surrogate=surrogate, passes_encoder=B, passes_decoder=B * self.S)
