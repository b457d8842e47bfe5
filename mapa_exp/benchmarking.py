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

from mapa_exp.methods.loop import PHASES  # noqa: F401  (the phases a bare epoch's time is split into)


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


def bare_epoch(module, optimizer, data, split: dict | None = None, sync=None) -> dict:
    """One epoch of the bare training loop over ``data`` (the datamodule, set up): the method's own scheme
    through the same ``StackedLoop`` training runs (chunks, NaN guard, optimizer steps), without Lightning,
    callbacks or ``train.py`` around it. ``optimizer``: the module's optimiser (or a list, one per parameter
    group).

    Returns ``{"seconds", "steps", "points", "passes_encoder", "passes_decoder"}``. With ``split`` (a dict)
    the time of each phase is added to ``split[phase]``: ``data`` (making the batch: shuffling, for MAPA the
    tail samples, the union of candidates and its gathers; moving it to the device), ``forward`` (the
    method's ``step``: networks, likelihoods, bound), ``backward`` and ``optimizer`` (the NaN guard and the
    step). ``sync`` (e.g. ``torch.cuda.synchronize``) is called at each phase boundary so that the phases
    of asynchronous devices are timed, not queued; give it only to a timing pass, it costs time.
    """
    import time

    from mapa_exp.methods.loop import StackedLoop, Timer

    optimizers = optimizer if isinstance(optimizer, (list, tuple)) else [optimizer]
    timer = Timer(sync) if split is not None else None
    loop = StackedLoop(module, None, optimizers=optimizers, timer=timer)
    steps0, points0 = int(module.train_steps_total.sum()), int(module.train_points_total.sum())
    enc0, dec0 = int(module.passes_encoder_total.sum()), int(module.passes_decoder_total.sum())
    module.train()
    start = time.perf_counter()
    if timer:
        timer.start()
    loop.train_epoch(data)
    if sync is not None:
        sync()
    seconds = time.perf_counter() - start
    if split is not None:
        for phase, t in timer.seconds.items():
            split[phase] = split.get(phase, 0.0) + t
    E = module.members
    return {"seconds": seconds, "steps": (int(module.train_steps_total.sum()) - steps0) // E,  # per member
            "points": int(module.train_points_total.sum()) - points0,  # all members', like the passes
            "passes_encoder": int(module.passes_encoder_total.sum()) - enc0,
            "passes_decoder": int(module.passes_decoder_total.sum()) - dec0}


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
