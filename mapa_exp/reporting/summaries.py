"""The numbers the report's sections and figures show, computed from the tidy table alone (every choice on
validation data: mapa_exp.sweeps.results)."""

from __future__ import annotations

from dataclasses import dataclass

import pandas as pd

from mapa_exp.sweeps.results import choose_on_validation, choose_s, mean_se_over_draws, series_label, wide

KL_METRICS = ("test_kl/quadrature", "test_kl/mog_iwae")  # the first present is the reported test KL
ACCOUNTINGS = {  # forward passes per point per step (method.md §5): title, MAPA Max in units of N/B
    "passes_per_point_decoder": ("decoder-dominated", 1),
    "passes_per_point_encoder_decoder": ("encoder ≈ decoder", 2),
}
DENSITY_EXPERIMENT, BANDWIDTH_EXPERIMENT = "paper_density", "bandwidth"


def experiment_rows(table: pd.DataFrame, prefix: str) -> pd.DataFrame:
    """The rows of the experiments whose name starts with ``prefix``."""
    return table[table["experiment"].fillna("").str.startswith(prefix)]


def density_rows(table: pd.DataFrame) -> pd.DataFrame:
    """The density experiment's rows, or the whole table when no run belongs to it (a user's own sweep)."""
    rows = experiment_rows(table, DENSITY_EXPERIMENT)
    return table if rows.empty else rows


def kl_metric(table: pd.DataFrame) -> str | None:
    """The test-KL metric the table has (the exact quadrature's first), or None."""
    present = set(table["metric"].dropna())
    return next((m for m in KL_METRICS if m in present), None)


def completed_runs(table: pd.DataFrame, metrics: list[str] | None = None) -> pd.DataFrame:
    """One row per run whose training completed (``wide``), with the given metrics as columns."""
    w = wide(table, metrics or [])
    return w[w["status_train"].eq("completed").fillna(False)]


@dataclass(frozen=True)
class DensityChoice:
    """The runs the density numbers and claims are read from: ``chosen`` per configuration and draw (restart
    and K fraction chosen on validation data), ``at_s`` each method at its validation-chosen S."""
    metric: str  # the test KL
    select_by: str  # the validation metric every choice was made by
    chosen: pd.DataFrame
    at_s: pd.DataFrame


def density_choice(table: pd.DataFrame, select_by: str) -> DensityChoice | None:
    """The density runs chosen on validation data (``choose_on_validation``, ``choose_s``), or None when the
    table has no test KL (not evaluated)."""
    density = density_rows(table)
    metric = kl_metric(density)
    if metric is None or select_by not in set(density["metric"].dropna()):
        return None
    chosen = choose_on_validation(density, select_by)
    if chosen.empty or metric not in chosen.columns:
        return None
    return DensityChoice(metric, select_by, chosen, choose_s(chosen, select_by))


def density_summary(chosen: pd.DataFrame, metric: str) -> pd.DataFrame:
    """Mean, s.e. and n of ``metric`` over draws per (dataset, method, K_fraction, S) of the chosen runs, with
    ``label`` (the method) and ``k_fractions`` (how many K fractions the choice compared)."""
    agg = mean_se_over_draws(chosen, metric, by=["dataset", "method", "K_fraction", "S"])
    kf = chosen.groupby(["dataset", "method", "S"], dropna=False)["k_fractions"].max().rename("k_fractions")
    agg = agg.merge(kf, left_on=["dataset", "method", "S"], right_index=True, how="left")
    agg.insert(2, "label", agg["method"])
    return agg


def passes_summary(table: pd.DataFrame) -> pd.DataFrame:
    """Mean passes per point of completed training runs per (dataset, label, S, accounting), with N and B;
    empty when no completed run counted its forward passes."""
    columns = ["dataset", "method", "label", "K_fraction", "S", "accounting", "passes_per_point", "runs",
               "n_train", "batch_size"]
    w = completed_runs(table, list(ACCOUNTINGS)).copy()
    present = [m for m in ACCOUNTINGS if m in w.columns]
    if w.empty or not present:
        return pd.DataFrame(columns=columns)
    w["label"] = series_label(w)
    long = w.melt(id_vars=["dataset", "method", "label", "K_fraction", "S", "n_train", "batch_size"],
                  value_vars=present, var_name="accounting", value_name="passes_per_point")
    long = long.dropna(subset=["passes_per_point"])
    keys = ["dataset", "method", "label", "K_fraction", "S", "accounting"]
    out = long.groupby(keys, dropna=False).agg(passes_per_point=("passes_per_point", "mean"),
                                                runs=("passes_per_point", "size"),
                                                n_train=("n_train", "max"), batch_size=("batch_size", "max"))
    return out.reset_index()[columns]


def mapa_n_and_b(passes: pd.DataFrame) -> tuple[int, int] | None:
    """(N, B) of the MAPA runs in a ``passes_summary``: MAPA never needs more than N/B passes per point (the N
    training points per batch of B); None without MAPA runs that record both."""
    mapa = passes[passes["method"].astype(str).str.startswith("mapa")]
    if mapa.empty or mapa["n_train"].isna().all() or mapa["batch_size"].isna().all():
        return None
    return int(mapa["n_train"].max()), int(mapa["batch_size"].max())


def draws_per_configuration(runs: pd.DataFrame) -> pd.Series:
    """How many data draws each configuration of ``runs`` (a wide table) has."""
    keys = ["experiment", "dataset", "method", "K_fraction", "bandwidth", "S"]
    return runs.groupby(keys, dropna=False)["draw"].nunique()
