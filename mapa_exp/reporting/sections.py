"""The report's sections. Each is a function of the tidy table (and of the summaries computed from it) that
returns a ``Section``: its markdown, the DataFrames it shows (logged as they are to the W&B summary run) and
its figures. A section with nothing to say returns None."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime

import pandas as pd
from matplotlib.figure import Figure
from scipy import stats

from mapa_exp.reporting.claims import (
    BOTH,
    EQUIVALENCE_MARGIN,
    claims_across_datasets,
    density_claims,
    efficiency_claims,
    same_s_comparisons,
    verdict_changes,
)
from mapa_exp.reporting.figures import density_figure, passes_figure
from mapa_exp.reporting.markdown import (
    NOT_RECORDED,
    counted_text,
    counts_by_method_text,
    draws_cell_text,
    experiment_name,
    integers_text,
    markdown_table,
    mean_se_text,
    method_sort_key,
    range_text,
)
from mapa_exp.reporting.priors import FIXED_MAP, INTERPOLATING_MAP, PRIOR_RULES, candidate_labels, candidate_sort_key
from mapa_exp.reporting.summaries import (
    BANDWIDTH_EXPERIMENT,
    DensityChoice,
    completed_runs,
    density_rows,
    density_summary,
    draws_per_configuration,
    experiment_rows,
    kl_metric,
    mapa_n_and_b,
)
from mapa_exp.sweeps.results import best_restarts, mean_se_over_draws, series_label

TITLE = "# mapa-exp: reproduction report"
DATE_PREFIX = "Generated "
PAPER_DATASETS = ["absolute_value", "circle", "clusters", "figure8", "spiral"]
EVALUATORS_TITLE = "The two evaluators"
SENSITIVITY_TITLE = "Sensitivity to MAPA's prior recovery"


@dataclass(frozen=True)
class Section:
    key: str  # a short name: the W&B summary run logs the tables as tables/<key>/<name>
    markdown: str
    tables: dict[str, pd.DataFrame] = field(default_factory=dict)
    figures: dict[str, Figure] = field(default_factory=dict)  # file name (density.png) -> figure


def _s_columns(pivot: pd.DataFrame) -> pd.DataFrame:
    pivot = pivot.reindex(sorted(pivot.index, key=method_sort_key))
    pivot.columns = [f"S={int(c)}" for c in pivot.columns]
    return pivot


def _verdict_text(verdict: str, note: str = "", bold: bool = False) -> str:
    text = f"**{verdict}**" if bold else verdict
    return text + (f" ({note})" if note else "")


def _claim_text(claim: str) -> str:
    return f"**{claim}**" if claim == BOTH else claim


def _evaluated(table: pd.DataFrame) -> pd.DataFrame:
    """One row per run with an evaluation (its identity columns)."""
    return table[table["source"] == "eval"].drop_duplicates("run_dir")


def _checkpoints(table: pd.DataFrame) -> pd.Series:
    return _evaluated(table)["eval_checkpoint"].fillna(NOT_RECORDED).value_counts()


def _val_every_text(table: pd.DataFrame) -> str:
    every = completed_runs(table)["val_every"].dropna()
    if every.empty:
        return "the validation interval is not recorded in these tables"
    return f"validation checked every {range_text(every)} epoch{'s' if every.max() > 1 else ''} (`val_every`)"


# -- sections ----------------------------------------------------------------------------------
def header_section(table: pd.DataFrame, names: list[str], generated: datetime) -> Section:
    experiments = sorted({experiment_name(e) for e in table["experiment"].unique()}) if len(table) else []
    return Section("header", "\n".join([
        TITLE, "",
        f"{DATE_PREFIX}{generated:%Y-%m-%d %H:%M UTC} by `scripts/report.py` from "
        f"{', '.join(f'`{n}`' for n in names)}.", "",
        f"Experiments: {', '.join(experiments) or '(none)'}; runs: {table['run_dir'].nunique()}.", ""]))


def changes_section(by_rule: pd.DataFrame) -> Section | None:
    """What the switch from the fixed 8-bin map to the validation-chosen map changed: None when the tables
    cannot compare the two (no ``@bins=8`` numbers)."""
    old, new = by_rule["candidate"].eq(FIXED_MAP).fillna(False), by_rule["candidate"].isna()
    if not old.any() or not new.any():
        return None
    changes = verdict_changes(by_rule)
    out = ["## What changed since the last report, and why", ""]
    rule = "the fixed 8-bin map (`@bins=8`, the last report's rule) and the map chosen per run on validation data"
    if changes.empty:
        out += [f"No density claim's verdict differs between {rule} (docs/method.md §6).", ""]
        return Section("changes", "\n".join(out), {"changes": changes})
    shown = pd.DataFrame({
        "dataset": changes["dataset"], "claim": changes["claim"].map(_claim_text),
        "fixed 8-bin map": changes["verdict_before"], "validation-chosen map": changes["verdict_now"],
        "MAPA test KL": [f"{a:.3f} → {b:.3f}" for a, b in zip(changes["mapa_kl_before"], changes["mapa_kl_now"])]})
    n = len(changes)
    out += [f"{n} density claim{'s' if n > 1 else ''} change{'' if n > 1 else 's'} verdict between {rule}:", "",
            markdown_table(shown), "",
            "Why: the MAPA family's prior map was a fixed 8-bin smooth map; it is now chosen per run by validation "
            "log-likelihood among the candidates these tables hold (docs/method.md §6; the section "
            f"\"{SENSITIVITY_TITLE}\" gives every claim under each rule).", ""]
    return Section("changes", "\n".join(out), {"changes": changes})


def scale_section(table: pd.DataFrame) -> Section:
    done = completed_runs(table, ["epochs"])
    evaluated = _evaluated(table).set_index("run_dir")["eval_checkpoint"]
    rows, out = [], ["## Scale", ""]
    for exp, d in done.groupby(done["experiment"].map(experiment_name), sort=True):
        mapa = d[d["method"].astype(str).str.startswith("mapa")]
        fractions = sorted({float(f) for f in mapa["K_fraction"].dropna()})
        bandwidths = sorted({float(b) for b in d["bandwidth"].dropna()})
        restarts = d.groupby(["dataset", "method", "K_fraction", "bandwidth", "S", "draw"], dropna=False)["seed"]
        checkpoint = sorted(set(evaluated.reindex(d["run_dir"]).dropna()))
        row = {"experiment": exp, "runs": len(d), "datasets": ", ".join(sorted(d["dataset"].dropna().unique())),
               "methods": ", ".join(sorted(d["method"].dropna().unique(), key=method_sort_key)),
               "K_fractions": ", ".join(f"{f:g}" for f in fractions), "S": integers_text(d["S"]),
               "bandwidths": ", ".join(f"{b:g}" for b in bandwidths), "R": range_text(restarts.nunique()),
               "D": counts_by_method_text(draws_per_configuration(d)), "epochs": integers_text(d.get("epochs", [])),
               "N": integers_text(d["n_train"]), "checkpoint": ", ".join(checkpoint) or "not evaluated"}
        rows.append(row)
        out.append(f"- **{exp}**: {row['runs']} completed runs; data sets {row['datasets']}; methods {row['methods']}"
                   + (f" (MAPA family at K fractions {row['K_fractions']})" if fractions else "")
                   + f"; S in {{{row['S']}}}" + (f"; bandwidths {row['bandwidths']}" if bandwidths else "")
                   + f"; R = {row['R']} restarts and D = {row['D']} draws per configuration; {row['epochs']} epochs; "
                   f"N = {row['N']} training points; evaluated checkpoint: {row['checkpoint']}.")
    return Section("scale", "\n".join(out + [""]), {"scale": pd.DataFrame(rows)})


def candidates_text(candidates: list[str]) -> str:
    """"`bins=null` (the interpolating map), `bins=8`, `bins=16` (smooth maps through B bin means)"."""
    kinds = {"interpolating": [c for c in candidates if c == INTERPOLATING_MAP],
             "smooth": [c for c in candidates if c.startswith("bins=") and c != INTERPOLATING_MAP],
             "mixtures": [c for c in candidates if c.startswith("n_components=")]}
    kinds["other"] = [c for c in candidates if not any(c in v for v in kinds.values())]
    notes = {"interpolating": " (the interpolating map)", "smooth": " (smooth maps through B bin means)",
             "mixtures": " (Gaussian mixtures of C components)", "other": ""}
    return ", ".join(", ".join(f"`{c}`" for c in cs) + notes[k] for k, cs in kinds.items() if cs)


def _prior_rule_text(table: pd.DataFrame) -> str | None:
    """The selection rule for the MAPA family's prior recovery, from the table's candidates and ``prior``."""
    evaluated = _evaluated(table)
    mapa = evaluated[evaluated["method"].astype(str).str.startswith("mapa")]
    if mapa.empty:
        return None
    candidates, chosen = candidate_labels(table), mapa["prior"].dropna().value_counts()
    head = "**Prior recovery** (MAPA family, method.md §6; VAE and IWAE have the fixed N(0, I) prior): "
    if candidates:
        return (head + "per run, the candidate with the highest validation log-likelihood among those the tables "
                f"hold: {candidates_text(candidates)}. "
                f"Chosen (`prior`): {counted_text(chosen) or 'none recorded'}.")
    if len(chosen):
        return head + f"as each run's evaluation records it (`prior`), with no other candidate: {counted_text(chosen)}."
    return (head + "not recorded in these tables (evaluations made before eval.json recorded it; the evaluation's "
            "default then was a fixed 8-bin smooth map).")


def selection_section(table: pd.DataFrame, select_by: str) -> Section:
    checkpoints = _checkpoints(table)
    described = {"best": "the epoch with the best validation bound", "last": "the last epoch"}
    if checkpoints.empty:
        epoch = ("**Epoch**: no run was evaluated; each run's training numbers are those of its last epoch "
                 f"({_val_every_text(table)}).")
    else:
        which = "; ".join(f"`{c}` for {n} run{'s' if n != 1 else ''}" + (f" ({described[c]})" if c in described else "")
                          for c, n in checkpoints.items())
        epoch = (f"**Epoch**: each run is evaluated at the checkpoint its evaluation records (`eval_checkpoint`): "
                 f"{which}; {_val_every_text(table)}.")
    rules = [epoch]
    prior = _prior_rule_text(table)
    if prior:
        rules.append(prior)
    rules += [
        f"**Restart**: per configuration and data draw, the restart (seed) with the highest `{select_by}`.",
        f"**K fraction** (MAPA, MAPA-GT, MAPA-naive): per data set, method and S, the fraction f in "
        f"K = max(1, ceil(f S)) whose chosen restarts have the highest mean `{select_by}` over draws.",
        f"**S** (wherever a method is shown at one S, and in the claims): per data set and method, the S whose "
        f"chosen runs have the highest mean `{select_by}` over draws.",
        "**Claims**: two methods are compared on the same draws, each at its own chosen configuration: paired "
        "differences of test KL, a paired t test (two-sided p, df = draws − 1) and its 95% interval. A directional "
        "claim *holds* when the interval excludes 0 in its favour, *fails* when it excludes 0 against it, and is "
        f"*undecided* otherwise; \"≈\" *holds* when the interval lies within ±{EQUIVALENCE_MARGIN} nats, *fails* "
        "when it lies outside, else *undecided*. No claim is called holding on a tie."]
    out = ["## Selection rules (validation data only)", "", *(f"{i}. {r}" for i, r in enumerate(rules, 1)), "",
           "Test data give only the reported numbers.", ""]
    return Section("selection", "\n".join(out), {"checkpoints": checkpoints.rename("runs").reset_index()})


def runs_section(table: pd.DataFrame) -> Section:
    runs = table.drop_duplicates(["run_dir", "source"]).copy()
    runs["experiment"] = runs["experiment"].map(experiment_name)
    counts = runs.groupby(["experiment", "source", "status"], dropna=False).size().rename("runs").reset_index()
    out, tables = ["## Runs", "", markdown_table(counts), ""], {"runs": counts}
    bad = runs[~runs["status"].isin(["completed"])]
    if len(bad):
        shown = bad.head(20)[["source", "run", "dataset", "method", "S", "seed", "draw", "status", "reason"]]
        out += [f"Runs not completed ({len(bad)}; first 20):", "", markdown_table(shown), ""]
        tables["not_completed"] = bad[["source", "run", "dataset", "method", "S", "seed", "draw", "status", "reason"]]
    done = completed_runs(table, ["wall_time_s", "stack_size"])
    if len(done) and "wall_time_s" in done:
        share = done["wall_time_s"] / done.get("stack_size", pd.Series(1.0, index=done.index)).fillna(1.0)
        out += [f"Training time: {share.sum() / 3600:.1f} core-hours (a stack's time split over its members).", ""]
    return Section("runs", "\n".join(out), tables)


def code_section(tables: Mapping[str, pd.DataFrame]) -> Section:
    """Per input table, the git commits of the code that trained and evaluated its runs."""
    rows = []
    for name, t in tables.items():
        trained = t[(t["source"] == "train") & (t["status"] != "missing")].drop_duplicates("run_dir")
        for stage, runs, column in (("train", trained, "train_commit"), ("eval", _evaluated(t), "eval_commit")):
            for commit, n in runs[column].fillna(NOT_RECORDED).value_counts().sort_index().items():
                rows.append({"table": name, "stage": stage, "commit": commit, "runs": int(n)})
    commits = pd.DataFrame(rows, columns=["table", "stage", "commit", "runs"])

    def listed(name: str, stage: str) -> str:
        c = commits[(commits["table"] == name) & (commits["stage"] == stage)]
        return "; ".join(f"{k if k == NOT_RECORDED else '`' + k + '`'} ({n} run{'s' if n != 1 else ''})"
                         for k, n in zip(c["commit"], c["runs"]))

    shown = pd.DataFrame([[f"`{n}`", listed(n, "train") or "–", listed(n, "eval") or "–"] for n in tables],
                         columns=["table", "training code", "evaluation code"])
    return Section("code", "\n".join([
        "## Code", "",
        "The git commits of the code that trained (`train_commit`) and evaluated (`eval_commit`) each table's runs "
        "(`+dirty`: the worktree had uncommitted changes; not recorded: the runs' files predate the record and "
        "`collect.py --train-commit/--eval-commit` was not given).", "", markdown_table(shown), ""]),
        {"commits": commits})


def density_section(choice: DensityChoice | None, figure_link: str) -> Section:
    title = "## Density (Fig. 2a, D.1)"
    if choice is None:
        return Section("density", f"{title}\n\nNo test KL in these tables: the runs were not evaluated.\n")
    summary = density_summary(choice.chosen, choice.metric)
    out = [title, "",
           f"Test KL(p_GT ‖ p_model) in nats (`{choice.metric}`: "
           f"{'exact' if choice.metric.endswith('quadrature') else 'the mixture IWAE'}), mean ± standard error over "
           "draws (n = draws), lower is better; runs chosen by the rules above (f = the K fraction chosen on "
           "validation data).", "", f"![test KL]({figure_link}/density.png)", ""]
    for ds in sorted(summary["dataset"].unique()):
        d = summary[summary["dataset"] == ds].copy()
        d["cell"] = [draws_cell_text(m, s, n) + (f" f={f:g}" if pd.notna(f) and k > 1 else "")
                     for m, s, n, f, k in zip(d["mean"], d["se"], d["n"], d["K_fraction"], d["k_fractions"].fillna(1))]
        p = _s_columns(d.pivot_table(index="method", columns="S", values="cell", aggfunc="first"))
        out += [f"### {ds}", "", markdown_table(p.reset_index().fillna("–")), ""]
    with_k = set(choice.at_s.loc[choice.at_s["K"].notna(), "method"])  # a VAE's config has a K fraction it ignores
    at_s = mean_se_over_draws(choice.at_s, choice.metric, by=["dataset", "method", "K_fraction", "S"])
    at_s = at_s.sort_values(["dataset", "method"], key=lambda c: c.map(method_sort_key) if c.name == "method" else c)
    shown = pd.DataFrame({"dataset": at_s["dataset"], "method": at_s["method"], "S": at_s["S"].astype(int),
                          "K fraction": [f"{f:g}" if pd.notna(f) and m in with_k else "–"
                                         for f, m in zip(at_s["K_fraction"], at_s["method"])],
                          f"test KL ({choice.metric})": [mean_se_text(m, s) + f" ({int(n)})"
                                                         for m, s, n in zip(at_s["mean"], at_s["se"], at_s["n"])]})
    out += ["### Each method at its S chosen on validation data", "", markdown_table(shown), ""]
    return Section("density", "\n".join(out), {"summary": summary, "at_chosen_S": at_s},
                   {"density.png": density_figure(summary, choice.metric)})


def claims_section(choice: DensityChoice | None, passes: pd.DataFrame) -> Section:
    out, tables = ["## The paper's claims (method.md §12) on these numbers", ""], {}
    if choice is None:
        out += ["Density claims: not checked (no test KL in the tables).", ""]
    else:
        claims = density_claims(choice)
        shown = pd.DataFrame({"dataset": claims["dataset"], "claim": claims["claim"].map(_claim_text),
                              "paired difference": claims["difference"],
                              "verdict": [_verdict_text(v, n, c == BOTH) for v, n, c in
                                          zip(claims["verdict"], claims["note"], claims["claim"])]})
        out += [f"Density (test KL, `{choice.metric}`): d = mean paired difference (first − second) over draws, each "
                "method at its own validation-chosen S and K fraction.", "", markdown_table(shown), ""]
        across = claims_across_datasets(claims)
        if len(across):
            out += ["Across data sets (the verdicts above, counted):", "",
                    markdown_table(across.assign(claim=across["claim"].map(_claim_text))), ""]
        same_s = same_s_comparisons(choice)
        if len(same_s):
            out += ["MAPA below IWAE at the same S (paired by draw):", "",
                    markdown_table(same_s[["dataset", "S", "difference", "verdict"]].rename(
                        columns={"difference": "MAPA − IWAE"})), ""]
        tables = {"density": claims, "across_datasets": across, "same_S": same_s}
    efficiency = efficiency_claims(passes)
    if len(efficiency):
        out += ["Efficiency (decoder-dominated accounting; counts, not estimates: no test needed):", "",
                markdown_table(efficiency), ""]
        tables["efficiency"] = efficiency
    return Section("claims", "\n".join(out), tables)


def sensitivity_section(table: pd.DataFrame, by_rule: pd.DataFrame) -> Section | None:
    """Each density claim's verdict under every prior rule; one line when the tables hold no candidates."""
    if by_rule.empty:
        return None
    title = f"## {SENSITIVITY_TITLE}"
    candidates = candidate_labels(table)
    if not candidates:
        return Section("sensitivity", f"{title}\n\nThese tables hold no prior candidates' numbers "
                       "(`<metric>@<candidate>` rows), so the claims cannot be judged under other prior maps.\n")
    rules = [(name, c) for name, c in PRIOR_RULES if (by_rule["rule"] == name).any()]
    if all(c is None for _, c in rules):
        return Section("sensitivity", f"{title}\n\nThese tables hold the candidates {candidates_text(candidates)}, "
                       "but neither the 8-bin smooth map nor the interpolating map: there is no fixed rule to judge "
                       "the claims under.\n")
    metric = kl_metric(density_rows(table)) or "test KL"
    keys = by_rule[by_rule["rule"] == rules[-1][0]][["dataset", "claim"]]
    shown = keys.copy()
    for name, _ in rules:
        r = by_rule[by_rule["rule"] == name].set_index(["dataset", "claim"])
        cells = []
        for ds, claim in zip(keys["dataset"], keys["claim"]):
            if (ds, claim) not in r.index:
                cells.append("–")
                continue
            row = r.loc[(ds, claim)]
            kls = "" if claim == BOTH else f" ({row['first_kl']:.3f} vs {row['second_kl']:.3f})"
            cells.append(_verdict_text(row["verdict"], bold=claim == BOTH) + kls)
        shown[name] = cells
    shown["claim"] = shown["claim"].map(_claim_text)
    described = {FIXED_MAP: "the 8-bin smooth map (`@bins=8`, the last report's rule)",
                 INTERPOLATING_MAP: "the interpolating map (`@bins=null`)"}
    listed = [described[c] for _, c in rules if c is not None]
    out = [title, "",
           "Each density claim's verdict with the MAPA family's prior map fixed to "
           + " or ".join(listed) + ", against the map chosen per run on validation data (the plain metrics: this "
           "report's rule). Under a fixed map every selection step (restart, K fraction, S) uses that map's numbers; "
           "VAE and IWAE have no candidates and the same numbers under every rule. In brackets: the mean test KL "
           f"(`{metric}`) over draws of the claim's first and second method. Candidates in the tables: "
           f"{', '.join(sorted(candidates, key=candidate_sort_key))}.", "",
           markdown_table(shown.reset_index(drop=True)), ""]
    left_out = by_rule.drop_duplicates("rule")
    for rule, n in zip(left_out["rule"], left_out["left_out"]):
        if n:
            out += [f"Under the {rule}, {n} MAPA-family run{'s' if n > 1 else ''} without that candidate's "
                    f"numbers {'are' if n > 1 else 'is'} left out.", ""]
    return Section("sensitivity", "\n".join(out), {"verdicts": by_rule})


