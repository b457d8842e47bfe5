"""Prior recovery (method.md §6): turn MAPA's codes z_n = g(x_n) into a prior the evaluators can use.

MAPA learns codes but no parametric prior. Two recoveries, both plain classes holding tensors
(``state_dict()`` is a dict of tensors, safe for ``torch.save`` / ``torch.load(weights_only=True)``):

* ``CopulaPrior1D`` (Dz = 1, the paper's C.3): Gaussian copula u_n = Φ⁻¹(rank_n / (N + 1)),
  whitened ẑ_n = (u_n − mean u) / sd u (population sd, so the ẑ_n have unit second moment), and a
  monotone map h: ẑ → z regressed on the sorted pairs (ẑ_(k), z_(k)). The recovered generative model
  is ẑ ~ N(0, 1), x ~ p(x | f(h(ẑ))): every N(0, I) evaluator applies with decode = f ∘ h
  (``compose_decoder``), and its log p(x) equals quadrature under the prior of z = h(ẑ)
  (``quadrature_grid`` maps the standard grid's nodes through h and keeps their weights). Two kinds of map:

  - ``bins=None``: the piecewise-linear interpolation through every pair (exact at the codes);
  - ``bins=B``: a smooth regression, the monotone cubic (PCHIP, C¹) through the extreme pairs and the means
    of B equal-count bins of the sorted pairs, tabulated on 4097 nodes. Averaging removes the order
    statistics' noise (the pairs wander around the true map like a Brownian bridge): with a ground truth's own
    Gaussian codes the recovered test KL was <= 0.0013 nats on Circle and Figure-8, against 0.003-0.013 for the
    interpolating map. But learned codes that bunch into tight groups with wide gaps (MAPA on Clusters and
    Spiral-Dots) make h a staircase, which a cubic through few bin means cannot follow: it spreads prior mass
    into the gaps (0.59 nats of test KL on Clusters at B = 8, 0.04 interpolating).

  Which map is best depends on the codes, so none is fixed here: the evaluation fits several and chooses per
  run on validation data (``mapa_exp.math.prior_choice``). Beyond the extreme codes both maps continue
  linearly with the *secant* slope over the outermost ``tail_knots`` pairs (default 10; the gap between the
  two most extreme order statistics has a relative spread of order 1, the secant over k knots about
  1/sqrt(k)), floored at MIN_SLOPE_RATIO of the overall secant. h is strictly increasing, so h⁻¹ is the same
  piecewise-linear table with the roles swapped, and the implied density of z (``log_prob``) follows by the
  change of variables.
* ``MixturePrior`` (any Dz, the [choice] for Dz > 1): a full-covariance Gaussian mixture fitted
  to the codes with scikit-learn, exposed as torch tensors (``log_prob``, ``sample``). Its prior
  is not N(0, I) and there is no simple map to one, so evaluators take its density instead:
  quadrature (Dz ≤ 2) integrates against it component by component (``quadrature_grid``: the
  standard rule in each component's own coordinates, weighted by π_c), and the mixture-IWAE
  evaluator takes ``log_prior=prior.log_prob`` in log p(x, z).

Fitting uses numpy/scikit-learn once; every call afterwards is torch only.
"""

from __future__ import annotations

from typing import Callable

import torch

from mapa_exp.math.bounds import log_normal_std
from mapa_exp.math.quadrature import QuadratureGrid, standard_normal_rule_1d, tensor_product_grid


def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor, slope_lo: torch.Tensor, slope_hi: torch.Tensor):
    """Piecewise-linear interpolation through (xp, fp), xp increasing, linear beyond the ends.

    Returns the value and the local slope, both shaped like x.
    """
    xp, fp = xp.to(x), fp.to(x)
    K = xp.shape[0]
    i = torch.searchsorted(xp, x.contiguous()).clamp(1, K - 1)  # segment [i-1, i]
    x0, x1, y0, y1 = xp[i - 1], xp[i], fp[i - 1], fp[i]
    slope = (y1 - y0) / (x1 - x0).clamp_min(torch.finfo(x.dtype).tiny)
    y = y0 + slope * (x - x0)
    lo, hi = x < xp[0], x > xp[-1]
    slope = torch.where(lo, slope_lo.to(x), torch.where(hi, slope_hi.to(x), slope))
    y = torch.where(lo, fp[0] + slope * (x - xp[0]), torch.where(hi, fp[-1] + slope * (x - xp[-1]), y))
    return y, slope


