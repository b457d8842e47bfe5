"""Figures drawn with seaborn from tidy tables only (never from models or run folders)."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

# one style per method, shared by every figure: a method keeps its colour and marker wherever it is drawn
METHOD_COLOURS = {"vae": "tab:orange", "iwae": "tab:green", "mapa": "tab:blue", "mapa_gt": "tab:purple",
                  "mapa_naive": "tab:red"}
METHOD_MARKERS = {"vae": "o", "iwae": "s", "mapa": "^", "mapa_gt": "D", "mapa_naive": "v"}
OTHER_COLOURS = ["tab:brown", "tab:pink", "tab:gray", "tab:olive", "tab:cyan"]
OTHER_MARKERS = ["P", "X", "*", "<", ">"]
RULE_LINESTYLES = ["-", "--", "-.", ":"]  # a method's K rules (series_label), in sorted order
CURVE_COLOURS = {"true": "black", "empirical": "tab:red", "mapa": METHOD_COLOURS["mapa"]}
CURVE_LABELS = {"true": "true posterior (Eq 11)", "empirical": "empiricalized posterior (Eq 7)", "mapa": "MAPA (Eq 8)"}


def posterior_trends_figure(table: pd.DataFrame, title: str, floor: float = 30.0):
    """One panel per (variant, point): the true and empiricalized log-posteriors as lines and MAPA's
    q as dots, against the codes z. The y-axis shows ``floor`` nats below the panel's maximum (the
    tails lie hundreds of nats down and would flatten the part that matters)."""
    sns.set_theme(style="whitegrid", font_scale=0.8)
    variants, points = list(table["variant"].unique()), list(table["point"].unique())
    fig, axes = plt.subplots(len(variants), len(points), figsize=(3.2 * len(points), 2.6 * len(variants)),
                             squeeze=False, sharey=False)
    for i, v in enumerate(variants):
        for j, p in enumerate(points):
            ax, panel = axes[i, j], table[(table["variant"] == v) & (table["point"] == p)].sort_values("z")
            for curve in ("mapa", "empirical", "true"):
                c = panel[panel["curve"] == curve]
                if curve == "mapa":
                    ax.scatter(c["z"], c["log_density"], s=3, color=CURVE_COLOURS[curve], label=CURVE_LABELS[curve], alpha=0.6)
                else:
                    ax.plot(c["z"], c["log_density"], color=CURVE_COLOURS[curve], lw=1.3,
                            ls="-" if curve == "true" else "--", label=CURVE_LABELS[curve])
            top = panel["log_density"].max()
            ax.set_ylim(top - floor, top + 3)
            ax.set_title(f"{v}, point {p}" if len(variants) > 1 else f"point {p}")
            ax.set_xlabel("latent code z_m")
            if j == 0:
                ax.set_ylabel("log density (x N for Eq 7/8)")
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.suptitle(title)
    band = 0.45 / fig.get_figheight()  # a legend row below the panels, clear of their axis labels
    fig.tight_layout(rect=(0, band, 1, 1))
    fig.legend(handles, labels, loc="lower center", ncol=3, bbox_to_anchor=(0.5, 0.0), frameon=False)
    return fig


def decoders_figure(curves: pd.DataFrame, data: pd.DataFrame, title: str):
    """Each variant's decoder f(z) drawn over the data, coloured by z: columns variant, z, x1, x2."""
    variants = list(curves["variant"].unique())
    fig, axes = plt.subplots(1, len(variants), figsize=(3.6 * len(variants) + 0.8, 3.4), squeeze=False)
    points = None
    for ax, v in zip(axes[0], variants):
        ax.scatter(data["x1"], data["x2"], s=3, c="0.8", label="training data")
        c = curves[curves["variant"] == v]
        points = ax.scatter(c["x1"], c["x2"], c=c["z"], s=4, cmap="viridis", label="decoder f(z)")
        ax.set_title(v)
        ax.set_xlabel("x1")
        ax.set_ylabel("x2")
        ax.set_aspect("equal")
    axes[0, 0].legend(fontsize=7, markerscale=3, loc="best")
    fig.suptitle(title)
    fig.tight_layout()
    if points is not None:
        fig.colorbar(points, ax=list(axes[0]), label="latent code z (each variant's own)", shrink=0.9)
    return fig




