"""A method that lives only in the tests: proof that a method is one module plus one config file.

``python train.py --config-dir tests/toy_method/conf method=toy`` (with this folder on PYTHONPATH) trains it;
nothing in the package names it. q(z|x) = N(g(x), sd^2 I) with a fixed sd, the ELBO with one sample.
"""

from __future__ import annotations

import math

import torch

from mapa_exp.math.bounds import elbo, log_weights_gaussian_q
from mapa_exp.methods.base import Method, StepOutput


class FixedVarianceVAE(Method):
    split_points = True

    def __init__(self, *args, sd: float = 0.1, **kwargs):
        super().__init__(*args, **kwargs)
        self.sd = float(sd)
        self.encoder = self.make_net(self.obs_dim, self.latent_dim, "encoder")

    def batch_extras(self, split, idx, gens, data) -> dict:
        shape = (idx.shape[1], 1, self.latent_dim)
        return {"eps": torch.stack([torch.randn(shape, generator=g) if g is not None else torch.zeros(shape)
                                    for g in gens])}

    def rows_per_member(self, batch: dict) -> int:
        return 2 * batch["x"].shape[1]

    def step(self, batch: dict, members: slice) -> StepOutput:
        x = batch["x"]  # (e, B, Dx)
        mean = self.encoder(x, members)
        logvar = torch.full_like(mean, 2 * math.log(self.sd))
        log_w, _ = log_weights_gaussian_q(x, mean, logvar, lambda z: self.decoder(z, members), self.log_likelihood,
                                          eps=batch["eps"])
        bound = elbo(log_w)
        return StepOutput(bound=bound, surrogate=bound, passes_encoder=x.shape[1], passes_decoder=x.shape[1])
