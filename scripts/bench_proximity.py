"""Benchmark the proximity engine's top-64 build against scipy's cKDTree and faiss's IndexFlatL2.

    python scripts/bench_proximity.py                   # all cases; JSON + the docs/benchmarks.md section
    python scripts/bench_proximity.py --cases 2d-1e4    # one case (the JSON / docs are still rewritten)
    python scripts/bench_proximity.py --render-only     # rewrite the docs section from the JSON

Every build is a self-query (each point's 64 nearest points, self included) on the same float32 data,
run in its own process (so its peak memory is its own), with the same number of threads for every
library (all the cores this process may use). The methods of a case run interleaved in ``--rounds``
rounds (each build in a fresh process) and each time is the best of its rounds, so a burst of load
from other processes does not land on one method only. Each figure is a ratio against the fastest
*reference* (cKDTree or faiss) measured in the same run.

Exact brute-force searches that would take tens of minutes (faiss on 10^6 points in 2-D, cKDTree in
784-D) are timed on a subset of the queries against the full reference set and scaled to all
queries: their cost is linear in the number of queries. The table marks them.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
M = 64

# name -> (dimension, N, kind of data)
CASES = {
    "2d-1e4": (2, 10_000, "figure8"),
    "2d-1e5": (2, 100_000, "figure8"),
    "2d-1e6": (2, 1_000_000, "figure8"),
    "784d-2e4": (784, 20_000, "lowrank"),
    "784d-2e4-binary": (784, 20_000, "binary"),
}
# (case, method) -> number of queries timed, when the full search would take tens of minutes
SUBSET = {("2d-1e5", "faiss IndexFlatL2"): 10_000, ("2d-1e6", "faiss IndexFlatL2"): 10_000,
          ("784d-2e4", "scipy cKDTree"): 500, ("784d-2e4-binary", "scipy cKDTree"): 500}
REFERENCES = ("scipy cKDTree", "faiss IndexFlatL2", "faiss IndexBinaryFlat")


def methods_for(case: str, first_round: bool) -> list[str]:
    dim, n, kind = CASES[case]
    out = ["engine (auto)", "scipy cKDTree", "faiss IndexFlatL2"]
    if kind == "binary":
        out.append("faiss IndexBinaryFlat")
    if first_round and n * n <= 4e8:  # the engine's own chunked torch backend, for information (one round)
        out.append("engine (brute)")
    return out


def make_data(case: str):
    import numpy as np
    import torch

    dim, n, kind = CASES[case]
    g = torch.Generator().manual_seed(0)
    if kind == "figure8":
        from mapa_exp.data.analytic import figure8

        x = figure8(torch.randn(n, 1, generator=g)) + 0.1 * torch.randn(n, 2, generator=g)
    else:  # a 10-dimensional linear manifold in 784-D plus noise; binary: its signs
        x = torch.randn(n, 10, generator=g) @ torch.randn(10, dim, generator=g) / math.sqrt(10)
        x = x + 0.3 * torch.randn(n, dim, generator=g)
        if kind == "binary":
            x = (x > 0).float()
    return np.ascontiguousarray(x.numpy(), dtype=np.float32)


def build(method: str, x, metric: str, n_queries: int, threads: int) -> tuple[float, float]:
    """(seconds to build the index, seconds to query ``n_queries`` points)."""
    import numpy as np

    q = x[:n_queries]
    t0 = time.perf_counter()
    if method.startswith("engine"):
        from mapa_exp.data.proximity import nearest_neighbors

        nearest_neighbors(x, M=M, metric=metric, backend="brute" if "brute" in method else "auto")
        return 0.0, time.perf_counter() - t0
    if method == "scipy cKDTree":
        from scipy.spatial import cKDTree

        tree = cKDTree(x)
        t1 = time.perf_counter()
        tree.query(q, k=M, p=1 if metric == "hamming" else 2, workers=threads)
        return t1 - t0, time.perf_counter() - t1
    import faiss

    faiss.omp_set_num_threads(threads)
    if method == "faiss IndexFlatL2":
        index = faiss.IndexFlatL2(x.shape[1])
        index.add(x)
        t1 = time.perf_counter()
        index.search(q, M)
    else:  # IndexBinaryFlat: packed bits, popcount Hamming
        bits = np.packbits(x.astype(np.uint8), axis=1)
        index = faiss.IndexBinaryFlat(bits.shape[1] * 8)
        index.add(bits)
        t1 = time.perf_counter()
        index.search(bits[:n_queries], M)
    return t1 - t0, time.perf_counter() - t1


def child(args: dict) -> dict:
    import torch

    from mapa_exp.benchmarking import peak_rss_mib, reset_peak_rss, rss_mib
    from mapa_exp.data.proximity import _n_cores

    threads = _n_cores()
    torch.set_num_threads(threads)
    case, method = args["case"], args["method"]
    metric = "hamming" if CASES[case][2] == "binary" else "sqeuclidean"
    x = make_data(case)
    n = len(x)
    n_queries = SUBSET.get((case, method), n)
    exact_peak = reset_peak_rss()
    before = rss_mib()
    t_build, t_query = build(method, x, metric, n_queries, threads)
    peak = peak_rss_mib() if exact_peak else float("nan")
    return {"case": case, "method": method, "dim": CASES[case][0], "N": n, "metric": metric, "M": M,
            "seconds": t_build + t_query * n / n_queries, "queries_timed": n_queries, "extrapolated": n_queries < n,
            "threads": threads, "peak_rss_mib": peak, "build_rss_mib": peak - before}


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        f"`python scripts/bench_proximity.py` ({meta['date']}, {meta['machine']}, {meta['threads']} threads for every "
        f"library; faiss {meta['faiss']}, scipy {meta['scipy']}, torch {meta['torch']}). Self-query top-{M} "
        "(indices and distances) of every point; time = best of the interleaved rounds; **ratio** = time / the fastest reference "
        "(cKDTree or faiss) in the same run; `engine (brute)`, the engine's own chunked-torch backend, is shown for "
        "information (one round); peak RSS = the process's peak while building (data, libraries and "
        "output included), build = the part the build added.",
        "",
        "| case | N | D | metric | method | time (s) | ratio | peak RSS (MiB) | build (MiB) |",
        "|---|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        t = f"{r['seconds']:.3g}" + (f" ¹" if r["extrapolated"] else "")
        lines.append(f"| {r['case']} | {r['N']:,} | {r['dim']} | {r['metric']} | {r['method']} | {t} | "
                     f"{r['ratio']:.2f} | {r['peak_rss_mib']:.0f} | {r['build_rss_mib']:.0f} |")
    lines += ["", f"¹ timed on a subset of the queries against all N points and scaled to N queries (exact search "
                  "is linear in the queries); the memory column is that of the subset run.", "",
              "Engine vs the fastest reference: " + ", ".join(
                  f"{c} {meta['engine_ratio'][c]:.2f}x" for c in meta["engine_ratio"]) + ".", "",
              "What `auto` runs: the k-d tree in 2-D, faiss `IndexFlatL2` in 784-D, faiss `IndexBinaryFlat` for "
              "Hamming."]
    binary = {r["method"]: r for r in rows if r["case"] == "784d-2e4-binary"}
    if {"engine (auto)", "faiss IndexBinaryFlat"} <= set(binary):
        heap, mine = binary["faiss IndexBinaryFlat"]["rounds_s"], binary["engine (auto)"]["rounds_s"]
        lines[-1] += (
            " The Hamming case is beyond the issue's list. There the engine calls `IndexBinaryFlat` with "
            "`use_heap = False`, while the reference row uses faiss's default heap selection. On an idle machine "
            f"the heap is the faster of the two ({min(heap):.1f} s at best here), but it slows down several-fold "
            f"whenever another process shares the cores ({min(heap):.1f}-{max(heap):.1f} s over the rounds). The "
            f"non-heap selection stays within {min(mine):.1f}-{max(mine):.1f} s, which makes it the steadier choice "
            "on shared nodes. The ratio in that row compares both at their best round.")
    lines[-1] += " Every round of every case is in `docs/benchmarks/proximity.json` (`rounds_s`)."
    return "\n".join(lines)


def main() -> None:
    from mapa_exp.benchmarking import child_benchmark_cli

    a = child_benchmark_cli(__doc__, "proximity.json", "Proximity engine",
                            lambda saved: markdown(saved["rows"], saved["meta"]), child,
                            (("--cases", {"nargs": "*", "default": list(CASES), "choices": list(CASES)}),
                             ("--rounds", {"type": int, "default": 5,
                                           "help": "interleaved rounds per case (best time kept)"})))
    if a is None:
        return
    import faiss
    import scipy
    import torch

    from mapa_exp.benchmarking import run_child, write_markdown_section
    from mapa_exp.data.proximity import _n_cores
    from mapa_exp.io import atomic_write_json

    rows = []
    for case in a.cases:
        best: dict[str, dict] = {}
        for round_ in range(a.rounds):
            for method in methods_for(case, round_ == 0):
                r = run_child(__file__, {"case": case, "method": method})
                print(f"{case:18s} {method:24s} {r['seconds']:9.3f} s{' (extrapolated)' if r['extrapolated'] else ''}"
                      f"  peak {r['peak_rss_mib']:.0f} MiB", flush=True)
                if method not in best or r["seconds"] < best[method]["seconds"]:
                    best[method] = r | {"rounds_s": best.get(method, {}).get("rounds_s", [])}
                best[method]["rounds_s"].append(r["seconds"])
        rows += list(best.values())
    engine_ratio = {}
    for case in a.cases:
        mine = [r for r in rows if r["case"] == case]
        fastest = min(r["seconds"] for r in mine if r["method"] in REFERENCES)
        for r in mine:
            r["ratio"] = r["seconds"] / fastest
        engine_ratio[case] = next(r["ratio"] for r in mine if r["method"] == "engine (auto)")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "threads": _n_cores(), "faiss": faiss.__version__, "scipy": scipy.__version__,
            "torch": torch.__version__, "python": sys.version.split()[0], "engine_ratio": engine_ratio}
    atomic_write_json(a.json, {"meta": meta, "rows": rows})
    write_markdown_section(a.docs, "Proximity engine", markdown(rows, meta))
    print(json.dumps(engine_ratio, indent=1))


if __name__ == "__main__":
    main()
