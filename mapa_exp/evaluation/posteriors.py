"""Posterior trends (method.md §8, paper Sec 6.3) and non-identifiability (Sec 6.4) as tidy tables.

For chosen points x_n and every training code z_m of a *variant* (a decoder and its codes):

* ``true``      -- the variant's posterior density log p(z_m | x_n) (quadrature normaliser), black;
* ``empirical`` -- log (N p(i_n = m | x_n)), the true empiricalized posterior (Eq 7), red;
* ``mapa``      -- log (N q(m | x_n)), MAPA's kernel proposal (Eq 8), blue; it depends on the data only.

MAPA "captures the trend" when blue is noise around red: ``trend_slope`` regresses blue on red.
"""

from __future__ import annotations

import math
from typing import Callable

import numpy as np
import pandas as pd
import torch

from mapa_exp.data.proximity import nearest_neighbors
from mapa_exp.math.proposals import log_softmax_rows
from mapa_exp.math.quadrature import posterior_log_density, quadrature_log_likelihood

CURVES = ("true", "empirical", "mapa")


@torch.no_grad()
def posterior_curves(
    x_points: torch.Tensor,
    x_train: torch.Tensor,
    codes: torch.Tensor,
    decode: Callable[[torch.Tensor], torch.Tensor],
    likelihood,
    bandwidth: float | None = None,
    J: int = 2000,
) -> dict[str, torch.Tensor]:
    """The three log-posteriors of each point over the N codes: each (P, N), float64.

    ``x_points`` (P, Dx) are the chosen points (training points: MAPA's q then includes the self term);
    ``codes`` (N, Dz) the variant's codes of ``x_train`` (N, Dx); ``decode`` the variant's decoder.
    """
    N, Dz = codes.shape
    log_px = quadrature_log_likelihood(x_points, decode, likelihood, J, Dz)  # (P,)
    true = posterior_log_density(x_points, codes, decode, likelihood, log_px)  # (P, N)
    params = decode(codes).double()  # (N, Dx)
    ll = likelihood.log_prob(x_points.double()[:, None, :], params[None])  # (P, N)
    empirical = log_softmax_rows(ll) + math.log(N)
    idx, d = nearest_neighbors(x_train, x_points, M=None, metric=likelihood.metric)  # rows sorted by distance
    dist = torch.empty(idx.shape, dtype=torch.float64).scatter_(1, torch.from_numpy(idx), torch.from_numpy(d).double())
    mapa = log_softmax_rows(likelihood.log_kernel(dist, bandwidth=bandwidth)) + math.log(N)
    return {"true": true, "empirical": empirical, "mapa": mapa}


def curves_table(curves: dict[str, torch.Tensor], codes: torch.Tensor, point_ids, variant: str = "ground truth") -> pd.DataFrame:
    """Tidy rows: variant, point, m, z (first latent coordinate), curve, log_density."""
    P, N = curves["true"].shape
    frames = []
    for name in CURVES:
        frames.append(pd.DataFrame({
            "variant": variant,
            "point": np.repeat(np.asarray(point_ids), N),
            "m": np.tile(np.arange(N), P),
            "z": np.tile(codes[:, 0].double().numpy(), P),
            "curve": name,
            "log_density": curves[name].numpy().reshape(-1),
        }))
    return pd.concat(frames, ignore_index=True)


def trend_slope(table: pd.DataFrame, window: float | None = 20.0) -> dict:
    """Least-squares slope (and intercept, R^2, count) of MAPA (blue) on Eq 7 (red), pooled over points.

    ``window``: keep only codes whose Eq 7 value is within ``window`` nats of its point's maximum
    (where the posterior has its mass); None keeps all.
    """
    wide = table.pivot_table(index=["variant", "point", "m"], columns="curve", values="log_density").reset_index()
    if window is not None:
        top = wide.groupby(["variant", "point"])["empirical"].transform("max")
        wide = wide[wide["empirical"] >= top - window]
    x, y = wide["empirical"].to_numpy(), wide["mapa"].to_numpy()
    slope, intercept = np.polyfit(x, y, 1)
    r2 = 1 - np.sum((y - (slope * x + intercept)) ** 2) / np.sum((y - y.mean()) ** 2)
    return {"slope": float(slope), "intercept": float(intercept), "r2": float(r2), "n": int(len(x)), "window": window}


def choose_points(x: torch.Tensor, z: torch.Tensor, n_points: int) -> list[int]:
    """Indices of training points spread evenly over the code quantiles (deterministic)."""
    order = torch.argsort(z[:, 0])
    qs = torch.linspace(0.1, 0.9, n_points)
    return [int(order[int(q * (len(order) - 1))]) for q in qs]