def evaluators_section(table: pd.DataFrame) -> Section | None:
    recorded = table[(table["metric"] == "test_loglik_gap/mog_iwae") & table["value"].notna()]
    gap = recorded[["run_dir", "method", "value"]]
    # runs scored by the two evaluators in separate passes: the gap from the two log-likelihoods
    ll = table[table["metric"].isin(["test_loglik/mog_iwae", "test_loglik/quadrature"]) & table["value"].notna()
               & ~table["run_dir"].isin(set(recorded["run_dir"]))]
    both = ll.pivot_table(index=["run_dir", "method"], columns="metric", values="value", aggfunc="first").dropna()
    if len(both) and len(both.columns) == 2:
        computed = (both["test_loglik/mog_iwae"] - both["test_loglik/quadrature"]).rename("value").reset_index()
        gap = pd.concat([gap, computed], ignore_index=True)
    if gap.empty:
        return None
    g = gap["value"].astype(float)
    by = gap.groupby("method")["value"].agg(["size", "mean", lambda v: v.abs().max()]).reset_index()
    by.columns = ["method", "runs", "mean gap", "max abs gap"]
    by = by.sort_values("method", key=lambda s: s.map(method_sort_key)).round(4)
    return Section("evaluators", "\n".join([
        f"## {EVALUATORS_TITLE}", "",
        f"On {len(g)} runs scored by both, the mixture IWAE's test log-likelihood minus the exact quadrature's: mean "
        f"{g.mean():+.4f}, mean |gap| {g.abs().mean():.4f}, max |gap| {g.abs().max():.4f} nats per point (the mixture "
        "IWAE is a bound: it should sit at or just below).", "", markdown_table(by), ""]), {"gaps": by})


