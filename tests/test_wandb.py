"""W&B dashboards, read back with the W&B SDK's own reader of offline run files (``wandb leet inspect --json``).

A 2-job multirun with ``logger=wandb``, ``WANDB_MODE=offline`` and ``evaluate=true`` gives two separate runs,
each grouped by the sweep, tagged by dataset and method, with the resolved config, its curves against
``trainer/global_step``, ``results.json`` as summary, its pictures, the evaluation metrics and the per-point
table; a later ``evaluate.py`` joins the same run id; ``report.py --wandb`` adds the sweep's summary run.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT

WANDB = Path(sys.executable).with_name("wandb")  # the SDK's command line, installed with it


def inspect(folder: Path) -> list[dict]:
    """Every record of an offline run folder, as the SDK's reader prints them (one JSON object per record)."""
    p = subprocess.run([str(WANDB), "leet", "inspect", "--json", str(folder)], capture_output=True, text=True,
                       timeout=120)
    assert p.returncode == 0, p.stderr[-2000:]
    return [json.loads(line) for line in p.stdout.splitlines() if line.strip()]


def offline_run(folder: Path) -> dict:
    """The run record, resolved config, history rows, final summary, files and artifacts of one run folder."""
    out = {"run": None, "config": {}, "history": [], "summary": {}, "files": [], "artifacts": [], "exit": None}
    for rec in inspect(folder):
        kind = rec["type"]
        if kind == "run":
            out["run"] = rec["run"]
            out["config"].update({k: v for k, v in rec["run"]["config"]["update"].items() if k != "_wandb"})
        elif kind == "config":
            out["config"].update(rec["config"].get("update", {}))
        elif kind == "history":
            out["history"].append(rec["history"]["item"])
        elif kind == "summary":
            out["summary"].update(rec["summary"].get("update", {}))
        elif kind == "files":
            out["files"] += [f["path"] for f in rec["files"]["files"]]
        elif kind == "artifact":
            out["artifacts"].append(rec["artifact"])
        elif kind == "exit":
            out["exit"] = rec["exit"]["exit_code"]
    return out


def wandb_env(tmp_path: Path, cache_dir: Path) -> dict:
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "outputs"), "MAPA_EXP_CACHE": str(cache_dir),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true", "MPLBACKEND": "Agg"}
    env.pop("WANDB_API_KEY", None)
    return env


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, cache_dir):
    """Two jobs (VAE, MAPA) trained with logger=wandb offline and evaluated (quadrature) in the same process."""
    tmp = tmp_path_factory.mktemp("wb")
    folder = tmp / "outputs" / "multiruns" / "wb"
    p = subprocess.run([sys.executable, "train.py", "-m", "experiment=paper_density_smoke", "logger=wandb",
                        "method=vae,mapa", "seed=0", "dataset.draw=0", "evaluate=true", "evaluator=quadrature",
                        "evaluator.quadrature.J_1d=1000", f"hydra.sweep.dir={folder}"],
                       cwd=ROOT, env=wandb_env(tmp, cache_dir), capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    return folder


@pytest.mark.slow  # W&B end to end: subprocesses and the SDK's reader
def test_each_job_is_one_run_with_config_curves_summary_pictures_evaluation_and_table(sweep):
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir() and d.name[0].isdigit())
    assert [d.name for d in jobs] == ["0000_spiral_vae_S2_Kf0.5_seed0_draw0", "0001_spiral_mapa_S2_Kf0.5_seed0_draw0"]
    runs = []
    for job in jobs:
        folders = list((job / "wandb").glob("offline-run-*"))
        assert len(folders) == 1, f"{job.name}: {folders}"  # one W&B run per job, evaluation included
        run = offline_run(folders[0])
        runs.append(run)
        method = job.name.split("_")[2]
        r = run["run"]
        assert r["project"] == "mapa-exp" and r["job_type"] == "train"
        assert r["run_group"] == "multiruns/wb"  # grouped by sweep
        assert r["tags"] == ["spiral", method, "paper_density_smoke"]
        assert r["display_name"] == f"spiral-{method}-S2-seed0-draw0" and folders[0].name.endswith(r["run_id"])
        # the resolved config: values, not interpolations
        assert run["config"]["method"]["name"] == method and run["config"]["dataset"]["n_train"] == 200
        assert run["config"]["method"]["S"] == 2 and "hydra" not in run["config"]
        # curves: per step and per epoch, every row on the trainer/global_step axis; the last validation bound
        # equals metrics.csv's
        metrics = pd.read_csv(job / "metrics.csv")
        curves = [h for h in run["history"] if "trainer/global_step" in h]
        val = [h["val/bound"] for h in curves if "val/bound" in h]
        assert len(val) == 2 and val[-1] == pytest.approx(metrics["val/bound"].dropna().iloc[-1], rel=1e-6)
        assert [h["train/bound_step"] for h in curves if "train/bound_step" in h] == pytest.approx(
            metrics["train/bound_step"].dropna().tolist(), rel=1e-6)
        assert {h["epoch"] for h in curves if any(k.startswith(("train/", "val/")) for k in h)} == {0, 1}
        # the summary: results.json's fields
        results = json.loads((job / "results.json").read_text())
        for key in ("status", "train_bound", "val_bound", "passes_per_point_decoder", "surrogate_mse",
                    "wall_time_s", "best_epoch"):
            assert run["summary"][key] == pytest.approx(results[key]), key
        # pictures: image files logged under pictures/
        pictures = [f for f in run["files"] if f.startswith("media/images/pictures/")]
        assert {f.split("/")[3].split("_")[0] for f in pictures} == {"decoder", "samples", "posterior"}
        assert all((folders[0] / "files" / f).stat().st_size > 5000 for f in pictures)
        # the evaluation joined the same run: eval.json's metrics and the per-point table
        evaluation = json.loads((job / "eval.json").read_text())["metrics"]
        assert {k: run["summary"][f"eval/{k}"] for k in evaluation} == pytest.approx(evaluation)
        (table,) = [f for f in run["files"] if f.startswith("media/table/eval/test_points_quadrature")]
        data = json.loads((folders[0] / "files" / table).read_text())
        assert data["columns"] == ["point", "log p_model", "log p_truth"] and len(data["data"]) == 100
        kl = sum(row[2] - row[1] for row in data["data"]) / len(data["data"])
        assert kl == pytest.approx(evaluation["test_kl/quadrature"], rel=1e-9)
        assert run["exit"] == 0  # finished before the next job started
    assert runs[0]["run"]["run_id"] != runs[1]["run"]["run_id"]  # never merged
    assert runs[0]["summary"]["val/bound"] != runs[1]["summary"]["val/bound"]
    assert runs[0]["history"][0]["train/passes_decoder_step"] == 200  # VAE, S = 2: B * S decoder passes


