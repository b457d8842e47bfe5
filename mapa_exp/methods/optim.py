"""Adam with one step counter per member of a stack, for training schemes that step members unequally.

``torch.optim.Adam`` keeps one step counter per parameter tensor. A stacked parameter (E, ...) holds E members,
so when a scheme updates only some members (an inner loop that stops earlier for one member than for
another), the shared counter would run ahead of a member's own number of updates and its bias correction
would differ from the same run trained alone. ``StackedAdam`` keeps the counter per member (an (E,) tensor in
each parameter's state, so the step loop's per-member restore and the checkpoint's member slices cover it) and
is otherwise Adam (Kingma & Ba 2015, as torch implements it without weight decay or amsgrad):

    m <- b1 m + (1 - b1) g,   v <- b2 v + (1 - b2) g^2,   t <- t + 1
    p <- p - lr * (m / (1 - b1^t)) / (sqrt(v / (1 - b2^t)) + eps)
"""

from __future__ import annotations

import torch

from mapa_exp.errors import check


class StackedAdam(torch.optim.Optimizer):
    """Adam whose parameters carry the member dimension first and whose step counts are per member."""

    def __init__(self, params, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8):
        check(float(lr) > 0, "optimizer.lr", lr, "must be > 0")
        check(all(0 <= float(b) < 1 for b in betas), "optimizer.betas", list(betas), "must lie in [0, 1)")
        check(float(eps) >= 0, "optimizer.eps", eps, "must be >= 0")
        super().__init__(params, dict(lr=float(lr), betas=tuple(float(b) for b in betas), eps=float(eps)))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            b1, b2 = group["betas"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros(p.shape[0], dtype=torch.float64, device=p.device)  # (E,)
                    state["exp_avg"] = torch.zeros_like(p)
                    state["exp_avg_sq"] = torch.zeros_like(p)
                state["step"] += 1
                t = state["step"].view(-1, *([1] * (p.dim() - 1)))  # (E, 1, ...)
                state["exp_avg"].lerp_(p.grad, 1 - b1)
                state["exp_avg_sq"].mul_(b2).addcmul_(p.grad, p.grad, value=1 - b2)
                corr1 = (1 - b1 ** t).to(p.dtype)
                corr2 = (1 - b2 ** t).to(p.dtype).sqrt()
                denom = (state["exp_avg_sq"].sqrt() / corr2).add_(group["eps"])
                p.addcdiv_(state["exp_avg"], denom * corr1, value=-group["lr"])
        return None


def stacked_adam_from(factory) -> "callable":
    """A StackedAdam factory with the learning rate, betas and eps of an Adam factory (``optimizer`` config,
    ``_partial_: true``), so a scheme that needs per-member counts keeps the run's optimiser settings."""
    keywords = dict(getattr(factory, "keywords", None) or {})
    allowed = {k: keywords[k] for k in ("lr", "betas", "eps") if k in keywords}
    return lambda params: StackedAdam(params, **allowed)
