"""Benchmark the mixture-IWAE evaluator's early stopping on trained runs: its q fitted for the fixed 2,000 steps
(the reference, the default) against the fit that stops on the validation split
(``evaluator.mog_iwae.check_every=100``).

    python scripts/bench_mog_iwae.py <run folder> [<run folder> ...]   # JSON + the docs/benchmarks.md section
    python scripts/bench_mog_iwae.py --render-only                     # rewrite the docs section from the JSON

Per run, in one process: the run's model at its best checkpoint (MAPA's prior chosen on validation data, as
``evaluate.py`` does), its exact test log-likelihood (the quadrature, J = 10,000), then both fits, each scoring
the validation and test splits with S_eval = 5,000. Reported: each fit's time (fit and scoring), its steps, and
its test log-likelihood minus the exact one (nats per point; the mixture IWAE is a bound, so at or just below 0);
**speed-up** = reference time / early-stopping time.
"""

from __future__ import annotations

import os
import platform
import statistics
import time

HEADING = "Mixture-IWAE evaluator: early stopping"


def measure(path: str) -> dict:
    from mapa_exp.evaluation.estimators import MogIwaeEstimator, QuadratureEstimator
    from mapa_exp.evaluation.evaluate import model_of
    from mapa_exp.evaluation.runs import load_run

    run = load_run(path)
    x = {s: run.datamodule.x[s] for s in ("train", "val", "test")}
    model = model_of(run)
    exact = QuadratureEstimator(check_convergence=False).evaluate(model, x["train"], {"test": x["test"]})[0]
    row = {k: run.results.get(k) for k in ("dataset", "method", "S", "K", "seed", "draw")} | {"run": str(path)}
    for name, kw in (("reference", {}), ("early", {"check_every": 100})):
        t0 = time.perf_counter()
        res, diag = MogIwaeEstimator(**kw).evaluate(model, x["train"], {"val": x["val"], "test": x["test"]})
        row[f"{name}_s"] = time.perf_counter() - t0
        row[f"{name}_steps"] = diag["fit_steps"]
        row[f"{name}_gap"] = float((res["test"][0] - exact["test"][0]).mean())
    row["speedup"] = row["reference_s"] / row["early_s"]
    return row


def markdown(data: dict) -> str:
    m, rows = data["meta"], data["rows"]
    lines = [f"`scripts/bench_mog_iwae.py`, {m['date']}, {m['machine']}, torch {m['torch']}; "
             f"{len(rows)} trained runs (the report's two-evaluator subset: seed 0, draw 0, paper_density). "
             f"Load average when it started: {m['load_average']}. Reference: q fitted for all 2,000 steps (the "
             "default); early: `check_every=100`, stopping on the validation split (checks every 100 steps, from step "
             "1,000 on after 3 checks without a gain of 0.001 nats). Gap: test log-likelihood minus the exact "
             "quadrature's, nats per point.", "",
             "| dataset | method | S | K | reference (s) | steps | gap | early (s) | steps | gap | speed-up |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        K = "" if r["K"] is None else r["K"]
        lines.append(f"| {r['dataset']} | {r['method']} | {r['S']} | {K} | {r['reference_s']:.1f} | "
                     f"{r['reference_steps']} | {r['reference_gap']:+.4f} | {r['early_s']:.1f} | {r['early_steps']} | "
                     f"{r['early_gap']:+.4f} | x{r['speedup']:.2f} |")
    worst = lambda k: max(abs(r[k]) for r in rows)  # noqa: E731
    lines += ["", f"Early stopping: x{statistics.median(r['speedup'] for r in rows):.2f} median speed-up "
              f"(x{min(r['speedup'] for r in rows):.2f}-{max(r['speedup'] for r in rows):.2f}), "
              f"{statistics.median(r['early_steps'] for r in rows):.0f} median steps; largest |gap| "
              f"{worst('early_gap'):.4f} nats per point (reference {worst('reference_gap'):.4f})."]
    return "\n".join(lines)


def main() -> None:
    from mapa_exp.benchmarking import child_benchmark_cli, configure_as_training, write_markdown_section

    args = child_benchmark_cli(__doc__, "mog_iwae.json", HEADING, markdown, None,
                               (("runs", {"nargs": "*", "help": "trained run folders"}),))
    if args is None:
        return
    if not args.runs:
        raise SystemExit("bench_mog_iwae.py: give the run folders to measure (or --render-only)")
    import torch

    from mapa_exp.io import atomic_write_json

    configure_as_training()
    load = ", ".join(f"{v:.2f}" for v in os.getloadavg())
    rows = []
    for path in args.runs:
        rows.append(measure(path))
        r = rows[-1]
        print(f"{r['dataset']} {r['method']} S={r['S']}: reference {r['reference_s']:.1f} s "
              f"({r['reference_steps']} steps, gap {r['reference_gap']:+.4f}), early {r['early_s']:.1f} s "
              f"({r['early_steps']} steps, gap {r['early_gap']:+.4f}), x{r['speedup']:.2f}", flush=True)
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "load_average": load}
    data = {"meta": meta, "rows": rows}
    atomic_write_json(args.json, data)
    write_markdown_section(args.docs, HEADING, markdown(data))


if __name__ == "__main__":
    main()
