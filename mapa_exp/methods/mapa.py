"""MAPA, MAPA-GT and MAPA-naive: the bound L_{K,S} (spec Eq 10) with g_phi codes and a fixed proposal.

The three differ only in the proposal the datamodule draws from (``mapa_exp.data.proposals``); the
module is the same. g_phi and f_theta run once per *unique* training index the batch touches
(``x_union``), shared by every point of the batch; each log p(x_n | f(g(x_m))) is then a cheap
likelihood evaluation. The indices carry no parameters, so plain autodiff is unbiased.
"""

from __future__ import annotations

import torch

from mapa_exp.math.bounds import empirical_log_likelihood, mapa_bound
from mapa_exp.methods.base import LatentVariableModule, StepOutput


class MAPA(LatentVariableModule):
    standard_normal_prior = False  # codes g(x) have no parametric prior: the evaluation recovers one

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder = self.net(self.obs_dim, self.latent_dim)  # g_phi: x -> z

    def codes(self, x: torch.Tensor) -> torch.Tensor:
        """z = g_phi(x), (n, Dz)."""
        return self.encoder(x)

    def step(self, batch: dict) -> StepOutput:
        x, K = batch["x"], batch["K"]
        params = self.decoder(self.codes(batch["x_union"]))  # (U, Dx)
        ll = self.log_likelihood(x[:, None, :], params[batch["pos"]])  # (B, K+S)
        bound = mapa_bound(ll[:, :K], ll[:, K:], batch["tail_log_q"], batch["N"])
        U = batch["x_union"].shape[0]
        return StepOutput(bound=bound, surrogate=bound, passes_encoder=U, passes_decoder=U)

    @torch.no_grad()
    def empirical_log_likelihood(self, x: torch.Tensor, x_train: torch.Tensor, chunk: int = 512) -> torch.Tensor:
        """Exact empiricalized log p(x) (Eq 6) of each row of x under the N training codes, (n,)."""
        params = self.decoder(self.codes(x_train))  # (N, Dx)
        return torch.cat([empirical_log_likelihood(self.log_likelihood(c[:, None, :], params[None])) for c in x.split(chunk)])
