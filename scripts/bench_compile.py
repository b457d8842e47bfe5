"""Benchmark compiled training steps (``compile=true``) against eager ones, for a stack of the paper grid's
R x D = 25 members: epoch time, the compilation a stack pays once, and what that makes of 1,000 epochs.

    python scripts/bench_compile.py                  # JSON + the docs/benchmarks.md section
    python scripts/bench_compile.py --members 1      # one run alone
    python scripts/bench_compile.py --render-only    # rewrite the docs section from the JSON

Each configuration runs in a fresh process with an empty inductor cache (so the compilation measured is a
cold one, the worst case), on one CPU thread as ``train.py`` does, on a Figure-8 draw (N = 1000, batch 100,
the 2 x 50 MLP, Adam): the same module built twice, eager and compiled, trained in interleaved epochs of the
bare loop (``mapa_exp.benchmarking.bare_epoch``: batches, step, backward, optimizer) so that load from other
processes hits both alike. ``epoch`` times are medians over the rounds; **speed-up** = eager / compiled;
``compile_s`` = the first compiled epoch minus a compiled epoch; **1,000 epochs** = eager x 1000 /
(compiled x 1000 + compile_s), the gain of a whole paper-length stack.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = (("IWAE", 1), ("IWAE", 10), ("IWAE", 50), ("IWAE", 100), ("MAPA", 10), ("MAPA", 50))
HEADING = "Compiled training steps"


def child(spec: dict) -> dict:
    from bench_epoch import make_config, run_epoch
    from mapa_exp.benchmarking import configure_as_training
    from mapa_exp.data.analytic import figure8
    from mapa_exp.data.groundtruth import GroundTruth
    from mapa_exp.math.likelihoods import Gaussian

    configure_as_training()
    args = argparse.Namespace(batch_size=100, cache_dir=spec["cache_dir"])
    gt = GroundTruth("figure8", figure8, Gaussian(0.01), n_train=1000, n_val=100, n_test=100, cache_dir=spec["cache_dir"])
    eager = make_config(spec["method"], spec["S"], gt, args, members=spec["members"])
    compiled = make_config(spec["method"], spec["S"], gt, args, members=spec["members"], compile_steps=True)
    run_epoch(eager)  # warm-up
    run_epoch(compiled)  # compiles
    first = compiled["times"][0]
    eager["times"], compiled["times"] = [], []
    for _ in range(spec["rounds"]):
        run_epoch(eager)
        run_epoch(compiled)
    e, c = statistics.median(eager["times"]), statistics.median(compiled["times"])
    return {"method": spec["method"], "S": spec["S"], "members": spec["members"], "eager_epoch_s": e,
            "compiled_epoch_s": c, "speedup": e / c, "compile_s": max(0.0, first - c),
            "speedup_1000_epochs": e * 1000 / (c * 1000 + max(0.0, first - c)),
            "eager_all": eager["times"], "compiled_all": compiled["times"]}


def markdown(data: dict) -> str:
    m = data["meta"]
    lines = [f"`scripts/bench_compile.py`, {m['date']}, {m['machine']}, torch {m['torch']}, one thread; Figure-8, "
             f"N = 1000, batch 100, a stack of {m['members']} member(s), {m['rounds']} interleaved rounds, a cold "
             f"inductor cache per configuration. Load average when it started: {m['load_average']} "
             "(a figure here is a ratio measured in one process, under the same load for both).", "",
             "| method | S | eager epoch (s) | compiled epoch (s) | speed-up | compile (s) | speed-up over 1,000 epochs |",
             "|---|---|---|---|---|---|---|"]
    for r in data["rows"]:
        lines.append(f"| {r['method']} | {r['S']} | {r['eager_epoch_s']:.3f} | {r['compiled_epoch_s']:.3f} | "
                     f"x{r['speedup']:.2f} | {r['compile_s']:.0f} | x{r['speedup_1000_epochs']:.2f} |")
    rows = data["rows"]
    names = lambda sel: ", ".join(f"{r['method']} S = {r['S']}" for r in sel)  # noqa: E731
    pays = [r for r in rows if r["speedup_1000_epochs"] > 1]
    loses = [r for r in rows if r["speedup_1000_epochs"] <= 1]
    lines += ["", "`compile=true` fuses the element-wise work around the small matrix products (bias adds, the "
              "activation and its backward, the likelihood, the log-weights): "
              f"x{min(r['speedup'] for r in rows):.2f}-{max(r['speedup'] for r in rows):.2f} per epoch here. Its "
              f"one-off compilation ({min(r['compile_s'] for r in rows):.0f}-{max(r['compile_s'] for r in rows):.0f} s, "
              "cold cache) pays over 1,000 epochs where an epoch is long" + (f" ({names(pays)})" if pays else "")
              + (f" and loses where it is short ({names(loses)})" if loses else "")
              + ". It stays off by default; `scripts/bench_grid.py --compile` measures it on the whole grid slice."]
    return "\n".join(lines)


def main() -> None:
    from mapa_exp.benchmarking import child_benchmark_cli, run_child, write_markdown_section

    args = child_benchmark_cli(__doc__, "compile.json", HEADING, markdown, child,
                               (("--members", {"type": int, "default": 25}), ("--rounds", {"type": int, "default": 5})))
    if args is None:
        return
    import torch

    from mapa_exp.io import atomic_write_json

    load = ", ".join(f"{x:.2f}" for x in os.getloadavg())
    rows = []
    for method, S in CONFIGS:
        with tempfile.TemporaryDirectory(prefix="inductor_") as cache:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = cache  # a cold compilation for each configuration
            row = run_child(__file__, {"method": method, "S": S, "members": args.members, "rounds": args.rounds,
                                       "cache_dir": args.cache_dir})
        rows.append(row)
        print(f"{method} S={S:3d}: eager {row['eager_epoch_s']:.3f} s, compiled {row['compiled_epoch_s']:.3f} s, "
              f"x{row['speedup']:.2f}, compile {row['compile_s']:.0f} s, x{row['speedup_1000_epochs']:.2f} over "
              "1000 epochs", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "members": args.members, "rounds": args.rounds, "load_average": load}
    data = {"meta": meta, "rows": rows}
    atomic_write_json(args.json, data)
    write_markdown_section(args.docs, HEADING, markdown(data))


if __name__ == "__main__":
    main()
