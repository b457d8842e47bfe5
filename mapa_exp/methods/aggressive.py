"""Aggressive inference-network training (He, Spokoyny, Neubig and Berg-Kirkpatrick, "Lagging inference networks
and posterior collapse in variational autoencoders", ICLR 2019): the VAE of ``mapa_exp.methods.vae`` (the ELBO
averaged over S samples, a mean-field Gaussian q) trained by an iterative scheme, the remedy for a lagging
encoder that the MAPA paper's introduction argues is slow.

The scheme (their Algorithm 1, with their code's stopping rules), per member:

* while the member is *aggressive*, before each decoder update it updates only the encoder, on fresh
  minibatches drawn with replacement from the training set (from the member's own data stream), until the
  encoder's objective stops improving: every ``inner_check_every`` encoder steps the mean loss of that window
  is compared with the previous window's, and no decrease (or ``inner_max`` steps) ends the inner loop; then
  one decoder step (the decoder only) on the epoch's batch;
* a member that is no longer aggressive trains as the plain VAE: encoder and decoder on each batch;
* at each epoch's end an aggressive member estimates the mutual information I_q(x; z) of its encoder on the
  validation set (``mapa_exp.math.bounds.mutual_information_gaussian_q``, one sample per point from the
  member's ``eval`` stream); when it fell since the last epoch, the member leaves the aggressive phase.

The members of a stack step unequally (their inner loops end at different steps), so the two optimisers are
``StackedAdam`` (per-member step counts) with the run's Adam settings, and a member that is out of a step
draws nothing for it: each member's numbers equal the same run trained alone. Every optimiser step counts as a
training step (and its forward passes count), inner encoder steps included: the cost of the scheme is what
the forward-pass counters and the wall time report. ``train/bound_epoch`` is the mean over all of them.
"""

from __future__ import annotations

import torch

from mapa_exp.errors import check
from mapa_exp.math.bounds import mutual_information_gaussian_q
from mapa_exp.methods.optim import stacked_adam_from
from mapa_exp.methods.vae import GaussianEncoderVAE
from mapa_exp.seeding import generators


class AggressiveVAE(GaussianEncoderVAE):
    def __init__(self, *args, inner_max: int = 100, inner_check_every: int = 15, **kwargs):
        check(isinstance(inner_max, int) and inner_max >= 1, "method.inner_max", inner_max, "must be an integer >= 1")
        check(isinstance(inner_check_every, int) and 1 <= inner_check_every <= inner_max, "method.inner_check_every",
              inner_check_every, "must be an integer in [1, method.inner_max]")
        super().__init__(*args, **kwargs)
        self.inner_max, self.inner_check_every = inner_max, inner_check_every
        E = self.members
        self.register_buffer("aggressive", torch.ones(E, dtype=torch.bool))  # in the aggressive phase
        self.register_buffer("last_mi", torch.full((E,), -torch.inf, dtype=torch.float64))
        self.register_buffer("inner_steps_total", torch.zeros(E, dtype=torch.long))

    def optimizer_groups(self) -> dict[str, list[torch.nn.Parameter]]:
        return {"encoder": list(self.encoder.parameters()), "decoder": list(self.decoder.parameters())}

    def configure_optimizers(self):
        adam = stacked_adam_from(self.optimizer_factory)  # per-member step counts: members step unequally
        return [adam(params) for params in self.optimizer_groups().values()]

    def train_epoch(self, loop, data) -> None:
        encoder, decoder = loop.optimizers
        for batch in loop.batches(data.train_batches(extend=self.batch_extras)):
            for cb in loop.starts:
                cb.on_train_step_start(loop.trainer, self, batch)
            if bool((self.aggressive & self.active).any()):
                self._encoder_until_converged(loop, data, encoder)
            plain = ~self.aggressive  # out of the aggressive phase: the encoder steps with the decoder
            loop.account(loop.optimize(batch, [encoder, decoder], masks=[plain, None]))
        self._leave_when_information_falls(data)

    def _encoder_until_converged(self, loop, data, encoder) -> None:
        """The inner loop: encoder steps on random minibatches until each aggressive member's loss stops
        decreasing (module doc)."""
        E, n, B = self.members, data.xs["train"].shape[1], data.batch_size
        inner = self.aggressive & self.active
        previous = torch.full((E,), torch.inf, dtype=torch.float64)
        window, count = torch.zeros(E, dtype=torch.float64), 0
        for _ in range(self.inner_max):
            if not bool(inner.any()):
                break
            gens = [g if on else None for g, on in zip(data.data_generators, inner.tolist())]
            idx = torch.stack([torch.randint(n, (B,), generator=g) if g is not None else torch.zeros(B, dtype=torch.long)
                               for g in gens])  # (E, B): with replacement, as He et al. draw their batches
            stats = loop.optimize(data.batch("train", idx, gens, self.batch_extras), [encoder], masks=[inner])
            loop.account(stats)
            self.inner_steps_total += inner
            window -= stats["bound"].double() * inner  # the loss, before this step's update
            count += 1
            if count == self.inner_check_every:
                mean = window / count
                inner &= ~(mean >= previous)  # no decrease over the window: converged
                previous = torch.where(inner, mean, previous)
                window.zero_()
                count = 0

    @torch.no_grad()
    def _leave_when_information_falls(self, data) -> None:
        """Each aggressive member's I_q(x; z) on the validation set; a fall since the last epoch ends its phase."""
        if not bool(self.aggressive.any()):
            return
        x = torch.stack([data.member_x("val", e) for e in range(self.members)])  # (E, n, Dx)
        mean, logvar = self.encoder(x).chunk(2, dim=-1)  # (E, n, Dz) each
        gens = generators(self.seeds, "eval", self.current_epoch, "mutual_information")
        eps = torch.stack([torch.randn(mean.shape[1:], generator=g) for g in gens]).to(mean)
        mi = mutual_information_gaussian_q(mean.double(), logvar.double(), eps.double())  # (E,)
        fell = self.aggressive & (mi < self.last_mi)
        self.last_mi.copy_(torch.where(self.aggressive, mi, self.last_mi))
        self.aggressive &= ~fell

    def forward_pass_summary(self, e: int = 0) -> dict:
        return {**super().forward_pass_summary(e), "inner_steps": int(self.inner_steps_total[e]),
                "aggressive_at_end": bool(self.aggressive[e])}
