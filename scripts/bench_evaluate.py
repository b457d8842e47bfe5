"""Benchmark ``evaluate.py run=<folder>`` on its defaults (both evaluators), as a user runs it after training: the
wall time of a whole fresh process, split into its phases by the time each of its log lines arrives, for each
``num_threads`` setting, alternated ABBA so both settings see the same machine.

    python scripts/bench_evaluate.py <run folder> [--threads 1,null] [--rounds 2]   # JSON + docs section
    python scripts/bench_evaluate.py --render-only                               # rewrite the docs section

Each call scores a fresh copy of the run folder (no eval.json to reuse); a first, untimed call caches the ground
truth's scores, as the first evaluation of a data set does. Phases: **start** (imports, the run and the truth
loaded: up to the prior-candidate line), **prior** (MAPA's prior candidates fitted and scored on validation
data), **fit** (the mixture IWAE's q), **score** (both splits with S_eval = 5,000, to the process's end).
**ratio** = a setting's median wall time / the first setting's, in the same run.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HEADING = "Evaluating a run: evaluate.py on its defaults"
ROOT = Path(__file__).resolve().parents[1]
MARKS = {"prior": "fitting and scoring the prior candidates", "fit": "scoring with mog_iwae",
         "score": "mixture IWAE: scoring"}  # a phase starts at the first line holding its mark


def one_call(run: str, threads: str, workdir: Path) -> dict:
    folder = workdir / f"run_{threads}_{time.monotonic_ns()}"
    shutil.copytree(run, folder, ignore=shutil.ignore_patterns("eval.json", "eval.json.*"))
    start, seen = time.perf_counter(), {}
    p = subprocess.Popen([sys.executable, "-u", "evaluate.py", f"run={folder}", f"num_threads={threads}"], cwd=ROOT,
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    for line in p.stdout:
        for phase, mark in MARKS.items():
            if mark in line and phase not in seen:
                seen[phase] = time.perf_counter() - start
    rc, wall = p.wait(), time.perf_counter() - start
    shutil.rmtree(folder, ignore_errors=True)
    if rc != 0 or len(seen) != len(MARKS):
        raise RuntimeError(f"evaluate.py run={run} num_threads={threads} exited {rc} (phases seen: {sorted(seen)})")
    return {"threads": threads, "wall_s": wall, "start_s": seen["prior"], "prior_s": seen["fit"] - seen["prior"],
            "fit_s": seen["score"] - seen["fit"], "score_s": wall - seen["score"]}


def markdown(data: dict) -> str:
    m, rows = data["meta"], data["rows"]
    settings = list(dict.fromkeys(r["threads"] for r in rows))
    med = {s: {k: statistics.median(r[k] for r in rows if r["threads"] == s)
               for k in ("wall_s", "start_s", "prior_s", "fit_s", "score_s")} for s in settings}
    lines = [f"`scripts/bench_evaluate.py`, {m['date']}, {m['machine']}, torch {m['torch']}; run `{m['run']}` "
             f"({m['describe']}), {m['rounds']} ABBA rounds after an untimed call that cached the truth's scores. "
             f"Load average when it started: {m['load_average']}. Median seconds per fresh process:", "",
             "| num_threads | wall | start | prior | fit | score | ratio |", "|---|---|---|---|---|---|---|"]
    for s in settings:
        d = med[s]
        lines.append(f"| {s} | {d['wall_s']:.1f} | {d['start_s']:.1f} | {d['prior_s']:.1f} | {d['fit_s']:.1f} "
                     f"| {d['score_s']:.1f} | x{d['wall_s'] / med[settings[0]]['wall_s']:.2f} |")
    lines += ["", "Each call: " + "; ".join(f"{r['threads']} {r['wall_s']:.1f} s" for r in rows) + "."]
    return "\n".join(lines)


def main() -> None:
    from mapa_exp.benchmarking import child_benchmark_cli, write_markdown_section

    args = child_benchmark_cli(__doc__, "evaluate.json", HEADING, markdown, None,
                               (("run", {"nargs": "?", "help": "a trained run folder"}),
                                ("--threads", {"default": "1,null", "help": "num_threads settings, comma-separated"}),
                                ("--rounds", {"type": int, "default": 2, "help": "ABBA rounds"})))
    if args is None:
        return
    if not args.run or not Path(args.run, "results.json").is_file():
        raise SystemExit(f"bench_evaluate.py: run={args.run!r} is not a trained run folder (no results.json)")
    import json

    import torch

    from mapa_exp.io import atomic_write_json

    settings = args.threads.split(",")
    results = json.loads(Path(args.run, "results.json").read_text())
    with tempfile.TemporaryDirectory(prefix="bench_evaluate_") as tmp:
        one_call(args.run, settings[0], Path(tmp))  # caches the truth's scores
        load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
        rows = []
        for _ in range(args.rounds):
            for s in settings + settings[::-1]:
                rows.append(one_call(args.run, s, Path(tmp)))
                print(f"num_threads={s}: {rows[-1]['wall_s']:.1f} s", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "load_average": load, "rounds": args.rounds, "run": Path(args.run).name,
            "describe": ", ".join(f"{k} {results.get(k)}" for k in ("dataset", "method", "S", "K"))}
    data = {"meta": meta, "rows": rows}
    atomic_write_json(args.json, data)
    write_markdown_section(args.docs, HEADING, markdown(data))


if __name__ == "__main__":
    main()
