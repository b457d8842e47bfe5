"""Benchmark the allocator settings (``malloc``) and the chunk size (``chunk_rows``) of stacked training: epoch
time and page faults of a stack of the paper grid's R x D = 25 members.

    python scripts/bench_allocator.py                  # JSON + the docs/benchmarks.md section
    python scripts/bench_allocator.py --render-only    # rewrite the docs section from the JSON

Each measurement runs in a fresh process (glibc's settings are per process and its heap keeps its history), on
one CPU thread as ``train.py`` does, on a Figure-8 draw (N = 1000, batch 100, the 2 x 50 MLP, Adam; IWAE with
DReG, MAPA with K = max(1, ceil(0.1 S)), as ``scripts/bench_epoch.py``): a warm-up epoch of the bare loop
(``mapa_exp.benchmarking.bare_epoch``), then ``--epochs`` timed ones, their median. Two such processes run side
by side, as the grid's two workers do (memory bandwidth and the kernel's page handling are shared), and each
round runs every variant of a configuration one after the other. The **reference** is glibc's default
allocator with ``chunk_rows`` = 8192 (this project's settings before 2026-12-02); a variant's **speed-up** is the
median over rounds of reference / variant, paired within a round.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (("IWAE", 10), ("IWAE", 20), ("IWAE", 50), ("IWAE", 100), ("MAPA", 10), ("MAPA", 20), ("MAPA", 50),
           ("MAPA", 100))
REFERENCE = {"malloc": False, "chunk_rows": 8192}
VARIANTS = (REFERENCE, {"malloc": True, "chunk_rows": 8192}, {"malloc": True, "chunk_rows": 32768},
            {"malloc": True, "chunk_rows": 65536})
HEADING = "Allocator settings and chunk size"


def child(spec: dict) -> dict:
    import resource

    from bench_epoch import make_config, run_epoch
    from mapa_exp.benchmarking import configure_as_training
    from mapa_exp.data.analytic import figure8
    from mapa_exp.data.groundtruth import GroundTruth
    from mapa_exp.math.likelihoods import Gaussian

    configure_as_training(malloc=spec["malloc"])
    args = argparse.Namespace(batch_size=100, cache_dir=spec["cache_dir"])
    gt = GroundTruth("figure8", figure8, Gaussian(0.01), n_train=1000, n_val=100, n_test=100,
                     cache_dir=spec["cache_dir"])
    c = make_config(spec["method"], spec["S"], gt, args, members=spec["members"])
    c["module"].chunk_rows = spec["chunk_rows"]
    run_epoch(c)  # warm-up
    c["times"] = []
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(spec["epochs"]):
        run_epoch(c)
    faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / spec["epochs"]
    return {"epoch_s": statistics.median(c["times"]), "faults_per_epoch": faults}


def side_by_side(spec: dict) -> dict:
    """``child(spec)`` in two fresh processes at once; their mean epoch time and page faults."""
    from concurrent.futures import ThreadPoolExecutor

    from mapa_exp.benchmarking import run_child

    with ThreadPoolExecutor(2) as pool:
        pair = list(pool.map(lambda _: run_child(__file__, spec), range(2)))
    return {k: statistics.mean(p[k] for p in pair) for k in pair[0]}


def label(v: dict) -> str:
    return f"{'kept' if v['malloc'] else 'glibc default'}, chunk_rows {v['chunk_rows']}"


def markdown(data: dict) -> str:
    m = data["meta"]
    variants = data["variants"]
    lines = [f"`scripts/bench_allocator.py`, {m['date']}, {m['machine']}, torch {m['torch']}, one thread a process, "
             f"two processes side by side; Figure-8, N = 1000, batch 100, a stack of {m['members']} members, "
             f"{m['rounds']} rounds of {m['epochs']} timed epochs. Load average when it started: {m['load_average']}. "
             f"Reference: {label(variants[0])}; *kept* = the `malloc` settings of `conf/train.yaml`. Each cell: ms "
             "per member-epoch, minor page faults per epoch, speed-up against the reference (median of paired "
             "rounds).", "",
             "| method | S | " + " | ".join(label(v) for v in variants) + " |",
             "|---|---:|" + "---:|" * len(variants)]
    for r in data["rows"]:
        cells = [f"{1000 * c['epoch_s'] / m['members']:.1f} ms, {c['faults_per_epoch']:,.0f} faults, "
                 f"x{c['speedup']:.2f}" for c in r["variants"]]
        lines.append(f"| {r['method']} | {r['S']} | " + " | ".join(cells) + " |")
    def gm(i: int, method: str | None = None) -> float:
        return statistics.geometric_mean([r["variants"][i]["speedup"] for r in data["rows"]
                                          if method in (None, r["method"])])

    best = max(range(1, len(variants)), key=gm)
    methods = sorted({r["method"] for r in data["rows"]})
    lines += ["", "Geometric mean speed-up over these configurations: "
              + ", ".join(f"{label(v)} x{gm(i):.2f}" for i, v in enumerate(variants) if i)
              + f"; best: {label(variants[best])}, " + ", ".join(f"x{gm(best, m):.2f} for {m}" for m in methods)
              + ". With glibc's defaults the buffers of a step above the (moving) mmap threshold are mapped afresh "
              "and unmapped on free, and the heap's top is trimmed, so every new page costs a fault and its zeroing "
              "(the VAE/IWAE's per-sample activations, up to 2 MB a layer); with the pages kept, larger chunks (more "
              "members per batched product, fewer calls) no longer cost faults. MAPA's step allocates less (its "
              "S samples are shared by a batch's points) and faulted little before."]
    return "\n".join(lines)


def main() -> None:
    from mapa_exp.benchmarking import child_benchmark_cli, write_markdown_section

    args = child_benchmark_cli(__doc__, "allocator.json", HEADING, markdown, child,
                               (("--members", {"type": int, "default": 25}), ("--rounds", {"type": int, "default": 3}),
                                ("--epochs", {"type": int, "default": 3})))
    if args is None:
        return
    import torch

    from mapa_exp.io import atomic_write_json

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    runs = {(method, S): [[] for _ in VARIANTS] for method, S in CONFIGS}
    for r in range(args.rounds):
        for method, S in CONFIGS:
            for i, v in enumerate(VARIANTS):
                spec = {"method": method, "S": S, "members": args.members, "epochs": args.epochs,
                        "cache_dir": args.cache_dir, **v}
                runs[method, S][i].append(side_by_side(spec))
            got = runs[method, S]
            print(f"round {r + 1}: {method} S={S:3d}: " + ", ".join(
                f"{1000 * g[-1]['epoch_s'] / args.members:.1f} ms" for g in got), flush=True)
    rows = []
    for (method, S), got in runs.items():
        ref = [x["epoch_s"] for x in got[0]]
        cells = [{"epoch_s": statistics.median(x["epoch_s"] for x in g),
                  "faults_per_epoch": statistics.median(x["faults_per_epoch"] for x in g),
                  "speedup": statistics.median(a / x["epoch_s"] for a, x in zip(ref, g)),
                  "epoch_s_all": [x["epoch_s"] for x in g]} for g in got]
        rows.append({"method": method, "S": S, "variants": cells})
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "members": args.members, "rounds": args.rounds, "epochs": args.epochs,
            "load_average": load}
    data = {"meta": meta, "variants": list(VARIANTS), "rows": rows}
    atomic_write_json(args.json, data)
    write_markdown_section(args.docs, HEADING, markdown(data))


if __name__ == "__main__":
    main()
