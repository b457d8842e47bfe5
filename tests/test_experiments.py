"""Experiment configs (conf/experiment/): their grids, K from S, every smoke variant trained for real, and a
local parallel sweep (joblib) collected into a table and a report."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mapa_exp.errors import ConfigError
from mapa_exp.resolvers import mapa_k, mapa_sweep_group
from mapa_exp.sweeps.results import read_table
from mapa_exp.runs.training import run_training
from tests.conftest import CONF, ROOT, compose_cfg

# experiment -> number of jobs of its grid
GRIDS = {
    "paper_density": 5 * 5 * 7 * 5 * 5,
    "paper_passes": 5 * 2 * 7 * 3,
    "paper_posteriors": 5,
    "paper_nonidentifiability": 2 * 2 * 5,
    "bandwidth": 5 * 6 * 5 * 5,
    "paper_density_smoke": 20,
    "paper_passes_smoke": 4,
    "paper_posteriors_smoke": 2,
    "paper_nonidentifiability_smoke": 2,
    "bandwidth_smoke": 2,
}


def sweep_jobs(cfg) -> list[list[str]]:
    """The jobs (override lists) Hydra's basic sweeper makes of ``hydra.sweeper.params``."""
    params = cfg.hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def test_every_experiment_file_is_covered():
    assert {p.stem for p in (CONF / "experiment").glob("*.yaml")} == set(GRIDS)


@pytest.mark.parametrize("name", sorted(GRIDS))
def test_experiment_grid_and_folders(name, tmp_path, cache_dir):
    cfg = compose_cfg([f"experiment={name}"], tmp_path / "run", cache_dir)
    jobs = sweep_jobs(cfg)
    assert len(jobs) == GRIDS[name]
    assert len({tuple(j) for j in jobs}) == len(jobs)  # no job twice
    # sweeps are named after the experiment; each job's folder after its number and what varies
    assert f"/multiruns/{name}/" in cfg.hydra.sweep.dir
    subdir = OmegaConf.to_container(cfg.hydra.sweep, resolve=False)["subdir"]
    assert subdir.startswith("${mapa_num:${hydra.job.num}}_${dataset.name}_${method.name}")  # stable across requeues
    assert list(cfg.tags) == [name]
    if name.endswith("_smoke"):
        assert (cfg.trainer.max_epochs, cfg.dataset.n_train) == (2, 200)
        # only the density smoke sweep is evaluated (by quadrature alone: seconds, not minutes)
        assert cfg.evaluate == (name == "paper_density_smoke")
        if cfg.evaluate:
            assert list(cfg.evaluator) == ["quadrature"]
    else:
        assert cfg.trainer.max_epochs >= 20 and cfg.dataset.n_train == 1000
    assert GRIDS[name] <= 1000 or cfg.hydra.sweeper.max_batch_size <= 1000  # SLURM's MaxArraySize


def test_paper_density_is_the_full_paper_grid(tmp_path, cache_dir):
    cfg = compose_cfg(["experiment=paper_density"], tmp_path / "run", cache_dir)
    p = cfg.hydra.sweeper.params
    assert p["dataset"].split(",") == ["figure8", "circle", "absolute_value", "clusters", "spiral"]
    assert p["method"].split(",") == ["vae", "iwae", "mapa", "mapa_gt", "mapa_naive"]
    assert [int(s) for s in p["method.S"].split(",")] == [1, 2, 5, 10, 20, 50, 100]
    assert (p["seed"], p["dataset.draw"]) == ("range(5)", "range(5)")
    assert cfg.evaluate is True and cfg.trainer.max_epochs == 1000


@pytest.mark.parametrize("S, fraction, K", [(1, 0.5, 1), (2, 0.5, 1), (5, 0.5, 3), (10, 0.5, 5), (100, 0.5, 50),
                                            (1, 0.1, 1), (10, 0.1, 1), (20, 0.1, 2), (30, 0.1, 3), (50, 0.1, 5),
                                            (100, 0.0, 1), (7, None, None)])
def test_K_from_S(S, fraction, K):
    assert mapa_k(S, fraction, None) == K
    assert mapa_k(S, fraction, 5) == (5 if fraction is None else K)


