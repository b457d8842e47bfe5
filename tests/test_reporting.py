"""The report (mapa_exp.reporting) on hand-built tidy tables whose verdicts are known: MAPA's prior rules and
the sensitivity of the claims to them, the selection rules read off the table, a report that states only what
its runs did, the figures' styles, and a user's own sweep reported without touching the repository."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from datetime import datetime, timezone

import pandas as pd
import pytest

from mapa_exp.reporting import read_tables, report_sections, report_text, write_report
from mapa_exp.reporting.claims import claims_under_prior_rules, verdict_changes
from mapa_exp.reporting.priors import candidate_labels, table_under_prior
from mapa_exp.reporting.sections import evaluators_section, training_time_section
from mapa_exp.sweeps.results import tidy_frame, write_table
from tests.conftest import ROOT, script_env

WHEN = datetime(2026, 12, 3, 12, 0, tzinfo=timezone.utc)
VAE_KL, IWAE_KL = [0.20, 0.21, 0.22], [0.30, 0.31, 0.33]  # per draw
# MAPA, per draw: seed 0 wins on the plain (chosen-map) and bins=null validation numbers, seed 1 on bins=8's
MAPA_SEED0 = {"plain": (-1.0, [0.10, 0.12, 0.11]), "bins=null": (-1.0, [0.10, 0.12, 0.11]),
              "bins=8": (-1.5, [0.15, 0.17, 0.16])}
MAPA_SEED1 = {"plain": (-2.0, [0.90, 0.90, 0.90]), "bins=null": (-2.0, [0.90, 0.90, 0.90]),
              "bins=8": (-0.5, [0.50, 0.52, 0.51])}


def run_rows(method, seed, draw, val, kl, candidates=None, experiment="paper_density", val_every=10,
             checkpoint="best", prior=None, passes=None, S=2, dataset="circle", **extra):
    """The tidy rows of one completed, evaluated run: val log-lik and test KL, and per candidate the same two."""
    run = f"{dataset}_{method}_S{S}_s{seed}_d{draw}"
    base = dict(sweep="/s", experiment=experiment, run=run, run_dir=f"/s/{run}", dataset=dataset, method=method,
                K=1 if method.startswith("mapa") else None, S=S, K_fraction=0.5, bandwidth=None, seed=seed, draw=draw,
                n_train=1000, batch_size=100, val_every=val_every, eval_checkpoint=checkpoint, prior=prior,
                status="completed", reason=None, **extra)
    rows = [dict(base, source="train", metric="val_bound", value=val - 0.5)]
    if passes is not None:
        rows += [dict(base, source="train", metric="passes_per_point_decoder", value=passes),
                 dict(base, source="train", metric="passes_per_point_encoder_decoder", value=2 * passes)]
    rows += [dict(base, source="eval", metric="val_loglik/quadrature", value=val),
             dict(base, source="eval", metric="test_kl/quadrature", value=kl)]
    for label, (cval, ckl) in (candidates or {}).items():
        rows += [dict(base, source="eval", metric=f"val_loglik/quadrature@{label}", value=cval),
                 dict(base, source="eval", metric=f"test_kl/quadrature@{label}", value=ckl)]
    return rows


def prior_table(with_candidates: bool = True) -> pd.DataFrame:
    rows = []
    for draw in range(3):
        rows += run_rows("vae", 0, draw, -1.2, VAE_KL[draw])
        rows += run_rows("iwae", 0, draw, -1.1, IWAE_KL[draw])
        for seed, spec in ((0, MAPA_SEED0), (1, MAPA_SEED1)):
            candidates = {c: (v, kl[draw]) for c, (v, kl) in spec.items() if c != "plain"} if with_candidates else None
            rows += run_rows("mapa", seed, draw, spec["plain"][0], spec["plain"][1][draw], candidates,
                             prior="bins=null" if with_candidates else None)
    # a MAPA run evaluated with the interpolating map alone: no bins=8 numbers, and never the best on validation
    rows += run_rows("mapa", 2, 0, -3.0, 0.95, {"bins=null": (-3.0, 0.95)} if with_candidates else None,
                     prior="bins=null" if with_candidates else None)
    return tidy_frame(rows)


def test_a_prior_rule_reads_the_candidates_numbers_for_the_mapa_family_only():
    t = prior_table()
    assert candidate_labels(t) == ["bins=null", "bins=8"]
    fixed = table_under_prior(t, "bins=8")
    assert not fixed["metric"].str.contains("@").any()
    mapa = fixed[(fixed["method"] == "mapa") & (fixed["seed"] == 1) & (fixed["draw"] == 0)].set_index("metric")
    assert mapa.loc["val_loglik/quadrature", "value"] == -0.5 and mapa.loc["test_kl/quadrature", "value"] == 0.50
    assert set(fixed.loc[fixed["method"] == "mapa", "prior"].dropna()) == {"bins=8"}
    # the run without bins=8 numbers keeps its training rows but has nothing to be chosen by
    lacking = fixed[(fixed["seed"] == 2)]
    assert set(lacking["metric"]) == {"val_bound"}
    vae = fixed[fixed["method"] == "vae"].set_index(["draw", "metric"])["value"]
    assert vae[(1, "test_kl/quadrature")] == 0.21  # VAE/IWAE: their own numbers under every rule
    plain = table_under_prior(t, None)
    assert len(plain) == len(t) - t["metric"].str.contains("@").sum()


def test_claims_under_each_prior_rule_and_what_changed():
    """bins=8 chooses seed 1 (0.50-0.52: above VAE and IWAE); the validation-chosen and the interpolating maps
    choose seed 0 (0.10-0.12: below both). Had the restart been chosen on the plain numbers and scored on bins=8's,
    MAPA would be 0.15-0.17 and hold against the IWAE: the rule must run through every selection step."""
    by_rule = claims_under_prior_rules(prior_table(), "val_loglik/quadrature")
    verdicts = by_rule.pivot_table(index="claim", columns="rule", values="verdict", aggfunc="first")
    for claim in ("MAPA below VAE", "MAPA below IWAE", "MAPA below VAE and IWAE"):
        assert verdicts.loc[claim].to_dict() == {"fixed 8-bin map": "fails", "interpolating map": "holds",
                                                 "validation-chosen map": "holds"}, claim
    kl = by_rule.set_index(["rule", "claim"])
    assert kl.loc[("fixed 8-bin map", "MAPA below VAE"), "first_kl"] == pytest.approx(0.51)
    assert kl.loc[("validation-chosen map", "MAPA below IWAE"), "second_kl"] == pytest.approx(0.94 / 3)
    assert set(by_rule.loc[by_rule["rule"] == "fixed 8-bin map", "left_out"]) == {1}
    changes = verdict_changes(by_rule)
    assert sorted(changes["claim"]) == ["MAPA below IWAE", "MAPA below VAE", "MAPA below VAE and IWAE"]
    assert set(changes["verdict_before"]) == {"fails"} and set(changes["verdict_now"]) == {"holds"}
    assert changes["mapa_kl_before"].tolist() == pytest.approx([0.51] * 3)
    assert changes["mapa_kl_now"].tolist() == pytest.approx([0.11] * 3)


def test_report_has_the_sensitivity_and_what_changed_sections():
    text = report_text(report_sections({"tidy.parquet": prior_table()}, WHEN))
    assert "## What changed since the last report, and why" in text
    assert "| circle | MAPA below VAE | fails | holds | 0.510 → 0.110 |" in text
    assert "fixed 8-bin smooth map" in text and "docs/method.md §6" in text
    assert "## Sensitivity to MAPA's prior recovery" in text
    assert "| circle | MAPA below VAE | fails (0.510 vs 0.210) | holds (0.110 vs 0.210) | holds (0.110 vs 0.210) |" \
        in text
    assert "| circle | **MAPA below VAE and IWAE** | **fails** | **holds** | **holds** |" in text
    assert "Under the fixed 8-bin map, 1 MAPA-family run without that candidate's numbers is left out." in text
    # the selection rules name the prior recovery and its candidates, and the chosen ones
    rule = next(line for line in text.splitlines() if "**Prior recovery**" in line)
    assert "`bins=null` (the interpolating map), `bins=8` (smooth maps through B bin means)" in rule
    assert "Chosen (`prior`): bins=null for 7 runs." in rule


def test_without_candidates_the_sensitivity_is_one_line_and_nothing_is_said_to_have_changed():
    text = report_text(report_sections({"tidy.parquet": prior_table(with_candidates=False)}, WHEN))
    assert "What changed since the last report" not in text
    section = text.split("## Sensitivity to MAPA's prior recovery\n\n", 1)[1].split("\n## ", 1)[0]
    assert section.strip().count("\n") == 0 and "no prior candidates" in section
    assert "not recorded in these tables" in next(l for l in text.splitlines() if "**Prior recovery**" in l)


@pytest.mark.slow  # 3-8 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_when_the_verdicts_agree_the_report_says_no_claim_changed():
    t = prior_table()
    same = t.assign(metric=t["metric"].str.replace("@bins=8", "@bins=32"))  # no bins=8: nothing to compare
    assert "What changed since the last report" not in report_text(report_sections({"t": same}, WHEN))
    mixtures = t.assign(metric=t["metric"].str.replace("@bins=8", "@n_components=2").str.replace(
        "@bins=null", "@n_components=5"))  # 2-D latents' candidates: no fixed map to compare with
    text = report_text(report_sections({"t": mixtures}, WHEN))
    assert "What changed since the last report" not in text
    assert "`n_components=2`, `n_components=5` (Gaussian mixtures of C components), but neither" in text
    agree = t.copy()  # bins=8's numbers made equal to bins=null's: the same verdicts
    for metric in ("val_loglik/quadrature", "test_kl/quadrature"):
        null = agree["metric"] == f"{metric}@bins=null"
        values = agree.loc[null].set_index("run_dir")["value"]
        fixed = agree["metric"] == f"{metric}@bins=8"
        agree.loc[fixed, "value"] = agree.loc[fixed, "run_dir"].map(values).to_numpy()
    text = report_text(report_sections({"t": agree}, WHEN))
    assert "No density claim's verdict differs between the fixed 8-bin map" in text


def test_selection_rules_and_statistics_come_from_the_table_not_from_defaults():
    """A 2-epoch smoke sweep: validation every epoch, 2 draws, no experiment name, no mixture IWAE, one run at
    its last checkpoint. The report must say so and nothing else."""
    rows = []
    for draw in range(2):
        for method, kl in (("vae", 0.3), ("iwae", 0.2), ("mapa", 0.1)):
            rows += run_rows(method, 0, draw, -1.0, kl + 0.01 * draw, experiment=None, val_every=1,
                             checkpoint="last" if (method, draw) == ("mapa", 1) else "best", passes=1.5)
    text = report_text(report_sections({"tidy.parquet": tidy_frame(rows)}, WHEN))
    assert "every 10 epochs" not in text and "validation checked every 1 epoch (`val_every`)" in text
    assert "`best` for 5 runs (the epoch with the best validation bound); `last` for 1 run (the last epoch)" in text
    assert "D = 3" not in text and "With D = 2 draws, paired t tests have 1 degree of freedom" in text
    assert "±12.71 standard errors" in text  # t(0.975, 1)
    assert "mixture IWAE is reported beside it" not in text and "The two evaluators" not in text
    assert "<NA>" not in text and "- **(no experiment)**: 6 completed runs" in text
    assert "| (no experiment) | eval | completed | 6 |" in text
    assert "D = 2 draws per configuration" in text
    # a VAE's config carries a K fraction (0.5 here, as in the real tables) that it never uses: not shown as chosen
    at_s = text.split("### Each method at its S chosen on validation data")[1]
    assert "| circle | vae | 2 | – |" in at_s and "| circle | mapa | 2 | 0.5 |" in at_s


def test_draw_counts_that_differ_between_methods_are_stated_per_method():
    """Two draws of IWAE and MAPA, three of the VAE: the scale and the statistics name both counts, and the t test's
    width at each (t(0.975, 1) = 12.71, t(0.975, 2) = 4.30)."""
    rows = []
    for method, kl, draws in (("vae", 0.3, 3), ("iwae", 0.2, 2), ("mapa", 0.1, 2)):
        for draw in range(draws):
            rows += run_rows(method, 0, draw, -1.0, kl + 0.01 * draw)
    text = report_text(report_sections({"tidy.parquet": tidy_frame(rows)}, WHEN))
    assert "R = 1 restarts and D = 2 (vae: 3) draws per configuration" in text
    assert ("With D = 2 (vae: 3) draws, paired t tests have 1 degree of freedom and a 95% interval ±12.71 standard "
            "errors wide (2 degrees of freedom and a 95% interval ±4.30 standard errors wide at D = 3)") in text


def test_the_code_section_lists_each_tables_commits():
    a, b = "a" * 40, "b" * 40
    one = tidy_frame(run_rows("vae", 0, 0, -1.0, 0.2, train_commit=a, eval_commit=b + "+dirty")
                     + run_rows("vae", 1, 0, -1.1, 0.2, train_commit=a))
    two = tidy_frame(run_rows("iwae", 0, 0, -1.0, 0.2, dataset="spiral"))
    section = next(s for s in report_sections({"one.parquet": one, "two.parquet": two}, WHEN) if s.key == "code")
    assert f"| `one.parquet` | `{a}` (2 runs) | `{b}+dirty` (1 run); not recorded (1 run) |" in section.markdown
    assert "| `two.parquet` | not recorded (1 run) | not recorded (1 run) |" in section.markdown
    commits = section.tables["commits"]
    assert commits[(commits["table"] == "one.parquet") & (commits["stage"] == "eval")]["runs"].sum() == 2


# -- figures ------------------------------------------------------------------------------------
def passes_table() -> pd.DataFrame:
    rows = []
    for S in (1, 10):
        for draw in range(2):
            rows += run_rows("vae", 0, draw, -1.2, 0.3, S=S, passes=float(S))
            rows += run_rows("iwae", 0, draw, -1.1, 0.2 + 0.01 * S, S=S, passes=float(S))
            rows += run_rows("mapa", 0, draw, -1.0, 0.1 + 0.01 * draw, S=S, passes=1.5 + 0.5 * S / 10)
    return tidy_frame(rows)


def test_figures_share_one_palette_label_each_max_line_and_draw_equal_series_as_equal():
    from matplotlib.colors import to_hex

    sections = report_sections({"t": passes_table()}, WHEN)
    figures = {name: fig for s in sections for name, fig in s.figures.items()}

    def colours(fig) -> dict[str, str]:  # plotted lines, and error bars (whose label is their container's)
        lines = [(line.get_label(), line) for ax in fig.axes for line in ax.get_lines()]
        lines += [(c.get_label(), c.lines[0]) for ax in fig.axes for c in ax.containers]
        return {label: to_hex(line.get_color()) for label, line in lines if not label.startswith("_")}

    density, passes = colours(figures["density.png"]), colours(figures["passes.png"])
    for method in ("vae", "iwae", "mapa"):
        assert density[method] == passes[method], method
    assert len({density["vae"], density["iwae"], density["mapa"]}) == 3
    left, right = figures["passes.png"].axes[:2]
    for ax, label, cap in ((left, "MAPA Max = N/B = 10", 10.0), (right, "MAPA Max = 2N/B = 20", 20.0)):
        assert [t.get_text() for t in ax.texts] == [label]
        dashed = [line for line in ax.get_lines() if line.get_linestyle() == "--" and line.get_label().startswith("_")]
        assert [list(line.get_ydata()) for line in dashed] == [[cap, cap]]
    vae, iwae = ([line for line in left.get_lines() if line.get_label() == m][0] for m in ("vae", "iwae"))
    assert list(vae.get_xdata()) == list(iwae.get_xdata()) == [1.0, 10.0]  # the same places: no offset
    assert list(vae.get_ydata()) == list(iwae.get_ydata())
    assert iwae.get_markerfacecolor() == "none"  # the equal one drawn around the first, hollow
    assert "vae = iwae" in figures["passes.png"]._suptitle.get_text()
    for fig in figures.values():
        fig.clear()


# -- a user's own sweep, as the README tells it ---------------------------------------------------
def _user_sweep(root):
    """Run folders as train.py and evaluate.py leave them: results.json, eval.json, config.yaml."""
    for method, S, kl in (("vae", 1, 0.3), ("iwae", 1, 0.3), ("vae", 10, 0.25), ("iwae", 10, 0.1),
                          ("mapa", 1, 0.2), ("mapa", 10, 0.15)):
        for draw in range(2):
            d = root / f"{method}_S{S}_d{draw}"
            (d / ".hydra").mkdir(parents=True)
            (d / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      experiment: mine\n")
            (d / "config.yaml").write_text(
                f"seed: 0\ndataset: {{name: circle, draw: {draw}, n_train: 200}}\n"
                f"method: {{name: {method}, S: {S}, K_fraction: 0.5}}\ndata: {{batch_size: 100}}\n"
                "trainer: {check_val_every_n_epoch: 1}\n")
            ident = dict(dataset="circle", method=method, S=S, seed=0, draw=draw, status="completed")
            passes = S if method != "mapa" else 1.2
            (d / "results.json").write_text(json.dumps(dict(ident, val_bound=-1.0, epochs=2, run_dir=str(d),
                                                            passes_per_point_decoder=passes,
                                                            passes_per_point_encoder_decoder=2 * passes)))
            (d / "eval.json").write_text(json.dumps(dict(ident, checkpoint="best", metrics={
                "val_loglik/quadrature": -1.0 - kl, "test_kl/quadrature": kl + 0.01 * draw})))


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_a_users_sweep_is_reported_beside_its_table_and_leaves_the_repository_as_it_was(tmp_path):
    def status() -> str:
        return subprocess.run(["git", "status", "--porcelain", "--untracked-files=all"], cwd=ROOT, capture_output=True,
                              text=True, check=True).stdout

    sweep = tmp_path / "outputs" / "multiruns" / "mine" / "2026-12-03_12-00-00"
    _user_sweep(sweep)
    before = status()
    for script, args in (("collect.py", [sweep]), ("plot_density.py", [sweep / "tidy.parquet"]),
                         ("plot_passes.py", [sweep / "tidy.parquet"]), ("report.py", [sweep / "tidy.parquet"])):
        p = subprocess.run([sys.executable, f"scripts/{script}", *map(str, args)], cwd=ROOT, env=script_env(),
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, (script, p.stderr[-2000:])
    assert status() == before
    for name in ("tidy.csv", "tidy.parquet", "density.png", "passes.png", "REPORT.md", "figures/density.png",
                 "figures/passes.png"):
        assert (sweep / name).stat().st_size > 0, name
    assert "](figures/density.png)" in (sweep / "REPORT.md").read_text()


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
@pytest.mark.parametrize("case, script", [
    *((case, "report.py") for case in ("missing file", "not a table", "not a tidy table", "no validation metric")),
    *((case, script) for case in ("not a table", "no validation metric") for script in ("plot_density.py",
                                                                                       "plot_passes.py"))])
def test_bad_tables_are_refused_in_one_line_and_nothing_is_written(case, script, tmp_path):
    path = tmp_path / "tidy.parquet"
    if case == "not a table":
        path.write_text("hello")
    elif case == "not a tidy table":
        pd.DataFrame({"a": [1]}).to_parquet(path)
    elif case == "no validation metric":
        write_table(tidy_frame([dict(run_dir="/r", source="train", status="failed", metric=None)]), tmp_path / "tidy")
    reasons = {"missing file": "no such file", "not a table": "not a Parquet or CSV table",
               "not a tidy table": "not a tidy table from scripts/collect.py", "no validation metric":
               "no run has a validation metric"}
    before = sorted(tmp_path.rglob("*"))
    p = subprocess.run([sys.executable, f"scripts/{script}", str(path)], cwd=ROOT, env=script_env(),
                       capture_output=True, text=True, timeout=120)
    lines = p.stderr.strip().splitlines()
    assert p.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: table"), p.stderr
    assert reasons[case] in lines[0] and "=" in lines[0].split(":")[1], lines[0]
    assert sorted(tmp_path.rglob("*")) == before  # nothing written


@pytest.mark.slow  # 3-8 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_a_table_without_test_kl_is_refused_by_the_density_figure_and_reported_as_not_evaluated(tmp_path):
    t = passes_table()
    write_table(t[t["source"] == "train"], tmp_path / "tidy")
    p = subprocess.run([sys.executable, "scripts/plot_density.py", str(tmp_path / "tidy.parquet")], cwd=ROOT,
                       env=script_env(), capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.startswith("error: --metric=None: the table has no test KL")
    assert not (tmp_path / "density.png").exists()
    text = report_text(report_sections(read_tables([tmp_path / "tidy.parquet"]), WHEN))
    assert "No test KL in these tables: the runs were not evaluated." in text
    assert "Sensitivity" not in text and "What changed since" not in text
    out = tmp_path / "r" / "REPORT.md"
    write_report(report_sections(read_tables([tmp_path / "tidy.parquet"]), WHEN), out, tmp_path / "r" / "figures")
    assert sorted(p.name for p in (tmp_path / "r" / "figures").iterdir()) == ["passes.png"]


# -- layering -------------------------------------------------------------------------------------
def _imported_modules(path) -> set[str]:
    tree = ast.parse(path.read_text())
    names = {alias.name for node in ast.walk(tree) if isinstance(node, ast.Import) for alias in node.names}
    return names | {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom) and node.module}


def test_reporting_imports_only_the_sweeps_and_io_layers_and_scripts_do_not_edit_sys_path():
    allowed = ("mapa_exp.reporting", "mapa_exp.sweeps", "mapa_exp.io")
    for path in sorted((ROOT / "mapa_exp" / "reporting").glob("*.py")):
        for name in _imported_modules(path):
            assert not name.startswith(("hydra", "lightning", "omegaconf", "torch")), (path.name, name)
            assert not name.startswith("mapa_exp") or name.startswith(allowed), (path.name, name)
    for path in sorted((ROOT / "scripts").glob("*.py")):
        assert "sys.path" not in path.read_text(), path.name
    for name in ("report.py", "plot_density.py", "plot_passes.py"):
        assert len((ROOT / "scripts" / name).read_text().splitlines()) <= 120, name


def test_one_compose_helper_initialises_hydra_outside_hydra_main():
    # mapa_exp.config.compose is the one place that initialises Hydra on the repository's conf/ (checks,
    # benchmarks, tests); no other module or script calls Hydra's initialisers or its compose
    helper = ROOT / "mapa_exp" / "config.py"
    files = [*(ROOT / "mapa_exp").rglob("*.py"), *(ROOT / "scripts").glob("*.py"), *(ROOT / "tests").rglob("*.py"),
             ROOT / "train.py", ROOT / "evaluate.py"]
    users = []
    for path in files:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.ImportFrom) and node.module == "hydra":
                if {a.name for a in node.names} & {"compose", "initialize", "initialize_config_dir",
                                                   "initialize_config_module"}:
                    users.append(path.relative_to(ROOT).as_posix())
    assert sorted(set(users)) == [helper.relative_to(ROOT).as_posix()], users


def test_training_time_is_a_stacks_time_over_its_members_against_the_vaes():
    rows = []
    for draw in range(2):
        for method, wall, size in (("vae", 90.0, 9), ("aggressive", 270.0, 9), ("mapa", 60.0, 3)):
            for r in run_rows(method, 0, draw, -1.0, 0.1, S=10):
                rows.append(r)
            base = {k: v for k, v in rows[-1].items() if k not in ("metric", "value", "source")}
            rows += [dict(base, source="train", metric="wall_time_s", value=wall + 9 * draw),
                     dict(base, source="train", metric="stack_size", value=size)]
    section = training_time_section(tidy_frame(rows))
    agg = section.tables["training_time"].set_index("method")
    assert agg.loc["vae", "time_per_run_s"] == pytest.approx((90 / 9 + 99 / 9) / 2)  # 10.5 s
    assert agg.loc["aggressive", "time_per_run_s"] == pytest.approx((270 / 9 + 279 / 9) / 2)  # 30.5 s
    assert agg.loc["aggressive", "vs_vae"] == pytest.approx(30.5 / 10.5)
    assert agg.loc["mapa", "time_per_run_s"] == pytest.approx((20 + 23) / 2)
    assert "| aggressive | 30 (x2.90) |" in section.markdown


def test_the_evaluators_section_counts_runs_with_and_without_a_recorded_gap():
    # one run whose eval.json records the gap, one scored by the two evaluators in separate passes (older tables)
    rows = run_rows("mapa", 0, 0, -1.0, 0.1)
    base = {k: v for k, v in rows[-1].items() if k not in ("metric", "value", "source")}
    rows.append(dict(base, source="eval", metric="test_loglik_gap/mog_iwae", value=-0.004))
    older = run_rows("iwae", 0, 0, -1.0, 0.1)
    base = {k: v for k, v in older[-1].items() if k not in ("metric", "value", "source")}
    older += [dict(base, source="eval", metric="test_loglik/mog_iwae", value=-1.502),
              dict(base, source="eval", metric="test_loglik/quadrature", value=-1.500)]
    section = evaluators_section(tidy_frame(rows + older))
    gaps = section.tables["gaps"].set_index("method")
    assert gaps.loc["mapa", "mean gap"] == pytest.approx(-0.004)
    assert gaps.loc["iwae", "mean gap"] == pytest.approx(-0.002)
    assert "On 2 runs scored by both" in section.markdown
