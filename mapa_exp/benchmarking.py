"""Helpers of the benchmark scripts (``scripts/bench_*.py``): peak memory of one step, isolated child runs,
and writing one section of ``docs/benchmarks.md`` without touching the others.
"""

from __future__ import annotations

import json
import os
import re
import resource
import subprocess
import sys
from pathlib import Path

from mapa_exp.io import atomic_write_text


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