def bandwidth_section(table: pd.DataFrame, select_by: str) -> Section | None:
    bw = experiment_rows(table, BANDWIDTH_EXPERIMENT)
    metric = kl_metric(bw) if not bw.empty else None
    if metric is None:
        return None
    best = best_restarts(bw, select_by)
    agg = mean_se_over_draws(best, metric, by=["dataset", "bandwidth"])
    val = mean_se_over_draws(best, select_by, by=["dataset", "bandwidth"])
    agg["cell"] = [mean_se_text(m, s) + f" ({int(n)})" for m, s, n in zip(agg["mean"], agg["se"], agg["n"])]
    p = agg.pivot_table(index="dataset", columns="bandwidth", values="cell", aggfunc="first")
    p.columns = [f"h={c:g}" for c in p.columns]
    chosen = val.sort_values(["dataset", "mean"], ascending=[True, False]).drop_duplicates("dataset")
    picks = ", ".join(f"{r.dataset} h = {r.bandwidth:g}" for r in chosen.itertuples())
    return Section("bandwidth", "\n".join([
        "## Kernel bandwidth (MAPA)", "",
        f"Test KL (`{metric}`) against the kernel bandwidth h (the default is σ² = 0.01), best restart by validation "
        "log-likelihood, mean ± s.e. over draws.", "", markdown_table(p.reset_index().fillna("–")), "",
        f"Bandwidth chosen on validation data: {picks}.", ""]),
        {"test_kl": agg.drop(columns="cell"), "validation": val, "chosen": chosen})


