"""Helpers of the benchmark scripts (``scripts/bench_*.py``): the bare training loop with its time split into
phases, peak memory of one step, isolated child runs, and writing one section of ``docs/benchmarks.md``
without touching the others.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

from mapa_exp.cli import description
from mapa_exp.io import atomic_write_text

PHASES = ("data", "forward", "backward", "optimizer")


def configure_as_training(malloc: bool = True) -> dict:
    """Give this process the settings ``train.py`` gives a run (``conf/train.yaml``'s ``num_threads`` and, unless
    ``malloc=False``, its ``malloc`` allocator settings), so that a bare loop is timed as training runs it.
    Returns the settings applied."""
    from omegaconf import OmegaConf

    from mapa_exp.runs.training import configure_process

    conf = OmegaConf.load(Path(__file__).resolve().parents[1] / "conf" / "train.yaml")
    settings = {"num_threads": conf.num_threads,
                "malloc": OmegaConf.to_container(conf.malloc) if malloc and conf.malloc is not None else None}
    configure_process(settings["num_threads"], settings["malloc"])
    return settings


def bare_epoch(module, optimizer, batches, split: dict | None = None, sync=None) -> dict:
    """One epoch of the bare training loop -- the module's own ``step``, the backward pass and the optimizer
    step, nothing of Lightning or ``train.py`` around them -- over ``batches`` (an iterator of the datamodule's
    batches, e.g. ``datamodule.train_batches()``).

    Returns ``{"seconds", "steps", "points", "passes_encoder", "passes_decoder"}``. With ``split`` (a dict)
    the time of each phase is added to ``split[phase]``: ``data`` (making the batch: shuffling, for MAPA the
    tail samples, the union of candidates and its gathers; moving it to the device), ``forward`` (the
    method's ``step``: networks, likelihoods, bound), ``backward`` and ``optimizer`` (``zero_grad`` and
    ``step``). ``sync`` (e.g. ``torch.cuda.synchronize``) is called at each phase boundary so that the phases
    of asynchronous devices are timed, not queued; give it only to a timing pass, it costs time.
    """
    import time

    import torch

    from mapa_exp.methods.base import flushed_denormals, take

    clock = time.perf_counter
    out = {"seconds": 0.0, "steps": 0, "points": 0, "passes_encoder": 0, "passes_decoder": 0}
    add = (lambda k, dt: split.__setitem__(k, split.get(k, 0.0) + dt)) if split is not None else (lambda k, dt: None)
    tick = sync or (lambda: None)
    module.train()
    start = clock()
    with flushed_denormals():  # as the training loop does
        batches = iter(batches)
        while True:
            t0 = clock()
            batch = next(batches, None)
            if batch is None:
                break
            batch = module._to_device(batch)
            tick()
            t1 = clock()
            add("data", t1 - t0)
            optimizer.zero_grad(set_to_none=True)
            B = batch["x"].shape[1]
            for m, pts in module.chunks(batch):
                t2 = clock()
                step = module.chunk_step(take(batch, m, pts), m)
                loss = (-step.surrogate.sum(1) / B).sum()
                tick()
                t3 = clock()
                loss.backward()
                tick()
                add("forward", t3 - t2)
                add("backward", clock() - t3)
                out["passes_encoder"] += int(torch.as_tensor(step.passes_encoder).sum())
                out["passes_decoder"] += int(torch.as_tensor(step.passes_decoder).sum())
            t4 = clock()
            optimizer.step()
            tick()
            add("optimizer", clock() - t4)
            out["steps"] += 1
            out["points"] += B
    if sync is not None:
        sync()
    out["seconds"] = clock() - start
    return out


def _status_kib(field: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset this process's peak-RSS mark (Linux ``clear_refs``); False where that is not possible."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def rss_mib() -> float:
    """Current resident memory of this process, MiB."""
    kib = _status_kib("VmRSS")
    return kib / 1024 if kib is not None else float("nan")


def peak_rss_mib() -> float:
    """Peak resident memory of this process since start or the last ``reset_peak_rss``, MiB."""
    kib = _status_kib("VmHWM")
    return kib / 1024 if kib is not None else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_child(script: str, args: dict, timeout: float | None = None) -> dict:
    """Run ``python script --child '<json args>'`` in a fresh process; returns the JSON its last stdout line holds."""
    p = subprocess.run([sys.executable, script, "--child", json.dumps(args)], capture_output=True, text=True,
                       timeout=timeout, env={**os.environ, "PYTHONHASHSEED": "0"})
    if p.returncode != 0:
        raise RuntimeError(f"benchmark child {args} failed:\n{p.stderr[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1])


def child_benchmark_cli(doc: str, json_name: str, heading: str, markdown, child,
                        options=()) -> argparse.Namespace | None:
    """The command line of a benchmark that measures in fresh child processes (``run_child``): its own
    ``options`` (``(flag, kwargs)`` pairs) and ``--cache-dir``, ``--json`` (``docs/benchmarks/<json_name>``),
    ``--docs``, ``--render-only`` and the hidden ``--child``. A child run or ``--render-only`` is handled here
    (returns None); otherwise returns the arguments of the run to do."""
    root = Path(__file__).resolve().parents[1]
    ap = argparse.ArgumentParser(description=description(doc))
    for flag, kwargs in options:
        ap.add_argument(flag, **kwargs)
    ap.add_argument("--cache-dir", default=os.environ.get("MAPA_EXP_CACHE", str(root / "outputs" / ".cache")))
    ap.add_argument("--json", default=str(root / "docs" / "benchmarks" / json_name))
    ap.add_argument("--docs", default=str(root / "docs" / "benchmarks.md"))
    ap.add_argument("--render-only", action="store_true", help="rewrite the docs section from --json, run nothing")
    ap.add_argument("--child", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
    elif args.render_only:
        write_markdown_section(args.docs, heading, markdown(json.loads(Path(args.json).read_text())))
    else:
        return args
    return None


def write_markdown_section(path: str | os.PathLike, heading: str, body: str) -> None:
    """Replace the ``## heading`` section of a markdown file (up to the next ``## ``), or append it.

    Other sections are kept as they are, so several benchmark scripts can share one file.
    """
    path = Path(path)
    text = path.read_text() if path.exists() else "# Benchmarks\n\nEach section is written by the script it names.\n"
    section = f"## {heading}\n\n{body.strip()}\n"
    pattern = re.compile(rf"^## {re.escape(heading)}\s*\n.*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: section + "\n", text, count=1)
    else:
        text = text.rstrip("\n") + "\n\n" + section
    atomic_write_text(path, text.rstrip("\n") + "\n")