class CopulaPrior1D:
    """z = h(ẑ), ẑ ~ N(0, 1), with h a monotone copula map held as a piecewise-linear table (module docstring)."""

    latent_dim = 1

    def __init__(self, zhat_knots: torch.Tensor, z_knots: torch.Tensor, slope_lo, slope_hi):
        self.zhat_knots = zhat_knots  # (K,) strictly increasing
        self.z_knots = z_knots  # (K,) non-decreasing
        self.slope_lo = torch.as_tensor(slope_lo, dtype=z_knots.dtype)  # () dz/dẑ below the first knot
        self.slope_hi = torch.as_tensor(slope_hi, dtype=z_knots.dtype)  # () dz/dẑ above the last knot

    @classmethod
    def fit(cls, codes: torch.Tensor, tail_knots: int = 10, bins: int | None = None) -> "CopulaPrior1D":
        """Fit to 1-D codes, shaped (N,) or (N, 1); N >= 2. ``bins``: the smooth map through that many bin means
        (module doc), or None for the interpolating map through every code."""
        if codes.dim() == 2 and codes.shape[1] != 1:
            raise ValueError(f"CopulaPrior1D needs latent_dim = 1 codes, got shape {tuple(codes.shape)}")
        z = codes.reshape(-1).detach().to(torch.float64).cpu()
        N = z.shape[0]
        if N < 2:
            raise ValueError(f"CopulaPrior1D needs at least 2 codes, got N={N}")
        if bins is not None and not (isinstance(bins, int) and bins >= 2):
            raise ValueError(f"prior_recovery.bins must be an integer >= 2 or null, got {bins!r}")
        z_sorted = torch.sort(z, stable=True).values  # (N,) rank k+1 <-> z_sorted[k]
        u = torch.special.ndtri(torch.arange(1, N + 1, dtype=torch.float64) / (N + 1))  # (N,)
        zhat = (u - u.mean()) / u.std(correction=0)
        slope_lo, slope_hi = _tail_slopes(zhat, z_sorted, tail_knots)
        if bins is not None and bins < N:
            return cls(*_smooth_map(zhat, z_sorted, bins, slope_lo, slope_hi))
        return cls(zhat, z_sorted, slope_lo, slope_hi)

    def to_latent(self, zhat: torch.Tensor) -> torch.Tensor:
        """h(ẑ), elementwise, any shape."""
        return _interp(zhat, self.zhat_knots, self.z_knots, self.slope_lo, self.slope_hi)[0]

    def to_standard(self, z: torch.Tensor) -> torch.Tensor:
        """h⁻¹(z), elementwise, any shape."""
        return _interp(z, self.z_knots, self.zhat_knots, 1 / self.slope_lo, 1 / self.slope_hi)[0]

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """Density of z = h(ẑ): log N(h⁻¹(z); 0, 1) − log h'(h⁻¹(z)); (..., 1) -> (...)."""
        zhat, dzhat_dz = _interp(z, self.z_knots, self.zhat_knots, 1 / self.slope_lo, 1 / self.slope_hi)
        return (log_normal_std(zhat[..., None]) + torch.log(dzhat_dz)).sum(-1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws of z = h(ẑ): (n, 1)."""
        return self.to_latent(torch.randn((n, 1), generator=generator, dtype=self.z_knots.dtype))

    def quadrature_grid(self, J: int, rule: str | None = None, dtype=torch.float64, device=None) -> QuadratureGrid:
        """The standard normal rule's nodes mapped through h, with their weights unchanged."""
        zhat, log_w = standard_normal_rule_1d(J, rule or "uniform", dtype=dtype, device=device)
        return QuadratureGrid(self.to_latent(zhat)[:, None], log_w)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"zhat_knots": self.zhat_knots, "z_knots": self.z_knots,
                "slope_lo": self.slope_lo, "slope_hi": self.slope_hi}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "CopulaPrior1D":
        return cls(state["zhat_knots"], state["z_knots"], state["slope_lo"], state["slope_hi"])


