"""The report's figures, drawn from its summaries (``summaries.density_summary``, ``passes_summary``) with one
style per method (``mapa_exp.sweeps.plots.method_styles``, the same in every figure). Series that coincide
are drawn on top of each other -- the later with a hollow, larger marker -- and named in the caption; no series
is moved to look apart from an equal one."""

from __future__ import annotations

import matplotlib
import matplotlib.ticker
import pandas as pd
import seaborn as sns
from matplotlib.figure import Figure

from mapa_exp.reporting.markdown import method_sort_key
from mapa_exp.reporting.summaries import ACCOUNTINGS, mapa_n_and_b
from mapa_exp.sweeps.plots import coinciding_style, identical_series, kl_axis, legend_right, log_ticks, method_styles

matplotlib.use("Agg")
DODGE = 1.06  # density: distinct series at one S drawn this factor apart on the log axis, so error bars show


def coinciding_series(panel: pd.DataFrame, labels: list[str], y: str) -> dict[str, str]:
    """For each series of ``panel`` (by ``label``, against ``S``) equal to an earlier one in ``labels`` order at
    every S, that earlier series."""
    out = {}
    for a, b in identical_series(panel, "label", "S", y):
        first, later = sorted((a, b), key=labels.index)
        out.setdefault(later, out.get(first, first))
    return out


def _log_s_axis(ax, s_values: list[float]) -> None:
    ax.set_xscale("log")
    ax.set_xticks(s_values, [f"{v:g}" for v in s_values])
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    ax.set_xlim(min(s_values) / 1.3, max(s_values) * 1.3)
    ax.set_xlabel("S (samples per point)")


def density_figure(summary: pd.DataFrame, metric: str) -> Figure:
    """Fig. 2a / D.1: one panel per data set, each method's test KL (mean ± s.e. over draws) against S."""
    sns.set_theme(style="whitegrid", font_scale=0.9)
    datasets = sorted(summary["dataset"].unique())
    labels = sorted(summary["label"].unique(), key=method_sort_key)
    styles = method_styles(labels)
    ncol = min(len(datasets), 3)
    nrow = -(-len(datasets) // ncol)
    fig = Figure(figsize=(4.4 * ncol, 3.6 * nrow))
    axes = fig.subplots(nrow, ncol, squeeze=False)
    scales, same = set(), set()
    for ax, ds in zip(axes.flat, datasets):
        d = summary[summary["dataset"] == ds]
        drawn = [lab for lab in labels if (d["label"] == lab).any()]
        on = coinciding_series(d, drawn, "mean")
        distinct = [lab for lab in drawn if lab not in on]
        for lab in drawn:
            s = d[d["label"] == lab].sort_values("S")
            place = distinct.index(on.get(lab, lab))
            dodge = DODGE ** (place - (len(distinct) - 1) / 2)
            style = coinciding_style(styles[lab]) if lab in on else styles[lab]
            ax.errorbar(s["S"].astype(float) * dodge, s["mean"], yerr=s["se"].fillna(0), capsize=3, label=lab,
                        **{"markersize": 4, **style})
        same |= {f"{first} = {lab} on {ds}" for lab, first in on.items()}
        scales.add(kl_axis(ax, list(d["mean"] - d["se"].fillna(0)) + list(d["mean"] + d["se"].fillna(0))))
        _log_s_axis(ax, sorted({float(v) for v in d["S"]}))
        ax.set_title(ds)
        ax.set_ylabel("test KL (nats per point)")
    for ax in axes.flat[len(datasets):]:
        ax.axis("off")
    caption = (f"Test KL(p_GT || p_model) by {metric.split('/')[1]}, mean ± s.e. over draws; restart and K fraction "
               f"chosen on validation data; methods drawn slightly apart along S; y: {'; '.join(sorted(scales))}")
    if same:
        caption += "\nequal series, drawn at one place (hollow marker): " + "; ".join(sorted(same))
    fig.suptitle(caption, fontsize=9)
    legend_right(fig, axes)
    return fig


def passes_figure(passes: pd.DataFrame) -> Figure:
    """Fig. 2b / D.2: forward passes per point per step against S, one row of panels per data set, one column
    per accounting, each with its own MAPA Max line (N/B decoder-dominated, 2N/B encoder ≈ decoder)."""
    sns.set_theme(style="whitegrid", font_scale=0.9)
    datasets = sorted(passes["dataset"].unique())
    labels = sorted(passes["label"].unique(), key=method_sort_key)
    styles = method_styles(labels)
    accountings = [m for m in ACCOUNTINGS if m in set(passes["accounting"])]
    fig = Figure(figsize=(4.6 * len(accountings), 3.4 * len(datasets)))
    axes = fig.subplots(len(datasets), len(accountings), squeeze=False)
    same = set()
    for i, ds in enumerate(datasets):
        for j, metric in enumerate(accountings):
            title, factor = ACCOUNTINGS[metric]
            ax, d = axes[i, j], passes[(passes["dataset"] == ds) & (passes["accounting"] == metric)]
            drawn = [lab for lab in labels if (d["label"] == lab).any()]
            on = coinciding_series(d, drawn, "passes_per_point")
            for lab in drawn:
                c = d[d["label"] == lab].sort_values("S")
                style = coinciding_style(styles[lab]) if lab in on else styles[lab]
                ax.plot(c["S"].astype(float), c["passes_per_point"], label=lab, **{"markersize": 5, **style})
            same |= {f"{first} = {lab}" for lab, first in on.items()}
            nb = mapa_n_and_b(d)
            if nb is not None:
                cap = factor * nb[0] / nb[1]
                ax.axhline(cap, color="grey", ls="--", lw=1)
                ax.annotate(f"MAPA Max = {'2N/B' if factor == 2 else 'N/B'} = {cap:g}", xy=(0.02, cap),
                            xycoords=("axes fraction", "data"), xytext=(0, 3), textcoords="offset points",
                            fontsize=7, color="dimgrey")
            _log_s_axis(ax, sorted({float(v) for v in d["S"]}) or [1.0])
            if len(d) and d["passes_per_point"].max() > 10 * d["passes_per_point"].min():
                ax.set_yscale("log")
                log_ticks(ax.yaxis)
            ax.set_ylabel("forward passes per point per step")
            ax.set_title(f"{ds}: {title}")
    caption = "Forward passes per data point per gradient step (training, mean over runs); dashed: MAPA Max"
    if same:
        caption += ("\nequal series, drawn on top of each other (hollow marker): " + "; ".join(sorted(same))
                    + (" (the VAE and the IWAE both decode S samples per point)" if "vae = iwae" in same else ""))
    fig.suptitle(caption, fontsize=9)
    legend_right(fig, axes)
    return fig