def bounds_section(table: pd.DataFrame) -> Section | None:
    density = density_rows(table)
    if "val_bound" not in set(density["metric"].dropna()):
        return None
    best = best_restarts(density, "val_bound")
    best["label"] = series_label(best)
    agg = mean_se_over_draws(best, "val_bound", by=["dataset", "label", "S"])
    out = ["## Training objective", "",
           "Each run's own bound on the validation set at its last epoch (nats per point; VAE/IWAE and MAPA bound "
           "different models' likelihoods), best restart by that bound, mean ± s.e. over draws.", ""]
    for ds in sorted(agg["dataset"].unique()):
        d = agg[agg["dataset"] == ds].copy()
        d["cell"] = [draws_cell_text(m, s, n) for m, s, n in zip(d["mean"], d["se"], d["n"])]
        p = _s_columns(d.pivot_table(index="label", columns="S", values="cell", aggfunc="first"))
        out += [f"### {ds}", "", markdown_table(p.reset_index().fillna("–")), ""]
    return Section("bounds", "\n".join(out), {"val_bound": agg})


def training_time_section(table: pd.DataFrame) -> Section | None:
    """Wall-clock training time per run (a stack's time split over its members) per data set, method and S, and
    each method's time against the VAE's at the same S: what an iterative training scheme costs."""
    runs = completed_runs(density_rows(table), ["wall_time_s", "stack_size"])
    if runs.empty or "wall_time_s" not in runs or runs["wall_time_s"].isna().all():
        return None
    runs = runs.dropna(subset=["wall_time_s"]).copy()
    size = runs["stack_size"] if "stack_size" in runs else pd.Series(1.0, index=runs.index)
    runs["time_per_run_s"] = runs["wall_time_s"] / size.fillna(1.0)
    agg = (runs.groupby(["dataset", "method", "S"], dropna=False)["time_per_run_s"].agg(["mean", "size"])
           .rename(columns={"mean": "time_per_run_s", "size": "runs"}).reset_index())
    vae = agg[agg["method"] == "vae"].set_index(["dataset", "S"])["time_per_run_s"]
    agg["vs_vae"] = [t / vae.get((d, S), float("nan"))
                     for d, S, t in zip(agg["dataset"], agg["S"], agg["time_per_run_s"])]
    out = ["## Training time", "",
           "Wall-clock seconds per run (a stack's time divided by its members; the shared 2-core machine ran two to "
           "four stacks at a time, so compare within a table), mean over the runs of each cell; in brackets, the "
           "ratio to the VAE's at the same S.", ""]
    for ds in sorted(agg["dataset"].unique()):
        d = agg[agg["dataset"] == ds].copy()
        d["cell"] = [f"{t:.0f}" + ("" if pd.isna(r) else f" (x{r:.2f})")
                     for t, r in zip(d["time_per_run_s"], d["vs_vae"])]
        p = _s_columns(d.pivot_table(index="method", columns="S", values="cell", aggfunc="first"))
        p = p.loc[sorted(p.index, key=method_sort_key)]
        out += [f"### {ds}", "", markdown_table(p.reset_index().fillna("–")), ""]
    return Section("training_time", "\n".join(out), {"training_time": agg})


