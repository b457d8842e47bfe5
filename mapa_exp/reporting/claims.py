"""The paper's claims (method.md §12) judged on the tidy table: density claims by paired t tests across draws
(mapa_exp.sweeps.statistics), efficiency claims by counts, and the density claims under each prior rule.

Every function returns a DataFrame, one row per (data set, claim); the sections render them."""

from __future__ import annotations

import math

import pandas as pd

from mapa_exp.reporting.priors import FIXED_MAP, prior_rules_in, runs_lacking_candidate, table_under_prior
from mapa_exp.reporting.summaries import DensityChoice, density_choice
from mapa_exp.sweeps.statistics import OUTCOMES, directional, equivalent, paired_difference

EQUIVALENCE_MARGIN = 0.01  # nats: "MAPA ≈ MAPA-GT" means their test KLs differ by less than this
EXCEPTION_DATASET = "clusters"  # where the paper itself reports MAPA above the VAE and IWAE
BOTH = "MAPA below VAE and IWAE"
CLAIM_COLUMNS = ["dataset", "claim", "first", "second", "first_kl", "second_kl", "n", "d", "lo", "hi", "t", "p",
                 "difference", "verdict", "note"]
EFFICIENCY_COLUMNS = ["dataset", "claim", "numbers", "verdict"]
RAISING_K_LIMIT = 0.25  # "raising K costs almost nothing": at most this much more passes per point


def _draw_values(at_s: pd.DataFrame, dataset: str, method: str, metric: str) -> pd.Series:
    d = at_s[(at_s["dataset"] == dataset) & (at_s["method"] == method)]
    return d.set_index("draw")[metric].astype(float)


def _claim(dataset, claim, first, second, a: pd.Series, b: pd.Series, verdict_of, note="") -> dict:
    p = paired_difference(a, b)
    return {"dataset": dataset, "claim": claim, "first": first, "second": second, "first_kl": a.mean(),
            "second_kl": b.mean(), "n": p.n, "d": p.mean, "lo": p.lo, "hi": p.hi, "t": p.t, "p": p.p,
            "difference": p.text(), "verdict": verdict_of(p), "note": note}


def density_claims(choice: DensityChoice) -> pd.DataFrame:
    """Per data set with MAPA: MAPA below the VAE, below the IWAE, below both; MAPA ≈ MAPA-GT (within
    ``EQUIVALENCE_MARGIN``); MAPA-naive above MAPA -- each method at its validation-chosen S and K fraction,
    paired by draw. ``first_kl`` / ``second_kl``: the two methods' mean test KL over their draws."""
    at_s, metric, rows = choice.at_s, choice.metric, []
    for ds in sorted(at_s["dataset"].unique()):
        present = set(at_s.loc[at_s["dataset"] == ds, "method"])
        if "mapa" not in present:
            continue
        mapa = _draw_values(at_s, ds, "mapa", metric)
        note = "the paper's exception" if ds == EXCEPTION_DATASET else ""
        below = []
        for base in ("vae", "iwae"):
            if base in present:
                rows.append(_claim(ds, f"MAPA below {base.upper()}", "mapa", base, mapa,
                                   _draw_values(at_s, ds, base, metric), lambda p: directional(p, below=True), note))
                below.append(rows[-1]["verdict"])
        if below:
            both = "holds" if all(v == "holds" for v in below) else ("fails" if "fails" in below else "undecided")
            rows.append({"dataset": ds, "claim": BOTH, "first": "mapa", "second": "vae, iwae", "first_kl": mapa.mean(),
                         "second_kl": math.nan, "n": len(mapa), "difference": "both of the above", "verdict": both,
                         "note": note})
        if "mapa_gt" in present:
            rows.append(_claim(ds, f"MAPA ≈ MAPA-GT (±{EQUIVALENCE_MARGIN})", "mapa", "mapa_gt", mapa,
                               _draw_values(at_s, ds, "mapa_gt", metric),
                               lambda p: equivalent(p, EQUIVALENCE_MARGIN)))
        if "mapa_naive" in present:
            rows.append(_claim(ds, "MAPA-naive above MAPA", "mapa_naive", "mapa",
                               _draw_values(at_s, ds, "mapa_naive", metric), mapa,
                               lambda p: directional(p, below=False)))
    return pd.DataFrame(rows, columns=CLAIM_COLUMNS)


def claims_across_datasets(claims: pd.DataFrame) -> pd.DataFrame:
    """Per claim, the data sets where it holds, fails and is undecided ("1: figure8", or "0"); empty for fewer
    than two data sets (nothing to count)."""
    if claims["dataset"].nunique() < 2:
        return pd.DataFrame(columns=["claim", *OUTCOMES])
    rows = []
    for claim in dict.fromkeys(claims["claim"]):
        c = claims[claims["claim"] == claim]
        got = {o: sorted(c.loc[c["verdict"] == o, "dataset"]) for o in OUTCOMES}
        rows.append([claim] + [f"{len(got[o])}: {', '.join(got[o])}" if got[o] else "0" for o in OUTCOMES])
    return pd.DataFrame(rows, columns=["claim", *OUTCOMES])