def test_K_fraction_in_configs(tmp_path, cache_dir):
    for S in (1, 2, 5, 10, 20, 50, 100):
        cfg = compose_cfg(["experiment=paper_density", "method=mapa", f"method.S={S}"], tmp_path / "r", cache_dir)
        assert cfg.method.K == max(1, math.ceil(0.5 * S)) == cfg.method.module.proposal.K
    cfg = compose_cfg(["experiment=paper_passes", "method=mapa_gt", "method.S=50", "method.K_fraction=0.1"], tmp_path / "r", cache_dir)
    assert cfg.method.K == 5
    cfg = compose_cfg(["experiment=paper_passes", "method=mapa_naive", "method.S=50", "method.K_fraction=0"], tmp_path / "r", cache_dir)
    assert cfg.method.K == 1
    assert compose_cfg(["method=mapa"], tmp_path / "r", cache_dir).method.K == 5  # no fraction: the fixed default
    assert "K" not in compose_cfg(["experiment=paper_density", "method=iwae"], tmp_path / "r", cache_dir).method
    with pytest.raises(ConfigError, match="method.K_fraction=1.5"):
        mapa_k(10, 1.5)


def test_sweep_group_is_the_sweep_folder_below_the_outputs():
    assert mapa_sweep_group("RunMode.MULTIRUN", "/o/multiruns/x/2026", "/o") == "multiruns/x/2026"
    assert mapa_sweep_group("RunMode.MULTIRUN", "/elsewhere/s", "/o") == "/elsewhere/s"
    assert mapa_sweep_group("RunMode.RUN", "/o/multiruns/x", "/o") is None


@pytest.mark.parametrize("name", sorted(n for n in GRIDS if n.endswith("_smoke")))
def test_smoke_experiment_first_job_trains(name, tmp_path, cache_dir):
    """The first job of every smoke sweep, trained in-process exactly as the sweep would run it."""
    first = sweep_jobs(compose_cfg([f"experiment={name}"], tmp_path / "x", cache_dir))[0]
    cfg = compose_cfg([f"experiment={name}", *first], tmp_path / "run", cache_dir)
    res = run_training(cfg)
    assert res["status"] == "completed" and res["epochs"] == 2
    values = dict(o.split("=", 1) for o in first)
    assert res["dataset"] == values["dataset"] and res["method"] == values["method"]
    if "method.S" in values:
        assert res["S"] == int(values["method.S"])
    if res["method"].startswith("mapa"):
        assert res["K"] == max(1, math.ceil(cfg.method.K_fraction * res["S"]))
        assert 1 <= res["passes_per_point_decoder"] <= min(res["K"] + res["S"], 200 / 100)
    assert math.isfinite(res["val_bound"])


