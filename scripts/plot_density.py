#!/usr/bin/env python
"""Figure 2a / D.1: test KL of each method per data set against S, mean ± standard error over the data
draws; per configuration and draw the restart, and per S the MAPA family's K fraction, chosen by validation
log-likelihood (mapa_exp.sweeps.results.choose_on_validation).

    python scripts/plot_density.py TABLE.parquet [-o docs/figures/density.png] [--metric test_kl/quadrature]

Reads only the tidy table written by scripts/collect.py.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import matplotlib
import matplotlib.ticker

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import seaborn as sns  # noqa: E402

from mapa_exp.cli import description  # noqa: E402
from mapa_exp.sweeps.plots import identical_series, kl_axis, legend_right, save, series_styles
from mapa_exp.sweeps.results import choose_on_validation, mean_se_over_draws, read_table, selection_metric  # noqa: E402

KL_METRICS = ("test_kl/quadrature", "test_kl/mog_iwae")
METHOD_ORDER = ["vae", "iwae", "mapa", "mapa_gt", "mapa_naive"]


def kl_metric(table) -> str | None:
    """The test-KL metric the table has (the exact quadrature one first), or None."""
    present = set(table["metric"].dropna())
    return next((m for m in KL_METRICS if m in present), None)


def density_summary(table, metric: str | None = None, select_by: str | None = None):
    """mean, se, n of the test KL over draws per (dataset, method, S), the runs chosen on validation data; the
    chosen K fraction of the MAPA family in column ``K_fraction``."""
    metric = metric or kl_metric(table)
    if metric is None:
        raise KeyError(f"the table has no test KL ({' or '.join(KL_METRICS)}): run the evaluation stage first")
    chosen = choose_on_validation(table, select_by or selection_metric(table))
    chosen["label"] = chosen["method"]
    agg = mean_se_over_draws(chosen, metric, by=["dataset", "method", "label", "K_fraction", "S"])
    return agg, metric


def draw(table, out: Path, metric: str | None = None, select_by: str | None = None) -> Path:
    """Draw the figure into ``out`` (PNG); returns its path."""
    agg, metric = density_summary(table, metric, select_by)
    sns.set_theme(style="whitegrid", font_scale=0.9)
    datasets = sorted(agg["dataset"].unique())
    labels = sorted(agg["label"].unique(), key=lambda s: (METHOD_ORDER.index(s.split()[0]) if s.split()[0] in METHOD_ORDER else 99, s))
    styles = series_styles(labels)
    ncol = min(len(datasets), 3)
    nrow = -(-len(datasets) // ncol)
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.4 * ncol, 3.6 * nrow), squeeze=False)
    scales, same = set(), set()
    for ax, ds in zip(axes.flat, datasets):
        d = agg[agg["dataset"] == ds]
        for i, lab in enumerate(labels):
            s = d[d["label"] == lab].sort_values("S")
            if s.empty:
                continue
            dodge = 1.06 ** (i - (len(labels) - 1) / 2)  # side by side on the log axis, not on top of each other
            ax.errorbar(s["S"].astype(float) * dodge, s["mean"], yerr=s["se"].fillna(0), ms=4, capsize=3, label=lab,
                        **styles[lab])
        ax.set_xscale("log")
        scales.add(kl_axis(ax, list(d["mean"] - d["se"].fillna(0)) + list(d["mean"] + d["se"].fillna(0))))
        same |= {f"{a} = {b} on {ds}" for a, b in identical_series(d, "label", "S", "mean")}
        s_values = sorted({float(v) for v in d["S"]})
        ax.set_xticks(s_values, [f"{v:g}" for v in s_values])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.set_xlim(min(s_values) / 1.3, max(s_values) * 1.3)
        ax.set_title(ds)
        ax.set_xlabel("S (samples per point)")
        ax.set_ylabel("test KL (nats per point)")
    for ax in axes.flat[len(datasets):]:
        ax.axis("off")
    caption = (f"Test KL(p_GT || p_model) by {metric.split('/')[1]}, mean ± s.e. over draws; restart and K fraction "
               f"chosen on validation data; y: {'; '.join(sorted(scales))}")
    if same:
        caption += "\nidentical series (drawn side by side): " + "; ".join(sorted(same))
    fig.suptitle(caption, fontsize=9)
    legend_right(fig, axes)
    save(fig, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("table", type=Path)
    p.add_argument("-o", "--out", type=Path, default=None, help="default: density.png beside the table")
    p.add_argument("--metric", default=None, help=f"default: the first of {KL_METRICS} in the table")
    p.add_argument("--select-by", default=None, help="restart selection metric (default: validation log-likelihood)")
    a = p.parse_args(argv)
    try:
        out = draw(read_table(a.table), a.out or a.table.with_name("density.png"), a.metric, a.select_by)
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
