#!/usr/bin/env python
"""Figure 2b / D.2: forward passes per data point per gradient step against S, IWAE and MAPA (each K rule),
in both accountings of method.md §5 -- decoder-dominated (MAPA |U|/B vs IWAE S) and encoder ≈ decoder
(MAPA 2|U|/B vs IWAE 1+S) -- with the "MAPA Max" line: MAPA never needs more than the N training points
per batch of B (N/B per point, 2N/B in the second accounting).

    python scripts/plot_passes.py TABLE.parquet [-o docs/figures/passes.png]

Reads only the tidy table written by scripts/collect.py (completed training runs).
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
from mapa_exp.sweeps.plots import identical_series, legend_right, log_ticks, save, series_styles
from mapa_exp.sweeps.results import read_table, series_label, wide  # noqa: E402

ACCOUNTINGS = {
    "passes_per_point_decoder": ("decoder-dominated", 1),
    "passes_per_point_encoder_decoder": ("encoder ≈ decoder", 2),
}


def passes_summary(table):
    """Mean passes per point of completed training runs per (dataset, label, S, accounting), with N and B."""
    w = wide(table, list(ACCOUNTINGS))
    w = w[w["status_train"].eq("completed").fillna(False)].copy()
    present = [m for m in ACCOUNTINGS if m in w.columns]
    if w.empty or not present:
        raise KeyError("the table has no completed training runs with forward-pass counts")
    w["label"] = series_label(w)
    long = w.melt(id_vars=["dataset", "method", "label", "K_fraction", "S", "n_train", "batch_size"],
                  value_vars=present, var_name="accounting", value_name="passes_per_point").dropna(subset=["passes_per_point"])
    keys = ["dataset", "method", "label", "K_fraction", "S", "accounting"]
    out = long.groupby(keys, dropna=False).agg(passes_per_point=("passes_per_point", "mean"),
                                                runs=("passes_per_point", "size"),
                                                n_train=("n_train", "max"), batch_size=("batch_size", "max"))
    return out.reset_index()


def draw(table, out: Path) -> Path:
    s = passes_summary(table)
    sns.set_theme(style="whitegrid", font_scale=0.9)
    datasets = sorted(s["dataset"].unique())
    labels = sorted(s["label"].unique())
    styles = series_styles(labels)
    accountings = [m for m in ACCOUNTINGS if m in set(s["accounting"])]
    fig, axes = plt.subplots(len(datasets), len(accountings), figsize=(4.6 * len(accountings), 3.4 * len(datasets)),
                             squeeze=False)
    same = set()
    for i, ds in enumerate(datasets):
        for j, metric in enumerate(accountings):
            title, factor = ACCOUNTINGS[metric]
            ax, d = axes[i, j], s[(s["dataset"] == ds) & (s["accounting"] == metric)]
            for k, lab in enumerate(labels):
                c = d[d["label"] == lab].sort_values("S")
                if not c.empty:
                    dodge = 1.05 ** (k - (len(labels) - 1) / 2)  # coinciding series side by side, not hidden
                    ax.plot(c["S"].astype(float) * dodge, c["passes_per_point"], ms=5, label=lab, **styles[lab])
            same |= {f"{a} = {b}" for a, b in identical_series(d, "label", "S", "passes_per_point")}
            mapa = d[d["method"].str.startswith("mapa")]
            if not mapa.empty and mapa["n_train"].notna().any() and mapa["batch_size"].notna().any():
                cap = factor * float(mapa["n_train"].max()) / float(mapa["batch_size"].max())
                ax.axhline(cap, color="grey", ls="--", lw=1, label="MAPA Max (N/B)")
            ax.set_xscale("log")
            s_values = sorted({float(v) for v in d["S"]}) or [1.0]
            ax.set_xticks(s_values, [f"{v:g}" for v in s_values])
            ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
            if len(d) and d["passes_per_point"].max() > 10 * d["passes_per_point"].min():
                ax.set_yscale("log")
                log_ticks(ax.yaxis)
            ax.set_xlabel("S (samples per point)")
            ax.set_ylabel("forward passes per point per step")
            ax.set_title(f"{ds}: {title}")
    caption = "Forward passes per data point per gradient step (training, mean over runs)"
    if same:
        caption += "\nidentical series, drawn side by side: " + "; ".join(sorted(same)) + \
            " (the VAE and the IWAE both decode S samples per point)"
    fig.suptitle(caption, fontsize=9)
    legend_right(fig, axes)
    save(fig, out)
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("table", type=Path)
    p.add_argument("-o", "--out", type=Path, default=None, help="default: passes.png beside the table")
    a = p.parse_args(argv)
    try:
        out = draw(read_table(a.table), a.out or a.table.with_name("passes.png"))
    except KeyError as exc:
        print(f"error: {exc.args[0]}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