def passes_section(passes: pd.DataFrame, figure_link: str) -> Section | None:
    if passes.empty:
        return None
    nb = mapa_n_and_b(passes)
    cap = (f"; the dashed line is MAPA Max: N/B in the first accounting, 2N/B in the second (N = {nb[0]}, B = {nb[1]}: "
           f"{nb[0] / nb[1]:g} and {2 * nb[0] / nb[1]:g})") if nb else ""
    out = ["## Forward passes (Fig. 2b, D.2)", "",
           "Forward passes per data point per gradient step during training (mean over runs), decoder-dominated "
           f"accounting (MAPA |U|/B, IWAE S) and encoder ≈ decoder (MAPA 2|U|/B, IWAE 1 + S){cap}.", "",
           f"![passes]({figure_link}/passes.png)", ""]
    for ds in sorted(passes["dataset"].unique()):
        d = passes[(passes["dataset"] == ds) & (passes["accounting"] == "passes_per_point_decoder")]
        p = _s_columns(d.pivot_table(index="label", columns="S", values="passes_per_point", aggfunc="first").round(2))
        out += [f"### {ds} (decoder-dominated)", "", markdown_table(p.reset_index()), ""]
    return Section("passes", "\n".join(out), {"passes": passes}, {"passes.png": passes_figure(passes)})