@pytest.mark.slow  # W&B end to end: subprocesses and the SDK's reader
def test_a_later_evaluation_resumes_the_same_run_id(sweep, tmp_path, cache_dir):
    """A separate evaluate.py writes a second offline folder of the same run (resume), which `wandb sync` uploads
    into that one run; its summary holds the new metrics."""
    job = sweep / "0000_spiral_vae_S2_Kf0.5_seed0_draw0"
    p = subprocess.run([sys.executable, "evaluate.py", f"run={job}", "evaluator=quadrature",
                        "evaluator.quadrature.J_1d=1500"], cwd=ROOT, env=wandb_env(tmp_path, cache_dir),
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    first, second = sorted((job / "wandb").glob("offline-run-*"))
    a, b = offline_run(first), offline_run(second)
    assert a["run"]["run_id"] == b["run"]["run_id"] and b["run"]["resume"]
    assert b["summary"]["eval/test_kl/quadrature"] == pytest.approx(
        json.loads((job / "eval.json").read_text())["metrics"]["test_kl/quadrature"])


@pytest.mark.slow  # W&B end to end: subprocesses and the SDK's reader
def test_report_logs_one_summary_run_with_figures_tables_and_the_parquet(sweep, tmp_path, cache_dir):
    env = wandb_env(tmp_path, cache_dir)
    for args in (["scripts/collect.py", str(sweep)],
                 ["scripts/report.py", str(sweep / "tidy.parquet"), "-o", str(tmp_path / "report" / "REPORT.md"),
                  "--wandb"]):
        p = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert p.returncode == 0, p.stderr[-3000:]
    (folder,) = (tmp_path / "report" / "wandb").glob("offline-run-*")
    assert p.stdout.strip().splitlines()[-1].endswith(f"offline: {folder}; upload it with: wandb sync {folder}")
    run = offline_run(folder)
    assert run["run"]["job_type"] == "report" and run["run"]["run_group"] == "multiruns/wb"  # the runs' group
    figures = [f for f in run["files"] if f.startswith("media/images/figures/")]
    assert any(f.split("/")[3].startswith("density") for f in figures)
    tables = {f.split("/")[3] for f in run["files"] if f.startswith("media/table/tables/")}
    assert len(tables) >= 3  # the report's markdown tables, each a wandb.Table
    (tidy,) = [a for a in run["artifacts"] if a["name"] == "tidy-results"]
    assert tidy["type"] == "dataset"
    assert [c["path"] for c in tidy["manifest"]["contents"]] == ["tidy.parquet"]
    assert run["exit"] == 0


def test_lost_wandb_service_is_noted_once_and_not_raised(caplog):
    """SLURM's SIGTERM kills wandb-core first: the logger must stop sending, not fail the run."""
    from mapa_exp.runs.loggers import WandbRun

    calls = []

    class BrokenRun:
        def log(self, *args, **kwargs):
            calls.append(args)
            raise ConnectionResetError("Connection lost")

        finish = log

    lg = WandbRun(project="p", save_dir=".", id="x", offline=True)
    lg.run = BrokenRun()  # as if wandb.init had returned, before the service died
    caplog.set_level("WARNING")
    lg.log_metrics({"step": 0, "a": 1.0})
    lg.log_metrics({"step": 1, "a": 2.0})
    lg.finalize("completed")
    assert lg.lost and len(calls) == 1  # after the first failure nothing more is sent
    assert caplog.text.count("W&B service lost") == 1


def test_an_offline_run_says_where_it_is_and_how_to_upload_it(tmp_path, caplog):
    """Offline (air-gapped clusters, WANDB_MODE=offline), the end of a run names its folder and the sync command."""
    from mapa_exp.runs.loggers import WandbRun

    folder = tmp_path / "wandb" / "offline-run-20261203_120000-abc"

    class FinishedRun:
        dir = str(folder / "files")

        def finish(self, exit_code=0):
            pass

    lg = WandbRun(project="p", save_dir=str(tmp_path), id="abc", offline=True)
    lg.run = FinishedRun()
    caplog.set_level("INFO")
    lg.finalize("completed")
    assert f"W&B offline run abc: {folder}; upload it with: wandb sync {folder}" in caplog.text