MIN_SLOPE_RATIO = 1e-3  # an end slope is at least this fraction of the codes' overall secant slope


def _tail_slopes(zhat: torch.Tensor, z: torch.Tensor, tail_knots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """dz/dẑ beyond the extreme codes: the secant over the outermost ``tail_knots`` pairs at each end, at least
    MIN_SLOPE_RATIO times the secant from the lowest to the highest code, so that tied extreme codes (a saturated
    encoder) do not put the tail's mass on one point."""
    N = z.shape[0]
    k = max(1, min(int(tail_knots), N - 1))
    overall = float((z[-1] - z[0]) / (zhat[-1] - zhat[0]))
    floor = max(MIN_SLOPE_RATIO * overall, 1e-12)
    lo = ((z[k] - z[0]) / (zhat[k] - zhat[0])).clamp_min(floor)
    hi = ((z[-1] - z[-1 - k]) / (zhat[-1] - zhat[-1 - k])).clamp_min(floor)
    return lo, hi


def _smooth_map(zhat: torch.Tensor, z: torch.Tensor, bins: int, slope_lo: torch.Tensor, slope_hi: torch.Tensor,
                nodes: int = 4097):
    """The monotone cubic (PCHIP) through the extreme pairs and the bin means of the sorted pairs between them,
    tabulated strictly increasing: (zhat_knots, z_knots, slope_lo, slope_hi).

    The knots reach the extreme codes, so beyond them lies only the copula's own tail mass (about 1/(N+1) at each
    end), continued with the secant slopes of ``_tail_slopes``; a knot at an outer bin mean instead left about 5%
    of the mass at each end on a straight extension with PCHIP's end derivative, which on clustered codes was as
    small as 1e-11 (that mass on one point)."""
    import numpy as np
    from scipy.interpolate import PchipInterpolator

    edges = torch.linspace(0, zhat.shape[0], bins + 1).round().long().tolist()
    mx = [float(zhat[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
    my = [float(z[a:b].mean()) for a, b in zip(edges[:-1], edges[1:])]
    lo, hi = float(zhat[0]), float(zhat[-1])
    inner = [(x, y) for x, y in zip(mx, my) if lo < x < hi]  # a one-code end bin is the extreme pair itself
    kx = np.array([lo, *(x for x, _ in inner), hi])
    ky = np.maximum.accumulate(np.array([float(z[0]), *(y for _, y in inner), float(z[-1])]))  # guard rounding
    f = PchipInterpolator(kx, ky, extrapolate=False)
    xs = np.linspace(kx[0], kx[-1], nodes)
    tiny = 1e-12 * max(float(z[-1] - z[0]), 1e-12)
    steps = np.maximum(np.diff(f(xs)), tiny * np.diff(xs))  # strictly increasing, so h has an inverse
    ys = ky[0] + np.concatenate([[0.0], np.cumsum(steps)])
    return torch.from_numpy(xs), torch.from_numpy(ys), slope_lo, slope_hi


def compose_decoder(decode: Callable[[torch.Tensor], torch.Tensor], prior: CopulaPrior1D):
    """decode ∘ h: the recovered model's decoder for a N(0, 1) prior on ẑ, (..., 1) -> (..., Dx)."""
    return lambda zhat: decode(prior.to_latent(zhat))


class MixturePrior:
    """A Gaussian mixture density over codes, sum_c π_c N(z; μ_c, L_c L_cᵀ), held as torch tensors."""

    def __init__(self, log_weights: torch.Tensor, means: torch.Tensor, scale_tril: torch.Tensor):
        self.log_weights = log_weights  # (C,)
        self.means = means  # (C, Dz)
        self.scale_tril = scale_tril  # (C, Dz, Dz) lower-triangular Cholesky factors
        self.latent_dim = means.shape[-1]

    @classmethod
    def fit(cls, codes: torch.Tensor, n_components: int = 10, seed: int = 0, reg_covar: float = 1e-6,
            max_iter: int = 500, n_init: int = 1) -> "MixturePrior":
        """Fit a full-covariance mixture to codes (N, Dz) with scikit-learn's EM."""
        from sklearn.mixture import GaussianMixture

        z = codes.detach().to(torch.float64).cpu()
        if z.dim() == 1:
            z = z[:, None]
        if z.shape[0] < n_components:
            raise ValueError(f"MixturePrior n_components={n_components} exceeds the number of codes N={z.shape[0]}")
        gm = GaussianMixture(n_components, covariance_type="full", reg_covar=reg_covar, max_iter=max_iter,
                             n_init=n_init, random_state=seed).fit(z.numpy())
        cov = torch.as_tensor(gm.covariances_, dtype=torch.float64)  # (C, Dz, Dz)
        return cls(torch.as_tensor(gm.weights_, dtype=torch.float64).log(),
                   torch.as_tensor(gm.means_, dtype=torch.float64), torch.linalg.cholesky(cov))

    def _components(self, like: torch.Tensor) -> torch.distributions.MultivariateNormal:
        return torch.distributions.MultivariateNormal(
            self.means.to(like), scale_tril=self.scale_tril.to(like), validate_args=False)

    def log_prob(self, z: torch.Tensor) -> torch.Tensor:
        """log sum_c π_c N(z; μ_c, Σ_c): (..., Dz) -> (...)."""
        comp = self._components(z).log_prob(z[..., None, :])  # (..., C)
        return torch.logsumexp(comp + self.log_weights.to(z), -1)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n draws: (n, Dz)."""
        c = torch.multinomial(self.log_weights.exp(), n, replacement=True, generator=generator)  # (n,)
        eps = torch.randn((n, self.latent_dim, 1), generator=generator, dtype=self.means.dtype)
        return self.means[c] + (self.scale_tril[c] @ eps)[..., 0]

    def quadrature_grid(self, J: int, rule: str | None = None, dtype=torch.float64, device=None) -> QuadratureGrid:
        """One standard-normal rule per component in its own coordinates: nodes μ_c + L_c ε_j, log weights
        log π_c + log w_j, J nodes per axis per component (C·J^Dz in all).

        Since ∫ g(z) Σ_c π_c N(z; μ_c, Σ_c) dz = Σ_c π_c ∫ g(μ_c + L_c ε) N(ε; 0, I) dε, each component is
        resolved in units of its own spread however tight or far apart the components are, and the grid
        holds the mixture's whole mass (a box grid over all of them held 0.93 of five tight components)."""
        if rule not in (None, "uniform"):
            raise ValueError(f"MixturePrior supports quadrature rule 'uniform' only, got rule={rule!r}")
        eps_1d, log_w_1d = standard_normal_rule_1d(J, "uniform", dtype=dtype, device=device)
        eps = tensor_product_grid(eps_1d, log_w_1d, self.latent_dim)  # (J^Dz, Dz), (J^Dz,)
        means, L = self.means.to(dtype=dtype, device=device), self.scale_tril.to(dtype=dtype, device=device)
        nodes = means[:, None, :] + eps.nodes @ L.transpose(-1, -2)  # (C, J^Dz, Dz)
        log_w = self.log_weights.to(dtype=dtype, device=device)[:, None] + eps.log_weights  # (C, J^Dz)
        return QuadratureGrid(nodes.reshape(-1, self.latent_dim), log_w.reshape(-1))

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"log_weights": self.log_weights, "means": self.means, "scale_tril": self.scale_tril}

    @classmethod
    def from_state_dict(cls, state: dict[str, torch.Tensor]) -> "MixturePrior":
        return cls(state["log_weights"], state["means"], state["scale_tril"])
