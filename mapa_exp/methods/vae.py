"""VAE and IWAE: a mean-field Gaussian encoder q(z|x) with S importance samples (spec §1).

One module, two objectives: ``elbo`` (the VAE with S samples, averaged) and ``iwae`` (IWAE_S), and
three gradient estimators for the encoder: ``standard``, ``stl`` and ``dreg``.
"""

from __future__ import annotations

from mapa_exp.errors import check
from mapa_exp.math.bounds import ESTIMATORS, elbo, iwae_bound, iwae_surrogate, log_weights_gaussian_q
from mapa_exp.methods.base import LatentVariableModule, StepOutput

OBJECTIVES = ("elbo", "iwae")


class GaussianEncoderVAE(LatentVariableModule):
    def __init__(self, *args, S: int = 1, objective: str = "elbo", estimator: str = "standard", **kwargs):
        check(isinstance(S, int) and S >= 1, "method.S", S, "must be an integer >= 1 for a VAE or IWAE")
        check(objective in OBJECTIVES, "method.objective", objective, f"must be one of {OBJECTIVES}")
        check(estimator in ESTIMATORS, "method.estimator", estimator, f"must be one of {ESTIMATORS}")
        super().__init__(*args, **kwargs)
        self.S, self.objective, self.estimator = S, objective, estimator
        self.encoder = self.net(self.obs_dim, 2 * self.latent_dim)

    def encode(self, x):
        """q(z|x): mean and log-variance, each (B, Dz)."""
        mean, logvar = self.encoder(x).chunk(2, dim=-1)
        return mean, logvar

    def step(self, batch: dict) -> StepOutput:
        x = batch["x"]
        mean, logvar = self.encode(x)
        estimator = self.estimator if self.training else "standard"
        log_w, z = log_weights_gaussian_q(x, mean, logvar, self.decoder, self.log_likelihood, self.S, estimator)
        if self.objective == "elbo":
            bound = elbo(log_w)
            surrogate = bound
        else:
            bound = iwae_bound(log_w)
            surrogate = iwae_surrogate(log_w, z, estimator) if self.training else bound
        B = x.shape[0]
        return StepOutput(bound=bound, surrogate=surrogate, passes_encoder=B, passes_decoder=B * self.S)
