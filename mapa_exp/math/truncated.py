"""The tail proposal of truncated MAPA (method.md §4, "truncated proposals stay valid"), as pure torch functions.

With a truncated proximity structure each point n has only its M nearest candidates ``rows`` (R, M),
sorted by decreasing q; the first K are the top-K set T_K(n). The S tail samples come from the
*defensive mixture*

    q_mix(m | x_n) = (1 - eps) q~(m | x_n) + eps / (N - K)      for m not in T_K(n),

where q~ is q renormalised over the row's M - K remaining candidates (zero for the other points) and
the uniform share eps covers *every* point outside T_K(n), neighbour or not. Then

* the support of q_mix is the whole tail when eps > 0, so the importance-sampled tail sum in L_{K,S}
  is unbiased for the *full* tail (the same target as the untruncated bound) and every weight is
  bounded by e^ell (N - K) / (N eps), whatever the kernel: a far point that the decoder likes cannot
  give an unbounded weight;
* eps = 0 is q~ itself: unbiased for the sum over the M - K neighbours only, which is <= the full
  tail, so L stays a lower bound (a looser one) -- method.md §4;
* the uniform part is over all non-top-K points rather than only the non-neighbours, so it needs no
  knowledge of the neighbour list to *sample* (one draw skipped past the K top-K indices), works
  unchanged for the dense structure (M = N), and its density is the same constant everywhere.

``log q_mix`` of each sampled index is exact: a neighbour drawn by the uniform part still gets its
(1 - eps) q~ share, found by a sorted search in its row.
"""

from __future__ import annotations

import math

import torch

from mapa_exp.math.proposals import AliasTable, alias_positions, alias_table, uniforms


def outside_from_uniforms(excluded: torch.Tensor, N: int, u: torch.Tensor) -> torch.Tensor:
    """Indices uniform on {0..N-1} minus each row's ``excluded`` (R, K) distinct indices, from uniforms u (R, S).

    Maps u in (0, 1] to r uniform on {0..N-K-1}, then to the r-th non-excluded index by stepping past the
    sorted excluded ones. Returns (R, S) int64.
    """
    K = excluded.shape[1]
    r = ((1.0 - u) * (N - K)).floor_().long().clamp_(0, N - K - 1)
    for e in torch.sort(excluded, dim=1).values.T:  # ascending excluded index, (R,) each
        r += (r >= e[:, None]).long()
    return r


def sample_outside(excluded: torch.Tensor, N: int, S: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """S indices per row drawn uniformly from {0..N-1} minus the row's ``excluded`` (R, K) distinct indices."""
    return outside_from_uniforms(excluded, N, uniforms((excluded.shape[0], S), generator, excluded.device))


def mixture_log_prob(
    rows: torch.Tensor, log_q_tail: torch.Tensor, K: int, N: int, uniform_share: float, index: torch.Tensor
) -> torch.Tensor:
    """log q_mix(index | x_n) (module doc) for indices (R, S) outside each row's top K; returns (R, S).

    rows: (R, M) candidate indices sorted by decreasing q; log_q_tail: (R, M - K) log q~ of
    rows[:, K:] (``mapa_exp.math.proposals.tail_log_proposal``).
    """
    eps = float(uniform_share)
    log_uniform = (math.log(eps) - math.log(N - K)) if eps > 0 else -math.inf
    if eps == 1 or rows.shape[1] == K:
        return torch.full(index.shape, log_uniform, dtype=log_q_tail.dtype, device=index.device)
    tail = rows[:, K:]  # (R, T)
    sorted_tail, order = torch.sort(tail, dim=1)
    p = torch.searchsorted(sorted_tail, index.contiguous()).clamp_max_(tail.shape[1] - 1)  # (R, S)
    found = sorted_tail.gather(1, p) == index
    log_qt = log_q_tail.gather(1, order.gather(1, p))
    log_nb = torch.where(found, log_qt + math.log1p(-eps), torch.full_like(log_qt, -math.inf))
    return torch.logaddexp(log_nb, torch.full_like(log_nb, log_uniform))


def mixture_from_uniforms(
    rows: torch.Tensor, table: AliasTable, table_rows: torch.Tensor, K: int, N: int, uniform_share: float,
    u: torch.Tensor,
) -> torch.Tensor:
    """Tail indices drawn from q_mix (module doc) given uniforms in (0, 1] ``u`` (R, S, 4).

    rows: (R, M) candidates sorted by decreasing q (top K first); ``table``, ``table_rows`` (R,): the alias
    table of q~ over each row's rows[:, K:] (``mapa_exp.math.proposals.alias_table``) and which of its rows is
    each row's. u[..., 0:2] draw the neighbour, u[..., 2] picks the component (neighbours with probability
    1 - eps), u[..., 3] the uniform draw. Returns (R, S) int64.
    """
    eps = float(uniform_share)
    index = outside_from_uniforms(rows[:, :K], N, u[..., 3])  # (R, S)
    if eps < 1:
        pos = alias_positions(table, table_rows, u[..., :2])
        index = torch.where(u[..., 2] > eps, rows[:, K:].gather(1, pos), index)
    return index


def sample_tail_mixture(
    rows: torch.Tensor,
    log_q_tail: torch.Tensor,
    K: int,
    N: int,
    S: int,
    uniform_share: float,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw S tail indices per row iid from q_mix (module doc); returns indices (R, S) and their exact log q_mix.

    rows: (R, M) candidates sorted by decreasing q (top K first); log_q_tail: (R, M - K) log q~.
    """
    R = rows.shape[0]
    if S == 0:
        return rows.new_empty((R, 0)), log_q_tail.new_empty((R, 0))
    u = uniforms((R, S, 4), generator, rows.device)
    table = alias_table(log_q_tail) if uniform_share < 1 else None
    index = mixture_from_uniforms(rows, table, torch.arange(R, device=rows.device), K, N, uniform_share, u)
    return index, mixture_log_prob(rows, log_q_tail, K, N, uniform_share, index)
