"""MAPA's prior recovery as the tidy table records it, and the table as it would be under another prior rule.

The evaluation chooses the MAPA family's prior map per run on validation data (method.md §6) and keeps every
candidate's numbers as extra metric rows, ``<metric>@<candidate>`` (``test_kl/quadrature@bins=8``); the plain
metric rows are the chosen candidate's. VAE and IWAE have a fixed N(0, I) prior and no candidate rows.
``table_under_prior`` rewrites a table so that every run with candidate rows reads as if scored with one
candidate; every later step (restart, K fraction, S, claims) then runs unchanged on it.
"""

from __future__ import annotations

import pandas as pd

CANDIDATE_MARK = "@"
FIXED_MAP = "bins=8"  # the rule of the report before the prior was chosen per run
INTERPOLATING_MAP = "bins=null"
# (name, candidate): None is the plain metrics, i.e. the candidate chosen per run on validation data
PRIOR_RULES = (("fixed 8-bin map", FIXED_MAP), ("interpolating map", INTERPOLATING_MAP),
               ("validation-chosen map", None))


def candidate_sort_key(label: str) -> tuple:
    """bins=null first, then bins=B by B, then n_components=C by C, then anything else by name."""
    key, _, value = label.partition("=")
    order = {"bins": 0, "n_components": 1}.get(key, 2)
    if value == "null":
        return (order, -1, label)
    return (order, int(value), label) if value.isdigit() else (order, 1 << 30, label)


def candidate_row_mask(table: pd.DataFrame) -> pd.Series:
    """Whether each row is a candidate's number (its metric carries ``@<candidate>``)."""
    return table["metric"].fillna("").str.contains(CANDIDATE_MARK, regex=False)


def candidate_labels(table: pd.DataFrame) -> list[str]:
    """The prior candidates the table has numbers for, in ``candidate_sort_key`` order."""
    metrics = table.loc[candidate_row_mask(table), "metric"]
    return sorted({m.split(CANDIDATE_MARK, 1)[1] for m in metrics}, key=candidate_sort_key)


def runs_with_candidates(table: pd.DataFrame) -> set[str]:
    """The runs (``run_dir``) that have candidate rows: the ones whose prior was recovered and chosen."""
    return set(table.loc[candidate_row_mask(table), "run_dir"])


def runs_lacking_candidate(table: pd.DataFrame, candidate: str) -> set[str]:
    """The runs with candidate rows but none for ``candidate``: under that rule they have no numbers."""
    having = table.loc[table["metric"].fillna("").str.endswith(CANDIDATE_MARK + candidate), "run_dir"]
    return runs_with_candidates(table) - set(having)


def table_under_prior(table: pd.DataFrame, candidate: str | None) -> pd.DataFrame:
    """``table`` as if every run with candidate rows had been scored with ``candidate``: its plain metrics that
    have candidate versions are replaced by ``<metric>@<candidate>`` (renamed to ``<metric>``, ``prior`` set to
    the candidate); a run without that candidate loses them, so no step can choose it. Runs without candidate
    rows (VAE, IWAE) keep their plain metrics. ``candidate=None``: the plain metrics (the chosen candidate's),
    without the candidate rows. Either way no candidate rows are left."""
    is_candidate = candidate_row_mask(table)
    if candidate is None:
        return table[~is_candidate].reset_index(drop=True)
    split = table["metric"].fillna("").str.split(CANDIDATE_MARK, n=1)
    base, label = split.str[0], split.str[1]
    replaced = pd.MultiIndex.from_arrays([table["run_dir"], base])[is_candidate.to_numpy()]
    pairs = pd.MultiIndex.from_arrays([table["run_dir"], table["metric"].fillna("")])
    superseded = pd.Series(pairs.isin(replaced), index=table.index) & ~is_candidate
    chosen = is_candidate & label.eq(candidate).fillna(False)
    out = table[(~is_candidate & ~superseded) | chosen].copy()
    out.loc[chosen[chosen].index, "metric"] = base[chosen]
    out.loc[out["run_dir"].isin(runs_with_candidates(table)), "prior"] = candidate
    return out.reset_index(drop=True)


def prior_rules_in(table: pd.DataFrame) -> list[tuple[str, str | None]]:
    """The ``PRIOR_RULES`` the table can be judged under: a fixed candidate's rule where it has that
    candidate's numbers, the validation-chosen rule always."""
    present = set(candidate_labels(table))
    return [(name, c) for name, c in PRIOR_RULES if c is None or c in present]
