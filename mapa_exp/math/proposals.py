"""Categorical proposals over data indices (spec §3-4): MAPA's kernel q, its top-K split and tail q~.

A proposal for point n is a row of candidate indices sorted by decreasing probability and their
log-probabilities. These functions work on such rows; they know nothing of files or networks.
"""

from __future__ import annotations

import torch


def log_softmax_rows(scores: torch.Tensor) -> torch.Tensor:
    """Normalise each row of unnormalised log-scores into a log categorical (Eq 7 and Eq 8)."""
    return torch.log_softmax(scores, dim=-1)


def tail_log_proposal(log_q_sorted: torch.Tensor, K: int) -> torch.Tensor:
    """log q~ (Eq 9) over the entries after the top K of rows sorted by decreasing q.

    Computed as a log-softmax of the remaining log q, never as 1 - sum(top-K q): with
    sigma^2 = 0.01 the top-K mass is 1 - 1e-20 and the subtraction returns exactly 0.
    (R, M) -> (R, M - K).
    """
    return torch.log_softmax(log_q_sorted[..., K:], dim=-1)


def tail_cdf(log_q_tail: torch.Tensor) -> torch.Tensor:
    """The cumulative distribution of q~ along each row, in float64, its last column exactly 1: (R, T) -> (R, T).

    Computed once per proposal and shared by every draw (``positions_from_uniforms``); float64 keeps tail
    entries with tiny but non-zero mass distinct.
    """
    cdf = torch.softmax(log_q_tail.double(), dim=-1).cumsum_(-1)
    cdf[..., -1] = 1.0
    return cdf


def positions_from_uniforms(cdf: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: for uniforms u in (0, 1] (..., S) the first position whose cdf (..., T) reaches u.

    A zero-mass entry (a flat step of the cdf) is never returned. Returns (..., S) int64.
    """
    return torch.searchsorted(cdf, u).clamp_max_(cdf.shape[-1] - 1)


def uniforms(shape: tuple[int, ...], generator: torch.Generator | None = None, device=None) -> torch.Tensor:
    """float64 uniforms in (0, 1] (never 0, so ``positions_from_uniforms`` never lands on a zero-mass entry)."""
    return 1.0 - torch.rand(shape, dtype=torch.float64, generator=generator, device=device)


def sample_tail(
    log_q_tail: torch.Tensor, S: int, generator: torch.Generator | None = None, cdf: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw S positions per row iid from q~; returns positions (R, S) and their log q~ (R, S).

    ``cdf`` (``tail_cdf(log_q_tail)``) may be given when it is already at hand.
    """
    R = log_q_tail.shape[0]
    if S == 0:
        empty = torch.empty((R, 0), dtype=torch.long, device=log_q_tail.device)
        return empty, log_q_tail.new_empty((R, 0))
    cdf = tail_cdf(log_q_tail) if cdf is None else cdf
    pos = positions_from_uniforms(cdf, uniforms((R, S), generator, cdf.device))
    return pos, torch.gather(log_q_tail, 1, pos)