def same_s_comparisons(choice: DensityChoice) -> pd.DataFrame:
    """MAPA minus IWAE at every S (both at that S, K fraction and restart chosen on validation), paired by draw."""
    rows = []
    for (ds, S), d in choice.chosen.groupby(["dataset", "S"]):
        if {"mapa", "iwae"} <= set(d["method"]):
            p = paired_difference(*(d[d["method"] == m].set_index("draw")[choice.metric].astype(float)
                                    for m in ("mapa", "iwae")))
            rows.append([ds, int(S), p.n, p.mean, p.lo, p.hi, p.t, p.p, p.text(), directional(p, below=True)])
    return pd.DataFrame(rows, columns=["dataset", "S", "n", "d", "lo", "hi", "t", "p", "difference", "verdict"])


def efficiency_claims(passes: pd.DataFrame) -> pd.DataFrame:
    """Decoder-dominated passes per point (``passes_summary``): each MAPA K rule against the IWAE at the same S,
    and whether the largest K fraction costs at most ``RAISING_K_LIMIT`` more than the smallest."""
    p = passes[passes["accounting"] == "passes_per_point_decoder"]
    rows = []
    for ds in sorted(p["dataset"].unique()):
        d = p[p["dataset"] == ds]
        iwae = d[d["method"] == "iwae"].groupby("S")["passes_per_point"].mean()
        mapa = d[d["method"] == "mapa"]
        for lab, m in mapa.groupby("label"):
            m = m.set_index("S")["passes_per_point"]
            common = sorted(set(m.index) & set(iwae.index))
            if not common:
                continue
            fewer = [s for s in common if m[s] < iwae[s]]
            top = common[-1]
            verdict = "holds" if len(fewer) == len(common) else (
                "holds for S > 1" if set(common) - set(fewer) <= {1} else "fails")
            rows.append([ds, f"{lab}: fewer decoder passes than IWAE at the same S",
                         f"fewer at S in {{{', '.join(str(int(s)) for s in fewer)}}} of {len(common)}; at S = "
                         f"{int(top)}: {m[top]:.2f} vs {iwae[top]:.2f} ({m[top] / iwae[top]:.2f}x)", verdict])
        fractions = mapa.groupby("label")["K_fraction"].first().dropna().sort_values()
        if len(fractions) > 1:
            lo, hi = fractions.index[0], fractions.index[-1]
            a = mapa[mapa["label"] == lo].set_index("S")["passes_per_point"]
            b = mapa[mapa["label"] == hi].set_index("S")["passes_per_point"]
            common = sorted(set(a.index) & set(b.index))
            if common:
                rel = max((b[s] - a[s]) / a[s] for s in common)
                rows.append([ds, "raising K costs almost nothing", f"{hi} vs {lo}: at most {100 * rel:+.0f}% passes",
                             "holds" if rel <= RAISING_K_LIMIT else "fails"])
    return pd.DataFrame(rows, columns=EFFICIENCY_COLUMNS)


def claims_under_prior_rules(table: pd.DataFrame, select_by: str) -> pd.DataFrame:
    """The density claims under every prior rule the table allows (``prior_rules_in``): the table rewritten by
    ``table_under_prior`` -- MAPA-family runs read with that candidate's numbers in every step (restart, K
    fraction, S, claim), VAE and IWAE with their own -- then ``density_claims``. Long: ``rule``, ``candidate``
    (None: validation-chosen), ``left_out`` (MAPA-family runs without that candidate), and the claim columns."""
    frames = []
    for rule, candidate in prior_rules_in(table):
        choice = density_choice(table_under_prior(table, candidate), select_by)
        if choice is None:
            continue
        claims = density_claims(choice)
        left_out = 0 if candidate is None else len(runs_lacking_candidate(table, candidate))
        frames.append(claims.assign(rule=rule, candidate=candidate, left_out=left_out))
    columns = ["rule", "candidate", "left_out", *CLAIM_COLUMNS]
    return pd.concat(frames, ignore_index=True)[columns] if frames else pd.DataFrame(columns=columns)


def verdict_changes(by_rule: pd.DataFrame, before: str = FIXED_MAP) -> pd.DataFrame:
    """The claims (``claims_under_prior_rules``) whose verdict under the ``before`` candidate's rule differs from
    the validation-chosen rule's, with both verdicts and MAPA's mean test KL under each; empty when either rule
    is missing."""
    columns = ["dataset", "claim", "verdict_before", "verdict_now", "mapa_kl_before", "mapa_kl_now"]
    old = by_rule[by_rule["candidate"].eq(before).fillna(False)]
    new = by_rule[by_rule["candidate"].isna()]
    if old.empty or new.empty:
        return pd.DataFrame(columns=columns)
    keys = ["dataset", "claim"]
    both = old.merge(new, on=keys, suffixes=("_before", "_now"))
    both = both[both["verdict_before"] != both["verdict_now"]]
    mapa = "first_kl"  # every density claim's first or second method is MAPA: take MAPA's own mean
    both["mapa_kl_before"] = both[f"{mapa}_before"].where(both["first_before"] == "mapa", both["second_kl_before"])
    both["mapa_kl_now"] = both[f"{mapa}_now"].where(both["first_now"] == "mapa", both["second_kl_now"])
    return both[columns].reset_index(drop=True)
