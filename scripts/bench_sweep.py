#!/usr/bin/env python
"""Sweep throughput: runs per hour of a sweep of many tiny runs, by launcher, one job per run or stacked (a
configuration's restarts and draws trained as one model); writes the "Sweep throughput" section of
docs/benchmarks.md. (The paper grid's cost at scale: scripts/bench_grid.py.)

    python scripts/bench_sweep.py                              # paper_density_smoke (20 runs), every variant
    python scripts/bench_sweep.py --experiment paper_passes_smoke --variants slurm_1,slurm_stacked

Variants (each runs the whole sweep once, one after the other, from a warm data cache):
  * ``slurm_1``        -- SLURM, one run per array task: a Python start-up per run (submitit's default);
  * ``slurm_stacked``  -- SLURM, ``stack=true``: a configuration's restarts and draws as one stacked job, one
                          array task each (mapa_exp.sweeps.stacking);
  * ``process_per_run`` -- one ``python train.py`` process per run, one after the other (a shell loop);
  * ``basic``          -- Hydra's basic launcher: every run in this one process, one after the other;
  * ``joblib``         -- Hydra's joblib launcher: worker processes (one per core) that are reused;
  * ``joblib_stacked`` -- the same with ``stack=true``.
The SLURM variants need the cluster of scripts/slurm_cluster.sh (skipped, and said so, without one).
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from mapa_exp.cli import description
from mapa_exp.benchmarking import write_markdown_section

ROOT = Path(__file__).resolve().parents[1]

VARIANTS = ("slurm_1", "slurm_stacked", "process_per_run", "basic", "joblib", "joblib_stacked")
SLURM = ["hydra/launcher=slurm", "hydra.launcher.partition=null", "hydra.launcher.cpus_per_task=1",
         "hydra.launcher.mem_gb=1", "hydra.launcher.gpus_per_node=null", "hydra.launcher.setup=[]"]


def sweep_jobs(experiment: str, extra: list[str]) -> list[list[str]]:
    """The sweep's jobs (override lists), as Hydra's basic sweeper makes them."""
    from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from mapa_exp.config import compose

    cfg = compose("train", [f"experiment={experiment}", *extra], return_hydra_config=True)
    params = cfg.hydra.sweeper.params
    overrides = OverridesParser.create().parse_overrides([f"{k}={v}" for k, v in params.items()])
    return [job for batch in BasicSweeper.split_arguments(overrides, None) for job in batch]


def restarts_per_configuration(jobs: list[list[str]]) -> int:
    """R x D: how many consecutive jobs differ only in seed and dataset.draw."""
    def config(job):
        return tuple(o for o in job if not o.startswith(("seed=", "dataset.draw=")))
    return max(len(list(g)) for _, g in itertools.groupby(jobs, key=config))


def slurm_available() -> str | None:
    """None when a SLURM controller answers, else why not."""
    if shutil.which("sinfo") is None:
        return "no SLURM client (run: bash scripts/slurm_cluster.sh start)"
    p = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True)
    if p.returncode != 0 or not p.stdout.strip():
        return "no SLURM controller answers (run: bash scripts/slurm_cluster.sh start)"
    return None


def run_variant(variant: str, experiment: str, extra: list[str], jobs: list[list[str]], together: int, out: Path,
                env: dict) -> dict:
    """Run the sweep once with ``variant``; returns wall time, runs and their summed training time."""
    sweep = out / variant
    base = [sys.executable, "train.py"]
    commands = {
        "slurm_1": [[*base, "-m", f"experiment={experiment}", *extra, *SLURM, f"hydra.sweep.dir={sweep}"]],
        "slurm_stacked": [[*base, "-m", f"experiment={experiment}", *extra, *SLURM, "stack=true",
                           f"hydra.sweep.dir={sweep}"]],
        "basic": [[*base, "-m", f"experiment={experiment}", *extra, f"hydra.sweep.dir={sweep}"]],
        "joblib": [[*base, "-m", f"experiment={experiment}", *extra, "hydra/launcher=joblib", f"hydra.sweep.dir={sweep}"]],
        "joblib_stacked": [[*base, "-m", f"experiment={experiment}", *extra, "hydra/launcher=joblib", "stack=true",
                            f"hydra.sweep.dir={sweep}"]],
        "process_per_run": [[*base, f"experiment={experiment}", *extra, *job, f"hydra.run.dir={sweep}/{i}"]
                            for i, job in enumerate(jobs)],
    }[variant]
    t0 = time.perf_counter()
    for cmd in commands:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        if p.returncode != 0:
            raise RuntimeError(f"{variant}: {' '.join(cmd)} failed:\n{p.stderr[-3000:]}")
    wall = time.perf_counter() - t0
    results = [json.loads(f.read_text()) for f in sweep.rglob("results.json")]
    done = [r for r in results if r.get("status") == "completed"]
    if len(done) != len(jobs):
        raise RuntimeError(f"{variant}: {len(done)} of {len(jobs)} runs completed")
    train = sum(r["wall_time_s"] / r.get("stack_size", 1) for r in done)  # a stack's time is its members' together
    return {"variant": variant, "runs": len(done), "wall_s": wall, "runs_per_hour": 3600 * len(done) / wall,
            "train_s": train}


DESCRIPTION = {
    "slurm_1": "SLURM, one run per array task (a Python start-up per run)",
    "slurm_stacked": "SLURM, `stack=true`: each configuration's R x D = {together} runs as one stacked task",
    "process_per_run": "one `python train.py` process per run, one after the other",
    "basic": "Hydra's basic launcher: all runs in one process",
    "joblib": "Hydra's joblib launcher: {cores} reused worker processes",
    "joblib_stacked": "Hydra's joblib launcher, `stack=true`: {cores} workers, one stacked job per configuration",
}


def markdown(rows: list[dict], skipped: dict, experiment: str, extra: list[str], together: int, n_jobs: int) -> str:
    cores = os.cpu_count()
    lines = [
        f"Measured by `python scripts/bench_sweep.py` on {platform.node()} ({cores} CPU cores, {platform.processor() or platform.machine()}), "
        f"{time.strftime('%Y-%m-%d %H:%M')}: the sweep `experiment={experiment}` {' '.join(extra)} ({n_jobs} runs of "
        f"2 epochs on 200 points; R x D = {together} restarts and draws per configuration), each variant once, one "
        "after the other, from a warm data cache. A run's own work (data set-up, training, results) is the sum of "
        "the runs' `wall_time_s`; the rest is Python and library start-up, scheduling and Hydra.",
        "",
        "| variant | runs | wall time (s) | runs per hour | run work (s) | overhead |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        desc = DESCRIPTION[r["variant"]].format(together=together, cores=cores)
        overhead = 1 - r["train_s"] / r["wall_s"] if not r["variant"].startswith("joblib") else float("nan")
        lines.append(f"| {desc} | {r['runs']} | {r['wall_s']:.1f} | {r['runs_per_hour']:.0f} | {r['train_s']:.1f} | "
                     + (f"{100 * overhead:.0f}% |" if overhead == overhead else "(parallel) |"))
    by = {r["variant"]: r for r in rows}
    if "slurm_1" in by and "slurm_stacked" in by:
        lines += ["", f"Stacking a configuration's restarts and draws into one SLURM task gives "
                      f"{by['slurm_stacked']['runs_per_hour'] / by['slurm_1']['runs_per_hour']:.1f}x the runs per hour "
                      "of one task per run, with the same run folders and the same numbers."]
    if "joblib" in by and "joblib_stacked" in by:
        lines += ["", f"Locally with joblib, stacking gives "
                      f"{by['joblib_stacked']['runs_per_hour'] / by['joblib']['runs_per_hour']:.1f}x the runs per hour."]
    if "process_per_run" in by and "basic" in by:
        lines += ["", f"Locally, one process for the whole sweep (Hydra's basic launcher) gives "
                      f"{by['basic']['runs_per_hour'] / by['process_per_run']['runs_per_hour']:.1f}x the runs per hour "
                      "of a process per run."]
    for v, why in skipped.items():
        lines += ["", f"Not measured: {v} ({why})."]
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--experiment", default="paper_density_smoke")
    ap.add_argument("--overrides", nargs="*", default=["evaluate=false"], help="extra overrides for every run")
    ap.add_argument("--variants", default=",".join(VARIANTS))
    ap.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    a = ap.parse_args(argv)
    variants = [v for v in a.variants.split(",") if v]
    unknown = set(variants) - set(VARIANTS)
    if unknown:
        print(f"error: --variants={sorted(unknown)}: must be among {VARIANTS}", file=sys.stderr)
        return 2
    jobs = sweep_jobs(a.experiment, a.overrides)
    together = restarts_per_configuration(jobs)
    skipped = {}
    why = slurm_available()
    if why:
        skipped = {v: why for v in variants if v.startswith("slurm")}
        variants = [v for v in variants if v not in skipped]
    with tempfile.TemporaryDirectory(prefix="bench_sweep_") as tmp:
        out = Path(tmp)
        env = {**os.environ, "MAPA_EXP_OUTPUTS": str(out / "outputs"), "MAPA_EXP_CACHE": str(out / "cache"),
               "WANDB_MODE": "offline"}
        # warm the caches (surrogate fits, proximity structures) once, untimed
        first = [o for o in jobs[0] if not o.startswith("dataset.draw=")]
        for i, draw in enumerate(sorted({o for job in jobs for o in job if o.startswith("dataset.draw=")} or {""})):
            subprocess.run([sys.executable, "train.py", f"experiment={a.experiment}", *a.overrides, *first,
                            *([draw] if draw else []), f"hydra.run.dir={out}/warm/{i}"],
                           cwd=ROOT, env=env, capture_output=True, check=True)
        rows = []
        for v in variants:
            r = run_variant(v, a.experiment, a.overrides, jobs, together, out, env)
            print(f"{v:16s} {r['runs']} runs in {r['wall_s']:.1f} s: {r['runs_per_hour']:.0f} runs/hour "
                  f"(run work {r['train_s']:.1f} s)", flush=True)
            rows.append(r)
    write_markdown_section(a.docs, "Sweep throughput", markdown(rows, skipped, a.experiment, a.overrides, together, len(jobs)))
    print(f"wrote the 'Sweep throughput' section of {a.docs}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
