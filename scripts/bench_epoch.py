"""Benchmark a training epoch of MAPA against IWAE at S in {1, 10, 100}: wall time and forward passes per point,
and what ``train.py`` adds to the bare loop.

    python scripts/bench_epoch.py                  # Figure-8, N = 1000, batch 100; JSON + docs/benchmarks.md section
    python scripts/bench_epoch.py --n-train 10000 --rounds 5 --no-train-py
    python scripts/bench_epoch.py --render-only    # rewrite the docs section from the JSON

Both methods train on the same data (a Figure-8 draw), batch size, network (the 2 x 50 MLP) and
optimizer, on one CPU thread as ``train.py`` does (``num_threads: 1``). IWAE uses the default
estimator (DReG); MAPA uses K = max(1, ceil(0.1 S)) (method.md §9), once with the dense proximity
structure (the default) and once with a truncated one (``--neighbors-M``, 64). The *bare loop* is an
epoch without anything of ``train.py`` around it: the batches (for MAPA: drawing the tail samples), the
forward pass, backward pass and optimizer step of the module's own ``step``. The configurations run
interleaved, one epoch each per round, so load from other processes hits them alike; each time is the
median over the rounds, each ratio MAPA / IWAE at the same S.

``train.py`` per step is a whole single run (Lightning, validation every 10 epochs, checkpoints, metrics
files, final bounds): the slope of its ``wall_time_s`` between 10 and 40 epochs (start-up cancels), median
of 3, divided by the steps; **overhead** = that / the bare loop's step (the goal: <= 1.5).
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import time
from pathlib import Path

import torch

from mapa_exp.cli import description

ROOT = Path(__file__).resolve().parents[1]
S_GRID = (1, 10, 100)


def make_config(method: str, S: int, groundtruth, args, neighbors_M: int | None = None, members: int = 1,
                compile_steps: bool = False):
    """One benchmark configuration: a module (a stack of ``members``, seeds 0..members-1, all on this data draw),
    its optimizer and its datamodule."""
    from mapa_exp.data.datamodule import GroundTruthDataModule
    from mapa_exp.methods.mapa import MAPA
    from mapa_exp.methods.proposals import KernelProposal
    from mapa_exp.methods.vae import GaussianEncoderVAE
    from mapa_exp.runs.training import CHUNK_ROWS_CPU

    common = dict(latent_dim=groundtruth.latent_dim, obs_dim=groundtruth.obs_dim, likelihood=groundtruth.likelihood,
                  optimizer=lambda p: torch.optim.Adam(p, lr=1e-3), chunk_rows=CHUNK_ROWS_CPU,
                  seeds=range(members), compile_steps=compile_steps)
    if method.startswith("MAPA"):
        K = max(1, math.ceil(0.1 * S))
        module = MAPA(**common, proposal=KernelProposal(K, S))
    else:
        K = None
        module = GaussianEncoderVAE(**common, S=S, objective="iwae", estimator="dreg")
    data = GroundTruthDataModule(groundtruth, batch_size=args.batch_size, cache_dir=args.cache_dir,
                                 neighbors_M=neighbors_M, seeds=range(members))
    data.setup("fit")
    module.setup_data(data)
    return {"method": method, "S": S, "K": K, "M": neighbors_M, "module": module,
            "optimizer": module.configure_optimizers(), "data": data, "times": [], "passes_encoder": 0,
            "passes_decoder": 0, "points": 0}


def run_epoch(c: dict) -> None:
    """One epoch of the bare loop (mapa_exp.benchmarking.bare_epoch): the module's own step, backward and
    optimizer step, nothing else."""
    from mapa_exp.benchmarking import bare_epoch

    done = bare_epoch(c["module"], c["optimizer"], c["data"])
    c["times"].append(done["seconds"])
    for k in ("passes_encoder", "passes_decoder", "points"):
        c[k] += done[k]


def train_py_step_s(c: dict, args, repeats: int = 3, epochs: tuple[int, int] = (10, 40)) -> float:
    """Seconds per training step of a whole ``train.py`` run of this configuration (module doc)."""
    import json
    import subprocess
    import sys
    import tempfile

    method = "iwae" if c["method"] == "IWAE" else "mapa"
    extra = [f"method.K={c['K']}"] if c["K"] is not None else []
    if c["M"] is not None:
        extra.append(f"data.neighbors_M={c['M']}")
    slopes = []
    with tempfile.TemporaryDirectory() as tmp:
        for r in range(repeats):
            wall = []
            for e in epochs:
                run = Path(tmp) / f"{r}_{e}"
                subprocess.run([sys.executable, "train.py", "dataset=figure8", f"method={method}", f"method.S={c['S']}",
                                *extra, f"dataset.n_train={args.n_train}", f"data.batch_size={args.batch_size}",
                                f"trainer.max_epochs={e}", "trainer.enable_progress_bar=false", "evaluate=false",
                                f"hydra.run.dir={run}"], cwd=ROOT, check=True, capture_output=True,
                               env={**os.environ, "MAPA_EXP_CACHE": args.cache_dir})
                wall.append(json.loads((run / "results.json").read_text())["wall_time_s"])
            slopes.append((wall[1] - wall[0]) / ((epochs[1] - epochs[0]) * c["data"].steps("train")))
    return statistics.median(slopes)


def markdown(rows: list[dict], meta: dict) -> str:
    has_train = any(r.get("train_py_step_s") for r in rows)
    lines = [
        f"`python scripts/bench_epoch.py` ({meta['date']}, {meta['machine']}, torch {meta['torch']}, "
        f"{meta['threads']} thread as in training). Figure-8, N = {meta['n_train']:,} training points, batch "
        f"{meta['batch_size']}, the 2 x 50 MLP, Adam; IWAE with DReG, MAPA with K = max(1, ceil(0.1 S)) and the dense "
        f"structure (M = N) or a truncated one (M = {meta['neighbors_M']}). Epoch time = median of {meta['rounds']} interleaved rounds (data loading, forward, backward, "
        "step); passes = forward passes per training point per epoch (decoder; encoder + decoder); **ratio** = MAPA / "
        "IWAE at the same S." + (" `train.py` step = a whole single run's time per step (slope between 10 and 40 "
                                 "epochs: Lightning, validation every 10 epochs, checkpoints every 10, metrics files); "
                                 "**overhead** = that / the bare loop's step." if has_train else ""),
        "",
        "| S | method | K | epoch (ms) | ratio | decoder passes / point | ratio | encoder + decoder / point | ratio |"
        + (" bare step (ms) | `train.py` step (ms) | overhead |" if has_train else ""),
        "|---:|---|---:|---:|---:|---:|---:|---:|---:|" + ("---:|---:|---:|" if has_train else ""),
    ]
    for r in rows:
        train = ""
        if has_train:
            bare = r["epoch_s"] / r["steps_per_epoch"]
            train = f" {1000 * bare:.2f} | {1000 * r['train_py_step_s']:.2f} | {r['train_py_step_s'] / bare:.2f} |"
        lines.append(
            f"| {r['S']} | {r['method']} | {r['K'] if r['K'] is not None else ''} | {1000 * r['epoch_s']:.1f} | "
            f"{r['time_ratio']:.2f} | {r['decoder_per_point']:.2f} | {r['decoder_ratio']:.3f} | "
            f"{r['enc_dec_per_point']:.2f} | {r['enc_dec_ratio']:.3f} |" + train)
    lines += ["", "MAPA's time beyond its forward passes is the batch: its tail samples (O(1) each, from alias tables "
              "built once per draw), the union of candidates and the gathers of their points."]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=description(__doc__))
    ap.add_argument("--n-train", type=int, default=1000)
    ap.add_argument("--batch-size", type=int, default=100)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--neighbors-M", type=int, default=64, help="M of the truncated MAPA variant")
    ap.add_argument("--cache-dir", default=os.environ.get("MAPA_EXP_CACHE", str(ROOT / "outputs" / ".cache")))
    ap.add_argument("--json", default=str(ROOT / "docs" / "benchmarks" / "epoch.json"))
    ap.add_argument("--docs", default=str(ROOT / "docs" / "benchmarks.md"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the docs section from --json, run nothing")
    ap.add_argument("--no-train-py", action="store_true", help="skip the whole train.py runs")
    args = ap.parse_args()
    if args.render_only:
        import json

        from mapa_exp.benchmarking import write_markdown_section

        saved = json.loads(Path(args.json).read_text())
        write_markdown_section(args.docs, "Training epoch: MAPA vs IWAE", markdown(saved["rows"], saved["meta"]))
        return

    from mapa_exp.benchmarking import configure_as_training, write_markdown_section
    from mapa_exp.data.analytic import figure8
    from mapa_exp.data.groundtruth import GroundTruth
    from mapa_exp.io import atomic_write_json
    from mapa_exp.math.likelihoods import Gaussian

    configure_as_training()  # one thread and the allocator settings, as train.py runs
    gt = GroundTruth("figure8", figure8, Gaussian(0.01), n_train=args.n_train, n_val=100, n_test=100,
                     cache_dir=args.cache_dir)
    truncated = f"MAPA (M={args.neighbors_M})"
    configs = [make_config(m, S, gt, args, neighbors_M=args.neighbors_M if m == truncated else None)
               for S in S_GRID for m in ("IWAE", "MAPA", truncated)]
    for c in configs:  # warm-up epoch, not timed
        run_epoch(c)
        c.update(times=[], passes_encoder=0, passes_decoder=0, points=0)
    for r in range(args.rounds):
        for c in configs:
            run_epoch(c)
        print(f"round {r + 1}/{args.rounds}", flush=True)
    rows = []
    for c in configs:
        rows.append({"method": c["method"], "S": c["S"], "K": c["K"], "epoch_s": statistics.median(c["times"]),
                     "steps_per_epoch": c["data"].steps("train"),
                     "train_py_step_s": None if args.no_train_py else train_py_step_s(c, args),
                     "epoch_s_all": c["times"], "decoder_per_point": c["passes_decoder"] / c["points"],
                     "enc_dec_per_point": (c["passes_encoder"] + c["passes_decoder"]) / c["points"]})
    for r in rows:
        ref = next(x for x in rows if x["S"] == r["S"] and x["method"] == "IWAE")
        r["time_ratio"] = r["epoch_s"] / ref["epoch_s"]
        r["decoder_ratio"] = r["decoder_per_point"] / ref["decoder_per_point"]
        r["enc_dec_ratio"] = r["enc_dec_per_point"] / ref["enc_dec_per_point"]
        print(f"S={r['S']:3d} {r['method']:12s} {1000 * r['epoch_s']:8.1f} ms  x{r['time_ratio']:.2f}  "
              f"dec/pt {r['decoder_per_point']:.2f}")
    meta = {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, {os.cpu_count()} cores",
            "torch": torch.__version__, "threads": torch.get_num_threads(), "n_train": args.n_train,
            "batch_size": args.batch_size, "rounds": args.rounds, "neighbors_M": args.neighbors_M}
    atomic_write_json(args.json, {"meta": meta, "rows": rows})
    write_markdown_section(args.docs, "Training epoch: MAPA vs IWAE", markdown(rows, meta))


if __name__ == "__main__":
    main()
