"""Comparisons of two methods across data draws, and the verdicts a report states for a claim.

Two methods are compared on the *same* draws (each at its own configuration chosen on validation data):
the paired differences d_j = a_j - b_j over draws j give a mean, its standard error, a paired t test
(two-sided p-value, df = n - 1) and a 95% confidence interval. A claim then has one of three outcomes:

* directional ("a below b"): **holds** when the interval lies below 0, **fails** when it lies above 0,
  **undecided** when it contains 0 -- a tie is never reported as holding;
* equivalence ("a about b", within a stated margin): **holds** when the interval lies inside
  (-margin, margin) (two one-sided tests at 2.5% each), **fails** when it lies outside it entirely,
  **undecided** otherwise. With few draws most equivalence claims are undecided: that is the answer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import pandas as pd
from scipy import stats

OUTCOMES = ("holds", "fails", "undecided")


@dataclass(frozen=True)
class Paired:
    n: int  # draws both have
    mean: float  # mean of a - b
    se: float  # its standard error
    t: float
    p: float  # two-sided paired t test
    lo: float  # 95% confidence interval of the mean difference
    hi: float

    def text(self, digits: int = 3) -> str:
        if self.n < 2:
            return f"d = {self.mean:+.{digits}f} (n = {self.n}: no test)"
        return (f"d = {self.mean:+.{digits}f}, 95% CI [{self.lo:+.{digits}f}, {self.hi:+.{digits}f}], "
                f"t({self.n - 1}) = {self.t:.2f}, p = {self.p:.3g}")


def paired_difference(a: pd.Series, b: pd.Series) -> Paired:
    """The paired comparison of ``a`` and ``b`` (values indexed by draw) over the draws both have."""
    both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner").dropna()
    d = (both["a"] - both["b"]).to_numpy(dtype=float)
    n = len(d)
    if n == 0:
        return Paired(0, math.nan, math.nan, math.nan, math.nan, math.nan, math.nan)
    mean = float(d.mean())
    if n < 2:
        return Paired(n, mean, math.nan, math.nan, math.nan, math.nan, math.nan)
    sd = float(d.std(ddof=1))
    se = sd / math.sqrt(n)
    if se == 0:  # identical differences: the interval is the point itself
        t = math.copysign(math.inf, mean) if mean else 0.0
        return Paired(n, mean, 0.0, t, 0.0 if mean else 1.0, mean, mean)
    t = mean / se
    half = float(stats.t.ppf(0.975, n - 1)) * se
    return Paired(n, mean, se, t, float(2 * stats.t.sf(abs(t), n - 1)), mean - half, mean + half)


def directional(p: Paired, below: bool = True) -> str:
    """The outcome of "a below b" (``below``) or "a above b" from the 95% interval of a - b."""
    if p.n < 2 or not np.isfinite(p.lo):
        return "undecided"
    lo, hi = (p.lo, p.hi) if below else (-p.hi, -p.lo)
    if hi < 0:
        return "holds"
    if lo > 0:
        return "fails"
    return "undecided"


def equivalent(p: Paired, margin: float) -> str:
    """The outcome of "a about b" (|a - b| < margin) from the 95% interval of a - b."""
    if p.n < 2 or not np.isfinite(p.lo):
        return "undecided"
    if -margin < p.lo and p.hi < margin:
        return "holds"
    if p.lo >= margin or p.hi <= -margin:
        return "fails"
    return "undecided"
