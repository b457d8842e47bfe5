"""The results table: collect run folders, choose restarts, average over draws, report -- on hand-made
inputs whose answers are known."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd
import pytest

from mapa_exp.sweeps.results import (
    TIDY_COLUMNS, best_restarts, collect, mean_se_over_draws, read_table, selection_metric, series_label,
    tidy_frame, write_table,
)
from tests.conftest import ROOT, script_env


# -- a hand-made table ---------------------------------------------------------------------------
# mapa, per draw: (seed, val log-lik, test KL); the best restart by val log-lik, ties to the lower seed
MAPA = {0: [(0, -1.0, 0.30), (1, -0.5, 0.10)],  # seed 1 -> 0.10
        1: [(0, -0.2, 0.20), (1, -0.9, 0.50)],  # seed 0 -> 0.20
        2: [(0, -0.7, 0.60), (1, -0.7, 0.90)]}  # tie -> seed 0 -> 0.60
# vae: the failed seed 0 of draw 0 has the best val log-lik but must not be chosen; no draw 2
VAE = {0: [(0, 5.0, 0.00, "failed"), (1, -3.0, 1.00, "completed")],  # seed 1 -> 1.00
       1: [(0, -2.0, 1.50, "completed"), (1, -1.0, 2.50, "completed")]}  # seed 1 -> 2.50


def _rows(method, K, K_fraction, draw, seed, val, kl, status="completed", passes=None):
    run = f"{method}_d{draw}_s{seed}"
    base = dict(sweep="/s", experiment="paper_density", run=run, run_dir=f"/s/{run}", dataset="circle", method=method,
                K=K, S=2, K_fraction=K_fraction, bandwidth=None, seed=seed, draw=draw, n_train=1000, batch_size=100)
    train = dict(base, status="failed", reason="boom") if status == "failed" else dict(base, status="completed", reason=None)
    rows = [dict(train, source="train", metric="val_bound", value=val - 1.0)]
    if passes is not None:
        rows.append(dict(train, source="train", metric="passes_per_point_decoder", value=passes))
    if status != "failed":
        rows += [dict(base, status="completed", reason=None, source="eval", metric="val_loglik/quadrature", value=val),
                 dict(base, status="completed", reason=None, source="eval", metric="test_kl/quadrature", value=kl)]
    return rows


@pytest.fixture()
def table() -> pd.DataFrame:
    rows = []
    for draw, runs in MAPA.items():
        for seed, val, kl in runs:
            rows += _rows("mapa", 1, 0.5, draw, seed, val, kl, passes=1.6)
    for draw, runs in VAE.items():
        for seed, val, kl, status in runs:
            rows += _rows("vae", None, 0.5, draw, seed, val, kl, status, passes=2.0)
    return tidy_frame(rows)


def test_best_restart_is_the_highest_validation_loglik_among_completed_runs(table):
    assert selection_metric(table) == "val_loglik/quadrature"
    best = best_restarts(table)
    chosen = {(r.method, r.draw): r.seed for r in best.itertuples()}
    assert chosen == {("mapa", 0): 1, ("mapa", 1): 0, ("mapa", 2): 0, ("vae", 0): 1, ("vae", 1): 1}
    # the VAE's K is missing (NaN): its configurations are kept, not dropped by the group-by
    assert set(best["method"]) == {"mapa", "vae"}
    assert best.set_index(["method", "draw"]).loc[("vae", 0), "restarts"] == 1  # the failed seed does not count
    assert best.set_index(["method", "draw"]).loc[("mapa", 0), "restarts"] == 2


def test_mean_and_standard_error_over_draws(table):
    agg = mean_se_over_draws(best_restarts(table), "test_kl/quadrature").set_index("method")
    # mapa: 0.10, 0.20, 0.60 -> mean 0.3, sd sqrt(0.14 / 2), se sd / sqrt(3)
    assert agg.loc["mapa", "mean"] == pytest.approx(0.3)
    assert agg.loc["mapa", "se"] == pytest.approx(math.sqrt(0.07) / math.sqrt(3))
    assert agg.loc["mapa", "n"] == 3
    # vae: 1.0, 2.5 -> mean 1.75, se = sd / sqrt(2) = 0.75
    assert agg.loc["vae", "mean"] == pytest.approx(1.75)
    assert agg.loc["vae", "se"] == pytest.approx(0.75)
    one = mean_se_over_draws(best_restarts(table)[lambda d: d["draw"] == 0], "test_kl/quadrature")
    assert one["se"].isna().all() and (one["n"] == 1).all()  # one draw: no standard error


def test_selection_by_training_bound_when_there_is_no_evaluation(table):
    train_only = table[table["source"] == "train"]
    assert selection_metric(train_only) == "val_bound"
    best = best_restarts(train_only)
    assert len(best) == 5 and "test_kl/quadrature" not in best.columns


def test_series_labels_name_the_K_rule_only_where_a_method_has_several():
    t = tidy_frame([dict(method="mapa", K=1, K_fraction=0.0), dict(method="mapa", K=5, K_fraction=0.5),
                    dict(method="iwae", K=None, K_fraction=0.5), dict(method="iwae", K=None, K_fraction=0.1)])
    assert list(series_label(t)) == ["mapa K=1", "mapa K=ceil(0.5S)", "iwae K=ceil(0.5S)", "iwae K=ceil(0.1S)"]
    t2 = tidy_frame([dict(method="mapa", K=5, K_fraction=None), dict(method="vae", K=None, K_fraction=None)])
    assert list(series_label(t2)) == ["mapa", "vae"]


# -- collect: run folders in, tidy rows out --------------------------------------------------------
def _run_folder(root: Path, name: str, results: dict | None, evaluation: dict | None = None, cfg: str | None = None):
    d = root / name
    (d / ".hydra").mkdir(parents=True)
    (d / ".hydra" / "hydra.yaml").write_text("hydra:\n  runtime:\n    choices:\n      experiment: paper_density_smoke\n")
    if cfg is not None:
        (d / "config.yaml").write_text(cfg)
        (d / ".hydra" / "config.yaml").write_text(cfg)
    if results is not None:
        (d / "results.json").write_text(json.dumps({**results, "run_dir": str(d)}))
    if evaluation is not None:
        (d / "eval.json").write_text(json.dumps(evaluation))
    return d


CFG = """seed: {seed}
dataset: {{name: circle, draw: 1, n_train: 200}}
method: {{name: {method}, S: 2, K: 1, K_fraction: 0.5, bandwidth: 0.02}}
data: {{batch_size: 100}}
"""


def test_collect_keeps_every_run_and_marks_the_failed_ones(tmp_path):
    sweep = tmp_path / "sweep"
    ident = dict(dataset="circle", method="mapa", K=1, S=2, seed=0, draw=1)
    _run_folder(sweep, "0_circle_mapa", dict(ident, status="completed", val_bound=-1.5, train_bound=-1.25,
                                            proximity_cache_hit=True, passes_per_point_decoder=1.6, epochs=2),
                dict(ident, status="completed", run_dir="x", metrics={"test_kl/quadrature": 0.25, "val_loglik/quadrature": -1.0,
                                                                      "test_loglik_se/mog_iwae": 0.01}),
                CFG.format(seed=0, method="mapa"))
    _run_folder(sweep, "1_circle_mapa", dict(ident, seed=1, status="failed", reason="FloatingPointError: non-finite loss",
                                            wall_time_s=3.0), None, CFG.format(seed=1, method="mapa"))
    _run_folder(sweep, "2_circle_mapa", dict(ident, seed=2, status="completed", val_bound=-2.0),
                dict(ident, seed=2, status="failed", reason="quadrature did not converge", metrics={}),
                CFG.format(seed=2, method="mapa"))
    _run_folder(sweep, "3_circle_vae", None, None, CFG.format(seed=3, method="vae"))  # died before training

    t = collect([sweep])
    assert list(t.columns) == TIDY_COLUMNS
    assert t["run_dir"].nunique() == 4
    by = {(r.run, r.source, r.metric): r for r in t.itertuples()}
    ok = by[("0_circle_mapa", "eval", "test_kl/quadrature")]
    assert ok.value == 0.25 and ok.status == "completed" and ok.experiment == "paper_density_smoke"
    assert (ok.K_fraction, ok.bandwidth, ok.n_train, ok.batch_size, ok.draw) == (0.5, 0.02, 200, 100, 1)
    assert by[("0_circle_mapa", "train", "val_bound")].value == -1.5
    assert by[("0_circle_mapa", "train", "proximity_cache_hit")].value == 1.0
    assert by[("0_circle_mapa", "eval", "test_loglik_se/mog_iwae")].value == 0.01
    failed = t[t["run"] == "1_circle_mapa"]
    assert set(failed["status"]) == {"failed"} and set(failed["reason"]) == {"FloatingPointError: non-finite loss"}
    assert list(failed["metric"]) == ["wall_time_s"]
    bad_eval = t[(t["run"] == "2_circle_mapa") & (t["source"] == "eval")]
    assert len(bad_eval) == 1 and bad_eval["status"].iloc[0] == "failed" and bad_eval["metric"].isna().all()
    assert bad_eval["reason"].iloc[0] == "quadrature did not converge"
    missing = t[t["run"] == "3_circle_vae"]
    assert len(missing) == 1 and missing["status"].iloc[0] == "missing"
    assert (missing["method"].iloc[0], missing["seed"].iloc[0]) == ("vae", 3)  # identity from the job's config

    csv, parquet = write_table(t, tmp_path / "tables" / "tidy")
    for path in (csv, parquet):
        back = read_table(path)
        pd.testing.assert_frame_equal(back, t, check_dtype=True)
    assert not list((tmp_path / "tables").glob("*.tmp"))  # atomic writes leave no temporaries


COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER = "fedcba9876543210fedcba9876543210fedcba98"


def test_collect_reads_the_validation_interval_and_the_code_commits(tmp_path):
    """val_every from the run's config; train_commit / eval_commit from results.json / eval.json ("+dirty" for a
    worktree with changes); --train-commit / --eval-commit fill only the runs whose files record none."""
    sweep = tmp_path / "sweep"
    ident = dict(dataset="circle", method="mapa", K=1, S=2, draw=1, status="completed", val_bound=-1.0)
    cfg = CFG + "trainer: {{check_val_every_n_epoch: 5}}\n"
    _run_folder(sweep, "0_new", dict(ident, seed=0, code_commit=COMMIT, code_dirty=False),
                dict(ident, seed=0, code_commit=OTHER, code_dirty=True, metrics={"test_kl/quadrature": 0.5}),
                cfg.format(seed=0, method="mapa"))
    _run_folder(sweep, "1_old", dict(ident, seed=1), dict(ident, seed=1, metrics={"test_kl/quadrature": 0.5}),
                cfg.format(seed=1, method="mapa"))
    _run_folder(sweep, "2_not_evaluated", dict(ident, seed=2), None, cfg.format(seed=2, method="mapa"))
    _run_folder(sweep, "3_never_trained", None, None, cfg.format(seed=3, method="mapa"))
    runs = collect([sweep]).drop_duplicates("run").set_index("run")
    assert runs["val_every"].tolist() == [5, 5, 5, 5]
    assert runs.loc["0_new", "train_commit"] == COMMIT and runs.loc["0_new", "eval_commit"] == OTHER + "+dirty"
    assert runs[["train_commit", "eval_commit"]].iloc[1:].isna().all().all()

    p = subprocess.run([sys.executable, "scripts/collect.py", str(sweep), "--train-commit", OTHER.upper(),
                        "--eval-commit", COMMIT], cwd=ROOT, env=script_env(), capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    runs = read_table(sweep / "tidy.parquet").drop_duplicates("run").set_index("run")
    assert runs["train_commit"].fillna("none").to_dict() == {  # a recorded commit is kept
        "0_new": COMMIT, "1_old": OTHER, "2_not_evaluated": OTHER, "3_never_trained": "none"}
    assert runs["eval_commit"].fillna("none").to_dict() == {"0_new": OTHER + "+dirty", "1_old": COMMIT,
                                                            "2_not_evaluated": "none", "3_never_trained": "none"}


def test_collect_refuses_a_commit_that_is_not_a_full_sha(tmp_path):
    sweep = tmp_path / "sweep"
    _run_folder(sweep, "0_run", dict(dataset="circle", method="mapa", K=1, S=2, seed=0, draw=0, status="completed",
                                     val_bound=-1.0), None, CFG.format(seed=0, method="mapa"))
    for option, value in (("--train-commit", "abc123"), ("--eval-commit", "g" * 40)):
        p = subprocess.run([sys.executable, "scripts/collect.py", str(sweep), option, value], cwd=ROOT,
                           env=script_env(), capture_output=True, text=True, timeout=60)
        assert p.returncode == 2 and p.stderr.strip().splitlines() == [
            f"error: {option}={value}: must be a full 40-hex git commit (git rev-parse <revision>)"]
        assert not (sweep / "tidy.parquet").exists() and not (sweep / "tidy.csv").exists()


@pytest.mark.slow  # 3-8 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_collect_cli_writes_csv_and_parquet(tmp_path):
    sweep = tmp_path / "sweep"
    _run_folder(sweep, "0_circle_mapa", dict(dataset="circle", method="mapa", K=1, S=2, seed=0, draw=0,
                                            status="completed", val_bound=-1.0), None, CFG.format(seed=0, method="mapa"))
    p = subprocess.run([sys.executable, "scripts/collect.py", str(sweep)], cwd=ROOT, env=script_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    assert "1 runs, 1 rows (train completed: 1)" in p.stdout
    assert read_table(sweep / "tidy.parquet")["value"].tolist() == [-1.0]
    p = subprocess.run([sys.executable, "scripts/collect.py", str(tmp_path / "nope")], cwd=ROOT, env=script_env(),
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 2 and p.stderr.startswith("error: sweeps=")


# -- the report ---------------------------------------------------------------------------------
def test_report_states_the_numbers_and_the_claims(table, tmp_path):
    from mapa_exp.reporting import read_tables, report_sections, write_report

    write_table(table, tmp_path / "tidy")
    sections = report_sections(read_tables([tmp_path / "tidy.parquet"]), datetime(2026, 1, 2, tzinfo=timezone.utc))
    out = tmp_path / "docs" / "REPORT.md"
    write_report(sections, out, tmp_path / "docs" / "figures")
    text = out.read_text()
    # the density table: mean ± s.e. (draws)
    assert "| mapa | 0.300 ± 0.153 (3) |" in text
    assert "| vae | 1.750 ± 0.750 (2) |" in text
    # the claim, by the paired difference over the draws both have (0 and 1): MAPA 0.10, 0.20 vs VAE 1.00, 2.50;
    # a t test with 1 degree of freedom cannot decide it: reported as undecided, not as holding
    from scipy import stats

    ref = stats.ttest_rel([0.10, 0.20], [1.00, 2.50])
    ci = ref.confidence_interval(0.95)
    line = next(l for l in text.splitlines() if l.startswith("| circle | MAPA below VAE |"))
    assert f"d = -1.600, 95% CI [{ci.low:+.3f}, {ci.high:+.3f}], t(1) = {ref.statistic:.2f}, p = {ref.pvalue:.3g}" in line
    assert line.endswith("| undecided |")
    assert "| circle | **MAPA below VAE and IWAE** | both of the above | **undecided** |" in text
    # runs and failures
    assert "| paper_density | train | failed | 1 |" in text and "boom" in text
    # figures exist, are linked relative to the report, and are real PNGs
    for name in ("density.png", "passes.png"):
        png = tmp_path / "docs" / "figures" / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000
        assert f"](figures/{name})" in text
    # the report's sections hand their own tables on (the W&B summary run logs these), no markdown parsed back
    claims = next(s for s in sections if s.key == "claims").tables["density"].set_index("claim")
    assert claims.loc["MAPA below VAE", "d"] == pytest.approx(-1.6) and claims.loc["MAPA below VAE", "n"] == 2


def test_claims_are_counted_across_data_sets():
    from mapa_exp.reporting.claims import claims_across_datasets

    claims = pd.DataFrame({"dataset": ["circle", "clusters", "figure8", "circle", "clusters"],
                           "claim": ["MAPA below VAE"] * 3 + ["MAPA below VAE and IWAE"] * 2,
                           "verdict": ["holds", "fails", "undecided", "undecided", "fails"]})
    counted = claims_across_datasets(claims).set_index("claim")
    assert counted.loc["MAPA below VAE"].tolist() == ["1: circle", "1: clusters", "1: figure8"]
    assert counted.loc["MAPA below VAE and IWAE"].tolist() == ["0", "1: clusters", "1: circle"]
    assert claims_across_datasets(claims[:1]).empty  # one data set: nothing to count


# -- choices on validation data, and the statistics of a claim -------------------------------------
def test_k_fraction_and_S_are_chosen_on_validation_where_test_would_choose_otherwise():
    """Validation prefers K fraction 0.1 and S = 10; the test KL would pick 0.5 and S = 2. Validation wins."""
    from mapa_exp.sweeps.results import choose_on_validation, choose_s

    rows = []
    for S in (2, 10):
        for f, K in ((0.1, 1), (0.5, S // 2)):
            for draw in range(3):
                for seed in (0, 1):
                    val = -1.0 + (0.3 if f == 0.1 else 0.0) + (0.2 if S == 10 else 0.0) + 0.1 * seed + 0.01 * draw
                    kl = 0.5 - (0.3 if f == 0.5 else 0.0) - (0.2 if S == 2 else 0.0) + 0.1 * seed  # the opposite
                    rows += [dict(r, S=S, K=K, K_fraction=f, run=f"{r['run']}_S{S}_f{f}", run_dir=f"{r['run_dir']}_S{S}_f{f}")
                             for r in _rows("mapa", K, f, draw, seed, val, kl)]
    chosen = choose_on_validation(tidy_frame(rows))
    assert set(chosen["K_fraction"]) == {0.1} and set(chosen["seed"]) == {1}  # validation's choices
    assert (chosen["k_fractions"] == 2).all() and len(chosen) == 6  # 2 values of S x 3 draws
    at_s = choose_s(chosen, "val_loglik/quadrature")
    assert set(at_s["S"]) == {10} and len(at_s) == 3 and (at_s["S_choices"] == 2).all()
    assert at_s["test_kl/quadrature"].tolist() == pytest.approx([0.6] * 3)  # not the 0.0 test would pick


def test_paired_difference_matches_scipy_and_the_verdicts():
    from scipy import stats

    from mapa_exp.sweeps.statistics import directional, equivalent, paired_difference

    a = pd.Series([0.10, 0.12, 0.08, 0.11], index=[0, 1, 2, 3])
    b = pd.Series([0.20, 0.25, 0.18, 0.30, 9.9], index=[0, 1, 2, 3, 4])  # draw 4 has no partner: left out
    p = paired_difference(a, b)
    ref = stats.ttest_rel(a.to_numpy(), b.to_numpy()[:4])
    assert p.n == 4 and p.mean == pytest.approx(-0.13) and p.p == pytest.approx(ref.pvalue) and p.t == pytest.approx(ref.statistic)
    ci = ref.confidence_interval(0.95)
    assert (p.lo, p.hi) == pytest.approx((ci.low, ci.high))
    assert directional(p, below=True) == "holds" and directional(p, below=False) == "fails"
    assert equivalent(p, margin=0.01) == "fails" and equivalent(p, margin=1.0) == "holds"
    tie = paired_difference(pd.Series([0.1, 0.3, 0.2]), pd.Series([0.2, 0.1, 0.25]))  # a tie is not a win
    assert directional(tie, below=True) == "undecided" and equivalent(tie, margin=0.01) == "undecided"
    assert directional(paired_difference(a[:1], b[:1])) == "undecided"  # one draw: no test


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_committed_report_is_rebuilt_from_the_committed_tables(tmp_path):
    """docs/REPORT.md is a function of docs/results/*.parquet alone: rebuilt, it equals the committed one
    byte for byte apart from its date line (a report edited by hand, or left stale, fails here)."""
    from mapa_exp.reporting import DATE_PREFIX

    tables = sorted((ROOT / "docs" / "results").glob("*.parquet"))
    assert tables, "docs/results/ holds no tidy table"
    out = tmp_path / "REPORT.md"
    p = subprocess.run([sys.executable, "scripts/report.py", *map(str, tables), "-o", str(out)], cwd=ROOT,
                       capture_output=True, text=True, timeout=300, env=script_env())
    assert p.returncode == 0, p.stderr[-2000:]

    def body(text: str) -> list[str]:
        return [line for line in text.splitlines() if not line.startswith(DATE_PREFIX)]

    committed = (ROOT / "docs" / "REPORT.md").read_text()
    assert body(out.read_text()) == body(committed)
    assert sum(line.startswith(DATE_PREFIX) for line in committed.splitlines()) == 1


def test_configurations_differing_only_in_a_key_the_results_code_never_heard_of_are_never_merged(tmp_path):
    """Restart, K-fraction and S selection group by the run's whole configuration (results.json), so two
    configurations that differ in nothing but a new method's own hyper-parameter keep their own best restarts."""
    from mapa_exp.sweeps.results import best_restarts, choose_on_validation, choose_s

    sweep = tmp_path / "sweep"
    for i, (temperature, seed, val) in enumerate([(0.5, 0, -1.0), (0.5, 1, -2.0), (2.0, 0, -3.0), (2.0, 1, -4.0)]):
        configuration = {"dataset.name": "circle", "method.name": "novel", "method.S": 4, "method.temperature": temperature}
        res = dict(dataset="circle", method="novel", S=4, seed=seed, draw=0, status="completed", val_bound=val,
                   configuration=configuration)
        ev = dict(status="completed", metrics={"val_loglik/quadrature": val, "test_kl/quadrature": -val})
        _run_folder(sweep, f"{i}_novel", res, ev, CFG.format(seed=seed, method="novel"))
    table = collect([sweep])
    best = best_restarts(table)
    assert len(best) == 2  # one best restart per temperature, not one for both
    assert sorted(best["val_loglik/quadrature"]) == [-3.0, -1.0]
    assert best["config_id"].nunique() == 2 and best["config_id_s"].nunique() == 2
    assert len(choose_s(choose_on_validation(table), "val_loglik/quadrature")) == 2
