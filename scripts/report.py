#!/usr/bin/env python
"""Write docs/REPORT.md from tidy tables: runs and failures, test KL per data set and method (mean ± s.e.
over draws, best restart by validation log-likelihood), training bounds, forward passes, figures, and the
paper's claims (spec §12) checked against these numbers.

    python scripts/report.py TABLE.parquet [TABLE ...] [-o docs/REPORT.md] [--figures docs/figures]

Reads only tidy tables (scripts/collect.py); the figures are drawn by scripts/plot_density.py and
scripts/plot_passes.py into --figures and linked relative to the report.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the sibling plot scripts, also when imported
import plot_density  # noqa: E402
import plot_passes  # noqa: E402

from mapa_exp.io import atomic_write_text  # noqa: E402
from mapa_exp.sweeps.results import best_restarts, mean_se_over_draws, read_table, selection_metric, series_label, wide  # noqa: E402

METHODS = ["vae", "iwae", "mapa", "mapa_gt", "mapa_naive"]


# -- formatting --------------------------------------------------------------------------------
def fmt(mean: float, se: float | None = None, digits: int = 3) -> str:
    if mean is None or (isinstance(mean, float) and math.isnan(mean)):
        return "–"
    if se is None or (isinstance(se, float) and math.isnan(se)):
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def md_table(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in df.itertuples(index=False):
        lines.append("| " + " | ".join("" if (v is None or v is pd.NA) else str(v) for v in row) + " |")
    return "\n".join(lines)


def method_key(label: str):
    first = label.split()[0]
    return (METHODS.index(first) if first in METHODS else len(METHODS), label)


def pivot_mean_se(agg: pd.DataFrame, index: str, columns: str, digits: int = 3) -> pd.DataFrame:
    """A markdown-ready pivot of ``mean ± se (n)`` cells."""
    agg = agg.copy()
    agg["cell"] = [fmt(m, s, digits) + (f" ({n})" if n > 1 else "") for m, s, n in zip(agg["mean"], agg["se"], agg["n"])]
    p = agg.pivot_table(index=index, columns=columns, values="cell", aggfunc="first")
    p = p.reindex(sorted(p.index, key=method_key))
    p.columns = [f"{columns}={c}" for c in p.columns]
    return p.reset_index().fillna("–")


# -- sections ----------------------------------------------------------------------------------
def runs_section(table: pd.DataFrame) -> str:
    runs = table.drop_duplicates(["run_dir", "source"])
    counts = runs.groupby(["source", "status"]).size().rename("runs").reset_index()
    out = ["## Runs", "", md_table(counts), ""]
    bad = runs[~runs["status"].isin(["completed"])]
    if len(bad):
        out += [f"Runs not completed ({len(bad)}; first 20):", ""]
        shown = bad.head(20)[["source", "run", "dataset", "method", "S", "seed", "draw", "status", "reason"]]
        out += [md_table(shown.fillna("")), ""]
    w = wide(table, ["epochs", "wall_time_s"])
    done = w[w["status_train"].eq("completed").fillna(False)]
    if len(done):
        epochs = sorted({int(e) for e in done.get("epochs", pd.Series(dtype=float)).dropna()})
        restarts = done.groupby(["sweep", "dataset", "method", "S", "draw"], dropna=False)["seed"].nunique().max()
        draws = done.groupby(["sweep", "dataset", "method", "S"], dropna=False)["draw"].nunique().max()
        wall = f"{done['wall_time_s'].sum() / 3600:.2f} h ({done['wall_time_s'].sum():.0f} s)" if "wall_time_s" in done else "an unrecorded time"
        out += [f"Scale: epochs {', '.join(map(str, epochs)) or '?'}; up to R = {restarts} restarts and "
                f"D = {draws} draws per configuration; N = {', '.join(str(int(n)) for n in sorted(done['n_train'].dropna().unique())) or '?'} "
                f"training points; {wall} of training in total.", ""]
    return "\n".join(out)


def density_section(table: pd.DataFrame, figures: Path, report_dir: Path) -> tuple[str, pd.DataFrame | None]:
    if plot_density.kl_metric(table) is None:
        return ("## Density (Fig. 2a, D.1)\n\nNo test KL in these tables: the runs were not evaluated "
                "(train with `evaluate=true`, or run `python evaluate.py sweep=<folder>`, then collect again).\n"), None
    agg, metric = plot_density.density_summary(table)
    select_by = selection_metric(table)
    fig = plot_density.draw(table, figures / "density.png")
    out = ["## Density (Fig. 2a, D.1)", "",
           f"Test KL(p_GT ‖ p_model) in nats ({metric}), mean ± standard error over data draws (n = draws); "
           f"per configuration the restart with the highest `{select_by}`. Lower is better.", "",
           f"![test KL]({os.path.relpath(fig, report_dir)})", ""]
    for ds in sorted(agg["dataset"].unique()):
        out += [f"### {ds}", "", md_table(pivot_mean_se(agg[agg["dataset"] == ds], "label", "S")), ""]
    return "\n".join(out), agg


def bounds_section(table: pd.DataFrame) -> str:
    if "val_bound" not in set(table["metric"].dropna()):
        return ""
    best = best_restarts(table, "val_bound")
    best["label"] = series_label(best)
    agg = mean_se_over_draws(best, "val_bound", by=["dataset", "label", "S"])
    out = ["## Training objective", "",
           "The final model's bound on the validation set (nats per point; each method's own objective, so "
           "VAE/IWAE and MAPA numbers bound different models' likelihoods), best restart by that bound, "
           "mean ± s.e. over draws.", ""]
    for ds in sorted(agg["dataset"].unique()):
        out += [f"### {ds}", "", md_table(pivot_mean_se(agg[agg["dataset"] == ds], "label", "S")), ""]
    return "\n".join(out)


def passes_section(table: pd.DataFrame, figures: Path, report_dir: Path) -> tuple[str, pd.DataFrame | None]:
    try:
        s = plot_passes.passes_summary(table)
    except KeyError:
        return "", None
    fig = plot_passes.draw(table, figures / "passes.png")
    out = ["## Forward passes (Fig. 2b, D.2)", "",
           "Forward passes per data point per gradient step during training (mean over runs), "
           "decoder-dominated accounting (MAPA |U|/B, IWAE S) and encoder ≈ decoder (MAPA 2|U|/B, IWAE 1 + S); "
           "the dashed line is MAPA Max = N/B.", "", f"![passes]({os.path.relpath(fig, report_dir)})", ""]
    for ds in sorted(s["dataset"].unique()):
        d = s[(s["dataset"] == ds) & (s["accounting"] == "passes_per_point_decoder")].copy()
        d["mean"], d["se"], d["n"] = d["passes_per_point"], np.nan, 1
        out += [f"### {ds} (decoder-dominated)", "", md_table(pivot_mean_se(d, "label", "S", digits=2)), ""]
    return "\n".join(out), s


def _compare(a: pd.Series, b: pd.Series) -> tuple[float, float]:
    """Difference of means and its standard error (NaN s.e. counts as 0)."""
    se = math.sqrt(np.nan_to_num(a["se"]) ** 2 + np.nan_to_num(b["se"]) ** 2)
    return float(a["mean"] - b["mean"]), se


def _verdict(diff: float, se: float, want_negative: bool) -> str:
    good = diff < 0 if want_negative else diff > 0
    if not good:
        return "does not hold"
    return "holds" if se == 0 or abs(diff) > 2 * se else "holds, within 2 s.e."


def claims_section(density: pd.DataFrame | None, passes: pd.DataFrame | None) -> str:
    out = ["## The paper's claims (spec §12) on these numbers", ""]
    if density is not None and len(density):
        # each method at its best S (lowest mean test KL)
        best = density.sort_values("mean").drop_duplicates(["dataset", "method"]).set_index(["dataset", "method"])
        rows = []
        for ds in sorted(density["dataset"].unique()):
            get = lambda m: best.loc[(ds, m)] if (ds, m) in best.index else None  # noqa: E731
            mapa, gt, naive = get("mapa"), get("mapa_gt"), get("mapa_naive")
            baselines = [b for b in (get("vae"), get("iwae")) if b is not None]
            if mapa is not None and baselines:
                base = min(baselines, key=lambda b: b["mean"])
                d, se = _compare(mapa, base)
                expected = "expected to fail (paper: Clusters is the exception)" if ds == "clusters" else ""
                rows.append([ds, "MAPA < VAE and IWAE", f"{fmt(mapa['mean'], mapa['se'])} vs {fmt(base['mean'], base['se'])} "
                             f"({base.name[1]})", _verdict(d, se, True) + (f"; {expected}" if expected else "")])
            if mapa is not None and gt is not None:
                d, se = _compare(mapa, gt)
                verdict = "holds" if abs(d) <= 2 * se or abs(d) <= 0.05 * max(abs(gt["mean"]), 1e-12) else "does not hold"
                rows.append([ds, "MAPA ≈ MAPA-GT", f"{fmt(mapa['mean'], mapa['se'])} vs {fmt(gt['mean'], gt['se'])}", verdict])
            if mapa is not None and naive is not None:
                d, se = _compare(naive, mapa)
                rows.append([ds, "MAPA-naive worse than MAPA", f"{fmt(naive['mean'], naive['se'])} vs {fmt(mapa['mean'], mapa['se'])}",
                             _verdict(d, se, False)])
        out += ["Density: each method at its best S (lowest mean test KL; mean ± s.e. over draws).", "",
                md_table(pd.DataFrame(rows, columns=["dataset", "claim", "numbers", "verdict"])), ""]
    else:
        out += ["Density claims: not checked (no test KL in the tables).", ""]
    if passes is not None and len(passes):
        p = passes[passes["accounting"] == "passes_per_point_decoder"]
        rows = []
        for ds in sorted(p["dataset"].unique()):
            d = p[p["dataset"] == ds]
            iwae = d[d["method"] == "iwae"].groupby("S")["passes_per_point"].mean()
            mapa = d[d["method"] == "mapa"]
            for lab, m in mapa.groupby("label"):
                m = m.set_index("S")["passes_per_point"]
                common = sorted(set(m.index) & set(iwae.index))
                if common:
                    fewer = sum(m[s] < iwae[s] for s in common)
                    s_max = common[-1]
                    rows.append([ds, f"{lab} needs fewer passes than IWAE at the same S",
                                 f"fewer at {fewer}/{len(common)} S values; at S={s_max}: {m[s_max]:.2f} vs {iwae[s_max]:.2f}",
                                 "holds" if fewer == len(common) else ("holds for S > 1" if fewer >= len(common) - 1 else "does not hold")])
            labels = mapa.groupby("label")["K_fraction"].first().dropna().sort_values()
            if len(labels) > 1:
                lo, hi = labels.index[0], labels.index[-1]
                a = mapa[mapa["label"] == lo].set_index("S")["passes_per_point"]
                b = mapa[mapa["label"] == hi].set_index("S")["passes_per_point"]
                common = sorted(set(a.index) & set(b.index))
                if common:
                    rel = max((b[s] - a[s]) / a[s] for s in common)
                    rows.append([ds, "raising K costs almost nothing", f"{hi} vs {lo}: at most {100 * rel:+.0f}% passes",
                                 "holds" if rel <= 0.25 else "does not hold"])
        out += ["Efficiency (decoder-dominated accounting):", "",
                md_table(pd.DataFrame(rows, columns=["dataset", "claim", "numbers", "verdict"])) if rows else "(no IWAE/MAPA pairs)", ""]
    return "\n".join(out)


def write_report(tables: list[Path], out: Path, figures: Path) -> Path:
    table = pd.concat([read_table(t) for t in tables], ignore_index=True)
    report_dir = out.parent
    density_md, density = density_section(table, figures, report_dir)
    passes_md, passes = passes_section(table, figures, report_dir)
    sweeps = sorted(table["sweep"].dropna().unique())
    experiments = sorted(table["experiment"].dropna().unique())
    header = ["# mapa-exp: reproduction report", "",
              f"Generated {datetime.now(timezone.utc):%Y-%m-%d %H:%M UTC} by `scripts/report.py` from "
              f"{', '.join(f'`{t}`' for t in tables)}.", "",
              f"Experiments: {', '.join(experiments) or '(not recorded)'}; sweeps: {len(sweeps)}; "
              f"runs: {table['run_dir'].nunique()}.", ""]
    parts = ["\n".join(header), runs_section(table), density_md, bounds_section(table), passes_md,
             claims_section(density, passes)]
    atomic_write_text(out, "\n".join(p.rstrip("\n") + "\n" for p in parts if p))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tables", nargs="+", type=Path, help="tidy tables (.parquet or .csv) from scripts/collect.py")
    p.add_argument("-o", "--out", type=Path, default=Path("docs/REPORT.md"))
    p.add_argument("--figures", type=Path, default=None, help="figure folder (default: <report folder>/figures)")
    a = p.parse_args(argv)
    missing = [str(t) for t in a.tables if not t.exists()]
    if missing:
        print(f"error: tables={missing}: no such file", file=sys.stderr)
        return 2
    out = write_report(a.tables, a.out, a.figures or a.out.parent / "figures")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
