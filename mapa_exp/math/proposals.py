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


def sample_tail(
    log_q_tail: torch.Tensor, S: int, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw S positions per row iid from q~; returns positions (R, S) and their log q~ (R, S).

    Sampling runs in float64 so that tail entries with tiny but non-zero mass are not lost.
    """
    R = log_q_tail.shape[0]
    if S == 0:
        empty = torch.empty((R, 0), dtype=torch.long, device=log_q_tail.device)
        return empty, log_q_tail.new_empty((R, 0))
    probs = torch.softmax(log_q_tail.double(), dim=-1)
    # torch.multinomial takes a ~15x slower path for a single draw: draw two iid columns and keep one
    pos = torch.multinomial(probs, max(S, 2), replacement=True, generator=generator)[:, :S]
    return pos, torch.gather(log_q_tail, 1, pos)