def _prior_difference_text(table: pd.DataFrame) -> str:
    candidates = candidate_labels(table)
    evaluated = _evaluated(table)
    chosen = evaluated.loc[evaluated["method"].astype(str).str.startswith("mapa"), "prior"].dropna().value_counts()
    if candidates:
        return (f"chosen per run on validation data (method.md §6) among {candidates_text(candidates)}; chosen: "
                f"{counted_text(chosen) or 'none recorded'}; \"{SENSITIVITY_TITLE}\" shows what the choice decides")
    if len(chosen):
        return f"as each run's evaluation records it: {counted_text(chosen)} (method.md §6)"
    return ("not recorded in these tables (evaluations made before eval.json recorded it; the evaluation's default "
            "then was a fixed 8-bin smooth map, method.md §6)")


def differences_section(table: pd.DataFrame, choice: DensityChoice | None, evaluators: bool) -> Section:
    done = completed_runs(table, ["epochs"])
    ran = sorted(done["dataset"].dropna().unique())
    missing = [d for d in PAPER_DATASETS if d not in ran]
    out = ["## What differs from the paper's setting, and why", "",
           f"- **Scale.** {integers_text(done.get('epochs', []))} epochs with the restarts and draws stated above and "
           f"S in {{{integers_text(done.get('S', []))}}}; the paper used R = D = 5, S in {{1, 2, 5, 10, 20, 50, 100}} "
           "and 1,000–2,000 epochs. Restarts, draws and S values cost CPU time here (2 cores); the stated grid is "
           "what fit."]
    if missing:
        out.append(f"- **Data sets.** Not in these tables: {', '.join(missing)}; the paper's claims are judged on "
                   f"{', '.join(ran)} only.")
    out.append("- **Ground truths.** The analytic shapes' constants were stripped from the paper; ours are in "
               "method.md §10. The data are drawn from a fitted surrogate network of the methods' own architecture, "
               "so the truth lies in the model class.")
    if choice is None:
        out.append("- **Evaluation.** Not evaluated: these tables hold no test KL.")
    elif choice.metric.endswith("quadrature"):
        out.append("- **Evaluation.** Test KL by exact quadrature (1-D latents) instead of the paper's mixture IWAE"
                   + (f"; the mixture IWAE is reported beside it on a subset (\"{EVALUATORS_TITLE}\") to show the two "
                      "agree." if evaluators else "."))
    else:
        out.append("- **Evaluation.** Test KL by the mixture IWAE, as in the paper.")
    out.append("- **MAPA's prior.** Recovered from the codes by a monotone copula map where the paper fits a small "
               f"regression network; the map: {_prior_difference_text(table)}.")
    checkpoints = _checkpoints(table)
    epoch = {"best": "its best validation epoch", "last": "its last epoch"}
    at = " or ".join(epoch.get(c, f"checkpoint {c}") for c in checkpoints.index) or "its last epoch (not evaluated)"
    out.append(f"- **Model selection.** Each run at {at} (`eval_checkpoint`; the paper does not say which epoch it "
               "reports); K fraction, restart and S chosen on validation data as the paper does for K.")
    if choice is not None:
        draws = draws_per_configuration(choice.at_s)
        if int(draws.min()) >= 2:
            def test_text(d: int) -> str:
                return (f"{d - 1} degree{'s' if d > 2 else ''} of freedom and a 95% interval "
                        f"±{float(stats.t.ppf(0.975, d - 1)):.2f} standard errors wide")
            ds = draws.astype(int).value_counts().sort_index(ascending=False).sort_values(
                ascending=False, kind="stable").index  # the most common count first
            others = "; ".join(f"{test_text(d)} at D = {d}" for d in ds[1:])
            out.append(f"- **Statistics.** With D = {counts_by_method_text(draws)} draws, paired t tests have "
                       f"{test_text(ds[0])}{f' ({others})' if others else ''}: only large, consistent differences "
                       "are decided, and the rest is reported as undecided rather than as a tie.")
        else:
            out.append(f"- **Statistics.** With D = {counts_by_method_text(draws)} draw{'s' if draws.max() > 1 else ''} some "
                       "comparisons have a single pair: no test, so they are reported as undecided.")
    return Section("differences", "\n".join(out + [""]))