def method_styles(labels: list[str]) -> dict[str, dict]:
    """A colour, marker and line style per series label ("mapa", "mapa K=ceil(0.1S)"): the colour and marker
    are the method's (the label's first word; ``METHOD_COLOURS``, the same in every figure), the line style tells
    one method's K rules apart. Methods outside the palette get the remaining colours in sorted order."""
    methods = {lab: lab.split()[0] if lab.split() else lab for lab in labels}
    others = sorted({m for m in methods.values() if m not in METHOD_COLOURS})
    styles = {}
    for lab, method in methods.items():
        k = others.index(method) if method in others else 0
        rules = sorted(other for other, m in methods.items() if m == method)
        styles[lab] = {"color": METHOD_COLOURS.get(method, OTHER_COLOURS[k % len(OTHER_COLOURS)]),
                       "marker": METHOD_MARKERS.get(method, OTHER_MARKERS[k % len(OTHER_MARKERS)]),
                       "linestyle": RULE_LINESTYLES[rules.index(lab) % len(RULE_LINESTYLES)]}
    return styles


def coinciding_style(style: dict) -> dict:
    """``style`` for a series that lies exactly on an earlier one: a wide translucent line under it and a hollow,
    larger marker around its markers, so both show at the same place and read as one value."""
    return {**style, "linewidth": 4.5, "alpha": 0.45, "zorder": 1.5, "markerfacecolor": "none", "markersize": 10,
            "markeredgewidth": 1.6}


def identical_series(frame: pd.DataFrame, label: str, x: str, y: str) -> list[tuple[str, str]]:
    """Pairs of series (by ``label``) whose y values are equal at every shared x: one would hide the other."""
    series = {lab: g.set_index(x)[y] for lab, g in frame.groupby(label)}
    names = sorted(series)
    out = []
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            common = series[a].index.intersection(series[b].index)
            gap = (series[a][common] - series[b][common]).abs().max() if len(common) else None
            if gap is not None and gap <= 1e-9 * max(1.0, series[a][common].abs().max()):
                out.append((a, b))
    return out


def log_ticks(axis, one_two_five: bool = True) -> None:
    """Readable ticks on a log axis: plain numbers (0.5, 2, 50 -- not 5 x 10^-1), at 1-2-5 steps if asked,
    and no labels on minor ticks."""
    import matplotlib.ticker as ticker

    if one_two_five:
        axis.set_major_locator(ticker.LogLocator(subs=(1.0, 2.0, 5.0)))
    axis.set_major_formatter(ticker.FuncFormatter(lambda t, _: f"{t:g}"))
    axis.set_minor_formatter(ticker.NullFormatter())


def kl_axis(ax, values) -> str:
    """A log axis for a test KL when every value is positive, else symlog (linear within the smallest positive
    value's decade); readable ticks either way. Returns the scale's description for the caption."""
    import matplotlib.ticker as ticker
    import numpy as np

    v = np.asarray([x for x in values if np.isfinite(x)], dtype=float)
    positive = v[v > 0]
    if len(v) and (v > 0).all():
        ax.set_yscale("log")
        lo, hi = positive.min(), positive.max()
        ax.set_ylim(lo / 1.5, hi * 1.5)
        log_ticks(ax.yaxis, one_two_five=hi / lo < 100)  # within a couple of decades: 1-2-5 steps too
        return "log scale"
    thresh = 10 ** np.floor(np.log10(positive.min())) if len(positive) else 1e-3
    ax.set_yscale("symlog", linthresh=thresh)
    ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda t, _: f"{t:g}"))
    return f"symmetric log scale, linear within ±{thresh:g} (some values are <= 0)"


def legend_right(fig, axes) -> None:
    """One legend for the whole figure, right of the panels: every label of every panel, once."""
    legend = {}
    for ax in axes.flat:
        for handle, name in zip(*ax.get_legend_handles_labels()):
            legend.setdefault(name, handle)
    fig.tight_layout()
    fig.legend(list(legend.values()), list(legend), loc="center left", bbox_to_anchor=(1.0, 0.5), frameon=False)


def save(fig, path) -> None:
    """Write a figure atomically (temporary name, then rename)."""
    import io as _io

    from mapa_exp.io import atomic_write_bytes

    buf = _io.BytesIO()
    fig.savefig(buf, format="png", dpi=130, bbox_inches="tight")
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())
