"""W&B: a 2-job multirun with logger=wandb and WANDB_MODE=offline gives two separate offline runs, each
grouped by the sweep, tagged by dataset and method, with the resolved config and its own metrics."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from tests.conftest import ROOT

pb = pytest.importorskip("wandb.proto.wandb_internal_pb2")

BLOCK, HEADER = 32768, 7  # the .wandb file: a LevelDB-style log of protobuf Records in 32 KiB blocks


def read_wandb_records(path: Path) -> list:
    """Every ``wandb_internal_pb2.Record`` of an offline run file (``run-<id>.wandb``), in order."""
    data = path.read_bytes()
    ident, magic, version = struct.unpack("<4sHB", data[:HEADER])
    assert (ident, magic, version) == (b":W&B", 0xBEE1, 0), f"{path} is not a W&B log (header {data[:HEADER]!r})"
    records, pending, pos = [], b"", HEADER
    while pos + HEADER <= len(data):
        if BLOCK - pos % BLOCK < HEADER:  # a block's tail too short for a chunk header is padding
            pos += BLOCK - pos % BLOCK
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + HEADER])
        chunk, pos = data[pos + HEADER:pos + HEADER + length], pos + HEADER + length
        if kind == 0:  # zero padding up to the end of the block
            pos += BLOCK - pos % BLOCK if pos % BLOCK else 0
            continue
        pending = chunk if kind in (1, 2) else pending + chunk  # FULL, FIRST | MIDDLE, LAST
        if kind in (1, 4):
            rec = pb.Record()
            rec.ParseFromString(pending)
            records.append(rec)
            pending = b""
    return records


def offline_run(folder: Path) -> dict:
    """The run record, resolved config, history rows and final summary of one offline run folder."""
    (file,) = folder.glob("run-*.wandb")
    out = {"run": None, "config": {}, "history": [], "summary": {}, "exit": None}
    for rec in read_wandb_records(file):
        kind = rec.WhichOneof("record_type")
        if kind == "run":
            out["run"] = rec.run
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.run.config.update if i.key})
        elif kind == "config":
            out["config"].update({i.key: json.loads(i.value_json) for i in rec.config.update if i.key})
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.history.item})
        elif kind == "summary":
            out["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in rec.summary.update})
        elif kind == "exit":
            out["exit"] = rec.exit.exit_code
    return out


def test_multirun_gives_one_offline_run_per_job(tmp_path, cache_dir):
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "outputs"), "MAPA_EXP_CACHE": str(cache_dir),
           "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    sweep = tmp_path / "outputs" / "multiruns" / "wb"
    p = subprocess.run([sys.executable, "train.py", "-m", "experiment=paper_density_smoke", "logger=wandb",
                        "method=vae,mapa", "seed=0", "dataset.draw=0", "evaluate=false", f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    jobs = sorted(d for d in sweep.iterdir() if d.is_dir())
    assert [d.name for d in jobs] == ["0_spiral_vae_S2_seed0_draw0", "1_spiral_mapa_S2_seed0_draw0"]
    runs = []
    for job in jobs:
        folders = list((job / "wandb").glob("offline-run-*"))
        assert len(folders) == 1, f"{job.name}: {folders}"  # one W&B run per job, in the job's own folder
        run = offline_run(folders[0])
        runs.append(run)
        method = job.name.split("_")[2]
        r = run["run"]
        assert r.project == "mapa-exp" and r.job_type == "train"
        assert r.run_group == "multiruns/wb"  # grouped by sweep
        assert list(r.tags) == ["spiral", method, "paper_density_smoke"]
        assert r.display_name == f"spiral-{method}-S2-seed0-draw0"
        assert folders[0].name.endswith(r.run_id)
        # the resolved config: values, not interpolations
        assert run["config"]["method"]["name"] == method and run["config"]["dataset"]["n_train"] == 200
        assert run["config"]["method"]["S"] == 2 and "hydra" not in run["config"]
        if method == "mapa":
            assert run["config"]["method"]["K"] == 1
        assert run["exit"] == 0  # finished (wandb.finish) before the next job started
        # its own metrics: the last validation bound equals metrics.csv's
        metrics = pd.read_csv(job / "metrics.csv")
        val = [h["val/bound"] for h in run["history"] if "val/bound" in h]
        assert len(val) == 2  # 2 epochs, validated every epoch
        assert val[-1] == pytest.approx(metrics["val/bound"].dropna().iloc[-1], rel=1e-6)
        assert run["summary"]["val/bound"] == pytest.approx(val[-1])
        assert max(h.get("epoch", 0) for h in run["history"]) == 1
    assert runs[0]["run"].run_id != runs[1]["run"].run_id  # never merged
    assert runs[0]["summary"]["val/bound"] != runs[1]["summary"]["val/bound"]
    assert runs[0]["history"][0]["train/passes_decoder_step"] == 200  # VAE, S = 2: B * S decoder passes


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
