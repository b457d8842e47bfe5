"""The report's text pieces: numbers, markdown tables, lists of values, the order methods are shown in."""

from __future__ import annotations

import math

import pandas as pd

METHODS = ["vae", "iwae", "mapa", "mapa_gt", "mapa_naive"]  # the order of rows and legends
NO_EXPERIMENT = "(no experiment)"  # a run whose sweep named no experiment
NOT_RECORDED = "not recorded"


def is_missing(value) -> bool:
    """Whether ``value`` is None, NA or NaN."""
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def mean_se_text(mean: float, se: float | None = None, digits: int = 3) -> str:
    """"0.300 ± 0.153", "0.300" without a standard error, "–" without a mean."""
    if is_missing(mean):
        return "–"
    if is_missing(se):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def draws_cell_text(mean: float, se: float, n: int) -> str:
    """"0.300 ± 0.153 (3)": mean ± s.e. over n draws (the count only when there are several)."""
    return mean_se_text(mean, se) + (f" ({int(n)})" if n > 1 else "")


def markdown_table(df: pd.DataFrame) -> str:
    """``df`` as a markdown table: its columns as the header, empty cells for missing values."""
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if is_missing(v) else str(v) for v in row) + " |")
    return "\n".join(lines)


def method_sort_key(label: str) -> tuple:
    """Series labels ("mapa K=ceil(0.1S)") in the order of ``METHODS``, others after them, by name."""
    first = label.split()[0] if label.split() else label
    return (METHODS.index(first) if first in METHODS else len(METHODS), label)


def range_text(counts: pd.Series) -> str:
    """"3" when every count is 3, "2–3" when they differ."""
    lo, hi = int(counts.min()), int(counts.max())
    return f"{lo}" if lo == hi else f"{lo}–{hi}"


def counts_by_method_text(counts: pd.Series) -> str:
    """``counts`` (indexed with a ``method`` level) as text: "5" when every method has 5, "5 (aggressive: 3)" when
    some differ: the count most methods share first, the others named after it."""
    per_method = counts.groupby(level="method", sort=False).agg(range_text)
    common = per_method.value_counts(sort=False).sort_values(ascending=False, kind="stable").index[0]
    others = sorted((m for m, t in per_method.items() if t != common), key=method_sort_key)
    return common + (f" ({'; '.join(f'{m}: {per_method[m]}' for m in others)})" if others else "")


def integers_text(values) -> str:
    """The distinct integers of ``values``, sorted, comma-separated ("?" when there are none)."""
    return ", ".join(str(int(v)) for v in sorted({int(v) for v in values if not is_missing(v)})) or "?"


def experiment_name(value) -> str:
    """The experiment's name, or ``NO_EXPERIMENT`` for a sweep that named none."""
    return NO_EXPERIMENT if is_missing(value) or not str(value) else str(value)


def counted_text(counts: pd.Series, unit: str = "runs") -> str:
    """"bins=null for 30 runs, bins=8 for 6 runs" from value counts (largest first, then by name)."""
    items = sorted(counts.items(), key=lambda kv: (-int(kv[1]), str(kv[0])))
    return ", ".join(f"{k} for {int(n)} {unit if n != 1 else unit.rstrip('s')}" for k, n in items)