@pytest.mark.slow
def test_joblib_sweep_then_collect_then_report(tmp_path, cache_dir):
    """`python train.py -m experiment=paper_passes_smoke hydra/launcher=joblib`, then collect.py and report.py."""
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "outputs"), "MAPA_EXP_CACHE": str(cache_dir), "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, "train.py", "-m", "experiment=paper_passes_smoke", "hydra/launcher=joblib",
                        "hydra.launcher.n_jobs=2"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns" / "paper_passes_smoke").iterdir()
    runs = sorted(d.name for d in sweep.iterdir() if d.is_dir())
    assert runs == ["0000_spiral_iwae_S1_Kf0.5", "0001_spiral_iwae_S10_Kf0.5", "0002_spiral_mapa_S1_Kf0.5", "0003_spiral_mapa_S10_Kf0.5"]
    results = {r: json.loads((sweep / r / "results.json").read_text()) for r in runs}
    assert {r["status"] for r in results.values()} == {"completed"}
    assert (results["0003_spiral_mapa_S10_Kf0.5"]["K"], results["0002_spiral_mapa_S1_Kf0.5"]["K"]) == (5, 1)

    p = subprocess.run([sys.executable, "scripts/collect.py", str(sweep)], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    table = read_table(sweep / "tidy.parquet")
    assert table["run_dir"].nunique() == 4 and set(table["status"]) == {"completed"}
    ppd = table[table["metric"] == "passes_per_point_decoder"].set_index("run")["value"]
    assert ppd["0000_spiral_iwae_S1_Kf0.5"] == 1.0 and ppd["0001_spiral_iwae_S10_Kf0.5"] == 10.0  # IWAE: S per point
    assert ppd["0003_spiral_mapa_S10_Kf0.5"] <= 200 / 100  # MAPA: at most N/B

    out = tmp_path / "docs" / "REPORT.md"
    p = subprocess.run([sys.executable, "scripts/report.py", str(sweep / "tidy.parquet"), "-o", str(out)], cwd=ROOT,
                       env=env, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    text = out.read_text()
    assert "Experiments: paper_passes_smoke; runs: 4." in text
    assert "| paper_passes_smoke | train | completed | 4 |" in text
    assert "| iwae | 1.0 | 10.0 |" in text  # passes per point at S = 1 and S = 10
    assert "No test KL in these tables" in text
    assert (tmp_path / "docs" / "figures" / "passes.png").stat().st_size > 5000


def test_bad_K_fraction_names_the_key_and_the_value(tmp_path, cache_dir):
    cfg = compose_cfg(["method=mapa", "method.K_fraction=2"], tmp_path / "r", cache_dir)
    with pytest.raises(Exception, match=r"method.K_fraction=2: must be a number in \[0, 1\] \(or null for a fixed K\)"):
        OmegaConf.to_yaml(cfg.method, resolve=True)


@pytest.mark.slow
def test_paper_density_smoke_end_to_end(tmp_path, cache_dir):
    """The issue's acceptance command: the density smoke sweep with joblib, evaluated, collected, reported."""
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "outputs"), "MAPA_EXP_CACHE": str(cache_dir), "MPLBACKEND": "Agg"}
    p = subprocess.run([sys.executable, "train.py", "-m", "experiment=paper_density_smoke", "hydra/launcher=joblib"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    assert p.returncode == 0, p.stderr[-3000:]
    (sweep,) = (tmp_path / "outputs" / "multiruns" / "paper_density_smoke").iterdir()
    assert len(list(sweep.glob("*/results.json"))) == 20 and len(list(sweep.glob("*/eval.json"))) == 20
    for script, args in (("collect.py", [str(sweep)]),
                         ("report.py", [str(sweep / "tidy.parquet"), "-o", str(tmp_path / "docs" / "REPORT.md")])):
        p = subprocess.run([sys.executable, f"scripts/{script}", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr
    table = read_table(sweep / "tidy.parquet")
    assert set(table["status"]) == {"completed"} and table["run_dir"].nunique() == 20
    kl = table[table["metric"] == "test_kl/quadrature"]
    assert len(kl) == 20 and (kl["value"] > -1e-6).all()  # a KL divergence is not negative
    text = (tmp_path / "docs" / "REPORT.md").read_text()
    assert "### spiral" in text and "| mapa_gt | " in text
    # the smoke sweep's one data set (spiral): its density claims judged, with one of the three outcomes
    claims = [l for l in text.splitlines() if "**MAPA below VAE and IWAE**" in l and "both of the above" in l]
    assert len(claims) == 1 and all(any(o in l for o in ("holds", "fails", "undecided")) for l in claims), claims
    assert (tmp_path / "docs" / "figures" / "density.png").exists()


def test_bench_sweep_groups_the_restarts_and_draws_of_a_configuration():
    spec = importlib.util.spec_from_file_location("bench_sweep", ROOT / "scripts" / "bench_sweep.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    jobs = bench.sweep_jobs("paper_density", [])
    assert len(jobs) == 4375 and bench.restarts_per_configuration(jobs) == 25  # R x D consecutive jobs
    assert {o for o in jobs[0] if not o.startswith(("seed=", "dataset.draw="))} == \
        {o for o in jobs[24] if not o.startswith(("seed=", "dataset.draw="))}
    assert bench.restarts_per_configuration(bench.sweep_jobs("paper_density_smoke", [])) == 4


@pytest.mark.slow  # ~25 s: a whole script in a subprocess
def test_posterior_trends_script_writes_only_its_figure_and_tables(tmp_path, cache_dir):
    """The figure script from the command line (it once failed before composing: the configs' resolvers were not
    registered): its three outputs, a finite trend slope, and no folder of Hydra's own in the working directory."""
    env = {**os.environ, "MAPA_EXP_CACHE": str(cache_dir), "MPLBACKEND": "Agg"}
    work = tmp_path / "cwd"
    work.mkdir()
    p = subprocess.run([sys.executable, str(ROOT / "scripts" / "posterior_trends.py"), "dataset=figure8",
                        "dataset.n_train=200", "dataset.n_val=50", "dataset.n_test=50", "n_points=2", "J=200",
                        f"out_dir={tmp_path / 'figs'}"], cwd=work, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-2000:]
    assert sorted(f.name for f in (tmp_path / "figs").iterdir()) == [
        f"posterior_trends_figure8.{e}" for e in ("csv", "json", "png")]
    slope = json.loads((tmp_path / "figs" / "posterior_trends_figure8.json").read_text())
    assert math.isfinite(slope["slope"]) and slope["n"] > 0 and len(slope["points"]) == 2
    assert list(work.iterdir()) == []
