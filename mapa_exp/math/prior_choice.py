"""MAPA's prior recovery (method.md §6) as a hyper-parameter chosen per run on validation data: the candidates.

A run whose method learns codes but no prior (the MAPA family) admits several recovered priors: for latent
dimension 1 the interpolating copula map (``bins=null``) and smooth maps through B bin means (``bins=B``); for
more, Gaussian mixtures of C components (``n_components=C``). ``prior_candidates`` lists them from the
``prior_recovery`` settings -- a list of values is a set of candidates, one value fixes the map --
``mapa_exp.evaluation.estimators.recovered_models`` fits them, and ``choose`` picks the candidate with the
highest validation log-likelihood (ties: the first listed; a candidate without a finite score never wins). Test data give only the reported
number of the chosen candidate; every candidate's validation and test numbers are kept beside it, so a reader
can see how much the choice decides.

Why a choice and not a default: learned codes are not the truth's Gaussian codes. Where the truth's decoder is
a staircase (Clusters, Spiral-Dots) MAPA's codes bunch into tight groups with wide gaps, and a smooth map
through few bin means spreads prior mass into the gaps (0.59 nats of test KL on Clusters at 8 bins, 0.04 with
the interpolating map, on the same checkpoints), while on smooth shapes smoothing removes rank noise.

Plain Python (no torch): the command-line check validates the settings with it before anything heavy loads.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from mapa_exp.errors import check

BINS_CANDIDATES = (None, 8, 16, 32, 64)  # Dz = 1: conf/evaluate.yaml and conf/train.yaml give the same
COMPONENT_CANDIDATES = (1, 2, 5, 10, 20)  # Dz > 1
DEFAULTS = {"bins": list(BINS_CANDIDATES), "n_components": list(COMPONENT_CANDIDATES), "tail_knots": 10, "seed": 0}


@dataclass(frozen=True)
class PriorCandidate:
    label: str  # "bins=null", "bins=8", "n_components=5": the name eval.json and the tidy table use
    kwargs: dict = field(default_factory=dict)  # recovered_model's keyword arguments


def _listed(value) -> list:
    if isinstance(value, (list, tuple)) or type(value).__name__ == "ListConfig":
        return list(value)
    return [value]


def prior_candidates(latent_dim: int, bins=BINS_CANDIDATES, n_components=COMPONENT_CANDIDATES, tail_knots: int = 10,
                     seed: int = 0) -> list[PriorCandidate]:
    """The candidate recoveries for codes of ``latent_dim``: one per value of ``bins`` (Dz = 1) or of
    ``n_components`` (Dz > 1); ConfigError naming the ``prior_recovery`` key for a bad value."""
    check(isinstance(tail_knots, int) and not isinstance(tail_knots, bool) and tail_knots >= 1,
          "prior_recovery.tail_knots", tail_knots, "must be an integer >= 1")
    if latent_dim == 1:
        values = _listed(bins)
        check(len(values) > 0, "prior_recovery.bins", bins, "must name at least one map")
        for b in values:
            check(b is None or (isinstance(b, int) and not isinstance(b, bool) and b >= 2), "prior_recovery.bins", b,
                  "must be null (the interpolating map), an integer >= 2, or a list of them")
        check(len(set(values)) == len(values), "prior_recovery.bins", bins, "lists a map twice")
        return [PriorCandidate(f"bins={'null' if b is None else b}", {"bins": b, "tail_knots": tail_knots})
                for b in values]
    values = _listed(n_components)
    check(len(values) > 0, "prior_recovery.n_components", n_components, "must name at least one mixture")
    for c in values:
        check(isinstance(c, int) and not isinstance(c, bool) and c >= 1, "prior_recovery.n_components", c,
              "must be an integer >= 1 or a list of them")
    check(len(set(values)) == len(values), "prior_recovery.n_components", n_components, "lists a mixture twice")
    return [PriorCandidate(f"n_components={c}", {"n_components": c, "seed": seed}) for c in values]


def plain_settings(settings) -> dict:
    """``prior_recovery`` settings as plain JSON-able values (an OmegaConf node's lists become lists), the defaults
    filled in: what an evaluation records as the settings it used."""
    given = {str(k): (_listed(v) if type(v).__name__ == "ListConfig" else v) for k, v in dict(settings or {}).items()}
    return {**DEFAULTS, **given}


def check_prior_recovery(settings: dict) -> None:
    """Refuse bad ``prior_recovery`` settings before any work (ConfigError naming the key)."""
    for latent_dim in (1, 2):
        prior_candidates(latent_dim, **plain_settings(settings))


def choose(val_scores: dict[str, float]) -> str:
    """The label with the highest validation score; ties go to the first listed; NaN or -inf never wins."""
    finite = {k: v for k, v in val_scores.items() if v is not None and math.isfinite(v)}
    if not finite:
        raise ValueError(f"no prior candidate has a finite validation log-likelihood: {val_scores}")
    best = max(finite.values())
    return next(k for k, v in finite.items() if v == best)
