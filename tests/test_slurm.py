"""SLURM for real: a one-node cluster on this machine (scripts/slurm_cluster.sh), sweeps submitted through the
submitit launcher (hydra/launcher=slurm), and a preempted job that requeues into its own folder and resumes.

Run with ``python -m pytest -m slurm`` (root and apt-get, or an installed SLURM, are needed; otherwise skipped).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from mapa_exp.resolvers import mapa_run_id
from tests.conftest import ROOT

pytestmark = pytest.mark.slurm

# the test cluster has 2 CPUs and little memory: one CPU per job so both jobs of a sweep run at once
LAUNCHER = ["hydra/launcher=slurm", "hydra.launcher.partition=null", "hydra.launcher.cpus_per_task=1",
            "hydra.launcher.mem_gb=1", "hydra.launcher.gpus_per_node=null", "hydra.launcher.timeout_min=30",
            "hydra.launcher.setup=[]"]


@pytest.fixture(scope="module")
def slurm_cluster():
    p = subprocess.run(["bash", "scripts/slurm_cluster.sh", "start"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    if p.returncode == 3:  # the script's "cannot run here": not root, or no apt-get and no SLURM
        pytest.skip(p.stderr.strip().splitlines()[-1])
    assert p.returncode == 0, f"scripts/slurm_cluster.sh start failed:\n{p.stdout}\n{p.stderr}"
    return p.stderr


def _env(tmp_path: Path) -> dict:
    return {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "outputs"), "MAPA_EXP_CACHE": str(tmp_path / "cache")}


def _results(run: Path) -> dict:
    try:
        return json.loads((run / "results.json").read_text())
    except (OSError, ValueError):
        return {}


def _job_id(run: Path) -> str:
    """The SLURM job id submitit gave the job, as Hydra recorded it (``<array id>_<task>``)."""
    return str(yaml.safe_load((run / ".hydra" / "hydra.yaml").read_text())["hydra"]["job"]["id"])


def _submitit_log(sweep: Path, job_id: str) -> str:
    """submitit's stdout and stderr logs of one job (every attempt)."""
    return "".join(p.read_text() for p in sorted((sweep / ".submitit").rglob(f"{job_id}_*log.*")))


def _squeue(job_id: str) -> list[str]:
    return subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T %r"], capture_output=True, text=True).stdout.split()


def _release_when_requeued(job_id: str, deadline: float) -> None:
    """Start the requeued job now: SLURM holds a requeued job back for its credential lifetime (2 minutes)."""
    while time.time() < deadline:
        if _squeue(job_id) == ["PENDING", "BeginTime"]:
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], check=True, timeout=30)
            return
        time.sleep(0.5)
    raise AssertionError(f"job {job_id} was not requeued")


def _finish(master: subprocess.Popen, log: Path, sweep: Path, job_id: str, timeout: float) -> str:
    """Wait for the sweep's master process (its output goes to ``log``), starting the job again whenever SLURM
    holds it back; on a timeout, fail with what the job, its logs and the master say (not a bare timeout)."""
    deadline = time.time() + timeout
    while master.poll() is None:
        if time.time() > deadline:
            master.kill()
            master.wait()
            job = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True)
            raise AssertionError(f"the sweep did not finish in {timeout:.0f} s; squeue: {_squeue(job_id)}\n"
                                 f"{job.stdout[-1500:]}{job.stderr[-500:]}\n-- submitit logs --\n"
                                 f"{_submitit_log(sweep, job_id)[-4000:]}\n-- master --\n{log.read_text()[-2000:]}")
        if _squeue(job_id) == ["PENDING", "BeginTime"]:  # requeued once more (e.g. SIGTERM after the requeue)
            subprocess.run(["scontrol", "update", f"JobId={job_id}", "StartTime=now"], timeout=30)
        time.sleep(1)
    return log.read_text()


