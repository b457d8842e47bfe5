"""MAPA, MAPA-GT and MAPA-naive: the bound L_{K,S} (method.md Eq 10) with g_phi codes and a fixed proposal.

The three differ only in the proposal the datamodule draws from (``mapa_exp.data.proposals``); the
module is the same. g_phi and f_theta run once per *unique* training index each member's batch touches
(``x_union``, zero-padded to the largest member's count), shared by every point of that batch; each
log p(x_n | f(g(x_m))) is then a cheap likelihood evaluation. The indices carry no parameters, so plain
autodiff is unbiased.
"""

from __future__ import annotations

import torch

from mapa_exp.math.bounds import mapa_bound
from mapa_exp.methods.base import LatentVariableModule, StepOutput


class MAPA(LatentVariableModule):
    standard_normal_prior = False  # codes g(x) have no parametric prior: the evaluation recovers one
    noise_shape = None  # all of its randomness is in the proposal's tail samples

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.encoder = self.make_net(self.obs_dim, self.latent_dim, "encoder")  # g_phi: x -> z

    def codes(self, x: torch.Tensor, e: int = 0) -> torch.Tensor:
        """Member e's codes z = g_phi(x), (..., Dz)."""
        return self.encoder.member(e)(x)

    def rows_per_member(self, batch: dict) -> int:
        return 2 * batch["x_union"].shape[1]

    def step(self, batch: dict, members: slice) -> StepOutput:
        x, pos, K = batch["x"], batch["pos"], batch["K"]  # (e, B, Dx), (e, B, K+S)
        params = self.decoder(self.encoder(batch["x_union"], members), members)  # (e, U, Dx)
        e, B, C = pos.shape
        picked = params.gather(1, pos.reshape(e, B * C, 1).expand(-1, -1, params.shape[-1])).view(e, B, C, -1)
        ll = self.log_likelihood(x[:, :, None, :], picked)  # (e, B, K+S)
        bound = mapa_bound(ll[..., :K], ll[..., K:], batch["tail_log_q"], batch["N"])
        return StepOutput(bound=bound, surrogate=bound, passes_encoder=batch["U"], passes_decoder=batch["U"])
