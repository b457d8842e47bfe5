"""The objectives every method trains and every evaluator reports, as pure torch functions.

All values are log-likelihoods (or lower bounds on them) in nats *per data point*, with every
constant kept, so a bound, an estimate and an exact value compare directly:

* ``log_weights_gaussian_q`` -- importance log-weights log p(x, z) - log q(z | x) for a mean-field
  Gaussian q (one function serves the ELBO, the IWAE bound and the evaluation estimate);
* ``elbo`` / ``iwae_bound`` -- method.md Eq 2 from those log-weights;
* ``iwae_surrogate`` -- the quantity whose gradient is the standard, STL or DReG estimator;
* ``mapa_bound`` -- method.md Eq 10, L_{K,S} per point, in log space;
* ``empirical_log_likelihood`` -- method.md Eq 6 per point (the exact value MAPA bounds).
"""

from __future__ import annotations

import math
from typing import Callable

import torch

LOG_2PI = math.log(2 * math.pi)
ESTIMATORS = ("standard", "stl", "dreg")


def log_normal_std(z: torch.Tensor) -> torch.Tensor:
    """log N(z; 0, I), summed over the last dimension."""
    return -0.5 * (z.pow(2).sum(-1) + z.shape[-1] * LOG_2PI)


def log_normal_diag(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z; mean, diag(exp(logvar))), summed over the last dimension."""
    return -0.5 * (((z - mean) ** 2) * torch.exp(-logvar) + logvar + LOG_2PI).sum(-1)


def log_weights_gaussian_q(
    x: torch.Tensor,
    q_mean: torch.Tensor,
    q_logvar: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    log_lik: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
    S: int | None = None,
    estimator: str = "standard",
    generator: torch.Generator | None = None,
    eps: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reparameterised log-weights log p(x|f(z_s)) + log p(z_s) - log q(z_s|x), s = 1..S.

    x: (..., Dx); q_mean, q_logvar: (..., Dz), any leading dimensions (e.g. (B,) or (members, B)).
    The standard normal noise ``eps`` (..., S, Dz) is drawn from ``generator`` unless given.
    Returns ``log_w`` (..., S) and ``z`` (..., S, Dz). For ``stl`` and ``dreg`` the parameters of q
    are detached inside log q (the path derivative only); the value is unchanged.
    """
    if estimator not in ESTIMATORS:
        raise ValueError(f"method.estimator must be one of {ESTIMATORS}, got {estimator!r}")
    if eps is None:
        eps = torch.randn((*q_mean.shape[:-1], S, q_mean.shape[-1]), generator=generator, dtype=q_mean.dtype,
                          device=q_mean.device)
    mean, logvar = q_mean.unsqueeze(-2), q_logvar.unsqueeze(-2)  # (..., 1, Dz)
    z = mean + torch.exp(0.5 * logvar) * eps  # (..., S, Dz)
    if estimator == "standard":
        log_q = log_normal_diag(z, mean, logvar)
    else:
        log_q = log_normal_diag(z, mean.detach(), logvar.detach())
    log_p = log_lik(x.unsqueeze(-2), decode(z)) + log_normal_std(z)  # (..., S)
    return log_p - log_q, z


def elbo(log_w: torch.Tensor) -> torch.Tensor:
    """Average of S single-sample ELBOs per point: (..., S) -> (...)."""
    return log_w.mean(-1)


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """IWAE_S per point: logsumexp_s log_w - log S, (..., S) -> (...)."""
    return torch.logsumexp(log_w, -1) - math.log(log_w.shape[-1])


def iwae_surrogate(log_w: torch.Tensor, z: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-point surrogate whose gradient is the chosen estimator of grad IWAE_S; (B,).

    * ``standard`` / ``stl``: the bound itself (STL differs only through the detached q
      parameters in ``log_weights_gaussian_q``). STL is unbiased for S = 1 and biased for
      S > 1 (Tucker et al. 2019).
    * ``dreg``: decoder gradient sum_s w~_s d log w_s; encoder gradient sum_s w~_s^2 d log w_s/dz_s
      dz_s/dphi, obtained by scaling the gradient that reaches ``z`` by w~_s.
    The surrogate's *value* is not the bound: log ``iwae_bound`` instead.
    """
    if estimator != "dreg":
        return iwae_bound(log_w)
    w = torch.softmax(log_w, -1).detach()  # (B, S)
    if z.requires_grad:
        z.register_hook(lambda g: g * w.unsqueeze(-1))
    return (w * log_w).sum(-1)


def mapa_bound(
    ll_top: torch.Tensor, ll_tail: torch.Tensor, tail_log_q: torch.Tensor, N: int
) -> torch.Tensor:
    """L_{K,S} per point (method.md Eq 10), in log space.

    ll_top: (B, K) log p(x_n | f(g(x_m))) for m in the top-K set T_K(n);
    ll_tail: (B, S) the same for the S tail samples m_s ~ q~(.|x_n);
    tail_log_q: (B, S) log q~(m_s | x_n). Returns (B,).
    a_k = ll_top - log N;  b_s = ll_tail - log N - log S - log q~;  L_n = logsumexp([a, b]).
    """
    S = ll_tail.shape[-1]
    a = ll_top - math.log(N)
    if S == 0:
        return torch.logsumexp(a, -1)
    b = ll_tail - math.log(N) - math.log(S) - tail_log_q
    return torch.logsumexp(torch.cat([a, b], -1), -1)


def empirical_log_likelihood(ll: torch.Tensor) -> torch.Tensor:
    """Exact empiricalized log-likelihood per point (method.md Eq 6): (B, N) -> (B,)."""
    return torch.logsumexp(ll, -1) - math.log(ll.shape[-1])


def mutual_information_gaussian_q(mean: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor) -> torch.Tensor:
    """I_q(x; z) of a mean-field Gaussian encoder over n points, the estimator of He et al. (2019, their
    ``calc_mi``): E_x[E_q log q(z|x)] - E_q(z) log q(z), with one sample z_i = mean_i + sd_i eps_i per point and
    the aggregate posterior q(z) = (1/n) sum_j q(z | x_j). ``mean``, ``logvar``, ``eps``: (..., n, Dz); returns
    (...). Consistent as n grows; 0 for an encoder that ignores x."""
    n, Dz = mean.shape[-2], mean.shape[-1]
    neg_entropy = (-0.5 * Dz * LOG_2PI - 0.5 * (1 + logvar).sum(-1)).mean(-1)  # E_x E_q log q(z|x), exactly
    z = mean + torch.exp(0.5 * logvar) * eps  # (..., n, Dz)
    # log q(z_i | x_j): (..., n_i, n_j)
    log_q = log_normal_diag(z.unsqueeze(-2), mean.unsqueeze(-3), logvar.unsqueeze(-3))
    log_qz = torch.logsumexp(log_q, -1) - math.log(n)
    return neg_entropy - log_qz.mean(-1)
