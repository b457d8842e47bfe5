"""MAPA, MAPA-GT and MAPA-naive: the bound L_{K,S} (method.md Eq 10) with g_phi codes and a fixed proposal.

The three differ only in their proposal over training indices (``mapa_exp.methods.proposals``: the kernel q of
Eq 8, the true index posterior of Eq 7, uniform), given in the module's config; the module is the same. Before
training it turns the proposal's rows of every draw into tables (``setup_data``: from the datamodule's cached
proximity structure, built on first use); each batch then carries its candidates (``batch_extras``): the
top-K set and S tail samples per point, drawn from each member's own generator, and their union. g_phi and
f_theta run once per *unique* training index each member's batch touches (``x_union``, zero-padded to the
largest member's count), shared by every point of that batch; each log p(x_n | f(g(x_m))) is then a cheap
likelihood evaluation. The indices carry no parameters, so plain autodiff is unbiased.
"""

from __future__ import annotations

import torch

from mapa_exp.errors import check
from mapa_exp.math.bounds import mapa_bound
from mapa_exp.methods.base import Method, StepOutput
from mapa_exp.methods.proposals import Proposal, ProposalContext, ProposalTables, candidate_batch

SPLITS = ("train", "val")  # the splits a training run draws candidates for


class MAPA(Method):
    standard_normal_prior = False  # codes g(x) have no parametric prior: the evaluation recovers one
    identity_keys = ("K", "S")

    def __init__(self, *args, proposal: Proposal | None = None, **kwargs):
        """``proposal``: q over training indices (config ``method.module.proposal``); an evaluation, which
        draws no candidates, may leave it out."""
        super().__init__(*args, **kwargs)
        self.proposal = proposal
        self.encoder = self.make_net(self.obs_dim, self.latent_dim, "encoder")  # g_phi: x -> z
        self.tables: dict[str, ProposalTables] = {}

    def codes(self, x: torch.Tensor, e: int = 0) -> torch.Tensor:
        """Member e's codes z = g_phi(x), (..., Dz)."""
        return self.encoder.member(e)(x)

    def _contexts(self, data) -> list[ProposalContext]:
        """What the proposal may look at, per draw: its data, truth and (lazily) proximity structure."""
        out = []
        for i in range(len(data.draws)):
            x = {s: data.xs[s][i] for s in data.xs}
            z_train = data.zs["train"][i] if data.zs["train"] is not None else None
            out.append(ProposalContext(data.draw_truth(i), x, z_train, lambda split, i=i: data.proximity(i, split)))
        return out

    def setup_data(self, data) -> None:
        """The proposal's tables of the training and validation points of every draw (before any training)."""
        check(self.proposal is not None, "method.module.proposal", None, "a MAPA-family method trains with a proposal")
        self.proposal.check_data(data.groundtruth)
        contexts = self._contexts(data)
        self.tables = {split: ProposalTables([self.proposal.rows(ctx, split) for ctx in contexts], self.proposal.K)
                       for split in SPLITS}

    def batch_extras(self, split, idx, gens, data) -> dict:
        """The candidates of the points ``idx`` (``mapa_exp.methods.proposals.candidate_batch``)."""
        if not self.tables:
            self.setup_data(data)
        p = self.proposal
        return candidate_batch(self.tables[split], data.xs["train"], data.member_draw, idx, gens, p.K, p.S,
                               p.uniform_share)

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

    def proposal_density(self, x, e, data) -> dict | None:
        """q(m | x) over member e's training codes (Eq 8, Eq 7 or uniform), for the posterior picture."""
        if self.proposal is None or self.latent_dim != 1:
            return None
        i = int(data.member_draw[e])
        log_q = self.proposal.log_q_of(self._contexts(data)[i], x)  # (n, N)
        with torch.no_grad():
            codes = self.codes(data.xs["train"][i], e)[:, 0]
        return {"z": codes, "log_density": log_q, "label": f"{type(self.proposal).__name__} q(m|x) at codes",
                "kind": "points"}