def test_two_job_smoke_sweep_through_submitit(slurm_cluster, tmp_path):
    sweep = tmp_path / "outputs" / "sweep"
    p = subprocess.run([sys.executable, "train.py", "-m", "experiment=bandwidth_smoke", *LAUNCHER, f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted(d for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    assert [r.name for r in runs] == ["0000_spiral_mapa_h0.005_seed0_draw0", "0001_spiral_mapa_h0.02_seed0_draw0"]
    for i, run in enumerate(runs):
        res = _results(run)
        assert res["status"] == "completed" and res["epochs"] == 2
        assert res["run_dir"] == str(run)
        # it ran as task i of a SLURM array: Hydra recorded submitit's job id "<array>_<i>"
        job_id = _job_id(run)
        assert re.fullmatch(rf"\d+_{i}", job_id), job_id
        assert "Job completed successfully" in _submitit_log(sweep, job_id)
    assert [yaml.safe_load((r / "config.yaml").read_text())["method"]["bandwidth"] for r in runs] == [0.005, 0.02]


def test_stacked_sweep_runs_each_stack_as_one_array_task(slurm_cluster, tmp_path):
    """stack=true: 2 bandwidths x 2 seeds = 2 stacks of 2 members, each stack one task of the array."""
    sweep = tmp_path / "outputs" / "sweep"
    p = subprocess.run([sys.executable, "train.py", "-m", "experiment=bandwidth_smoke", "seed=0,1", "stack=true",
                        *LAUNCHER, f"hydra.sweep.dir={sweep}"],
                       cwd=ROOT, env=_env(tmp_path), capture_output=True, text=True, timeout=600)
    assert p.returncode == 0, p.stderr[-3000:]
    runs = sorted(d.name for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".") and d.name != "stacks")
    assert runs == ["0000_spiral_mapa_h0.005_seed0_draw0", "0001_spiral_mapa_h0.005_seed1_draw0",
                    "0002_spiral_mapa_h0.02_seed0_draw0", "0003_spiral_mapa_h0.02_seed1_draw0"]
    stacks = sorted((sweep / "stacks").iterdir())
    assert [s.name for s in stacks] == ["0000_spiral_mapa", "0001_spiral_mapa"]
    for i, stack in enumerate(stacks):
        job_id = _job_id(stack)
        assert re.fullmatch(rf"\d+_{i}", job_id), job_id  # task i of one array
        assert "Job completed successfully" in _submitit_log(sweep, job_id)
        members = json.loads((stack / "stack.json").read_text())["members"]
        assert [Path(m).name for m in members] == runs[2 * i: 2 * i + 2]
        for m in members:
            res = _results(Path(m))
            assert res["status"] == "completed" and res["epochs"] == 2 and res["stack_dir"] == str(stack)


@pytest.mark.parametrize("stacked", [False, True])
def test_preempted_job_requeues_into_its_own_folder_and_resumes(slurm_cluster, tmp_path, stacked):
    """SIGUSR2 (SLURM's warning before a time limit or preemption) mid-training: the job checkpoints, stops,
    is requeued by submitit and its second attempt resumes from the checkpoint in the same folder. A stacked
    job (two members in one task) stops, requeues and resumes as one: both members continue."""
    sweep = tmp_path / "outputs" / "sweep"
    epochs = 2000
    seeds = "0,1" if stacked else "0"
    out_file = open(tmp_path / "master.log", "wb")
    master = subprocess.Popen([sys.executable, "train.py", "-m", "experiment=bandwidth_smoke", "method.bandwidth=0.01",
                               f"seed={seeds}", f"stack={stacked}", f"trainer.max_epochs={epochs}", *LAUNCHER,
                               f"hydra.sweep.dir={sweep}"],
                              cwd=ROOT, env=_env(tmp_path), stdout=out_file, stderr=subprocess.STDOUT)
    runs = [sweep / "0000_spiral_mapa_h0.01_seed0_draw0", sweep / "0001_spiral_mapa_h0.01_seed1_draw0"][:2 if stacked else 1]
    job_dir = sweep / "stacks" / "0000_spiral_mapa" if stacked else runs[0]
    try:
        deadline = time.time() + 240
        while not all(_results(r).get("status") == "running" and (r / "metrics.csv").exists() for r in runs):
            assert time.time() < deadline and master.poll() is None, "the job never started training"
            time.sleep(0.5)
        time.sleep(2)
        job_id = _job_id(job_dir)
        subprocess.run(["scancel", "--signal=USR2", job_id], check=True, timeout=30)
        _release_when_requeued(job_id, deadline=time.time() + 120)
        out = _finish(master, tmp_path / "master.log", sweep, job_id, timeout=540)
    finally:
        if master.poll() is None:
            master.kill()
        out_file.close()
    assert master.returncode == 0, out[-3000:]
    for run in runs:
        res = _results(run)
        assert res["status"] == "completed" and res["epochs"] == epochs
        assert 0 < res["resumed_from_epoch"] < epochs  # the second attempt continued the first one
    folders = sorted(d.name for d in sweep.iterdir() if d.is_dir() and not d.name.startswith("."))
    assert folders == sorted([r.name for r in runs] + (["stacks"] if stacked else []))
    log = _submitit_log(sweep, job_id)
    assert "Caught signal SIGUSR2" in log and "Requeued job" in log


def test_scontrol_requeue_resumes_in_its_own_folder_with_the_same_wandb_run(slurm_cluster, tmp_path):
    """``scontrol requeue`` of a running sweep job (what an admin or a preempting scheduler does): SLURM sends
    SIGTERM (SIGKILL after KillWait) and reruns the batch script; the job checkpoints at the epoch's end, and
    its second attempt resumes from that checkpoint in the same run folder and continues the same W&B run."""
    from tests.test_wandb import offline_run  # skips this test only when wandb's protobufs are missing

    sweep = tmp_path / "outputs" / "sweep"
    epochs = 800
    env = {**_env(tmp_path), "WANDB_MODE": "offline", "WANDB_SILENT": "true"}
    env.pop("WANDB_API_KEY", None)
    out_file = open(tmp_path / "master.log", "wb")
    master = subprocess.Popen([sys.executable, "train.py", "-m", "experiment=bandwidth_smoke", "method.bandwidth=0.01",
                               f"trainer.max_epochs={epochs}", "logger=wandb", *LAUNCHER, f"hydra.sweep.dir={sweep}"],
                              cwd=ROOT, env=env, stdout=out_file, stderr=subprocess.STDOUT)
    run = sweep / "0000_spiral_mapa_h0.01_seed0_draw0"
    try:
        deadline = time.time() + 240
        # mid-training: a checkpoint written, and W&B's first 32 KiB block (with the run record) on disk --
        # wandb-core exits on SIGTERM at once, losing what it has not written yet (metrics.csv keeps every row)
        while not ((run / "checkpoints" / "last.ckpt").exists()
                   and any(f.stat().st_size > 32768 for f in run.glob("wandb/offline-run-*/run-*.wandb"))):
            assert time.time() < deadline and master.poll() is None, "the job never wrote a checkpoint"
            time.sleep(0.2)
        job_id = _job_id(run)
        subprocess.run(["scontrol", "requeue", job_id], check=True, timeout=30)
        _release_when_requeued(job_id, deadline=time.time() + 120)
        out = _finish(master, tmp_path / "master.log", sweep, job_id, timeout=540)
    finally:
        if master.poll() is None:
            master.kill()
        out_file.close()
    assert master.returncode == 0, out[-3000:]
    res = _results(run)
    assert res["status"] == "completed" and res["epochs"] == epochs and res["run_dir"] == str(run)
    assert 0 < res["resumed_from_epoch"] < epochs  # the second attempt continued the first one's checkpoint
    assert [d.name for d in sweep.iterdir() if d.is_dir() and not d.name.startswith(".")] == [run.name]
    assert _job_id(run) == job_id  # the same SLURM job ran again
    log = _submitit_log(sweep, job_id)
    assert "Bypassing signal SIGTERM" in log and "Job completed successfully" in log
    # one offline W&B run per attempt, both the run folder's W&B run
    attempts = sorted((run / "wandb").glob("offline-run-*"))
    assert len(attempts) == 2, attempts
    runs = [offline_run(a) for a in attempts]
    ids = {a.name.rsplit("-", 1)[1] for a in attempts} | {r["run"]["run_id"] for r in runs}
    assert ids == {mapa_run_id(run)}, ids
    assert runs[0]["history"] and runs[1]["exit"] == 0  # the first attempt logged, the second finished the run
