#!/usr/bin/env python
"""Collect sweep folders into one tidy table (CSV and Parquet): one row per run x source x metric.

    python scripts/collect.py outputs/multiruns/paper_density/2026-11-24_10-00-00-000000 [more sweeps ...]
        [-o STEM]   # writes STEM.csv and STEM.parquet; default: <first sweep>/tidy

Reads every run's results.json (source "train"), eval.json (source "eval") and config.yaml; failed,
preempted and never-finished jobs stay in the table with their status and reason (mapa_exp.sweeps.results).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mapa_exp.cli import description
from mapa_exp.sweeps.results import collect, write_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep (or run) folders")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output stem (default: <first sweep>/tidy)")
    args = parser.parse_args(argv)
    missing = [str(s) for s in args.sweeps if not s.is_dir()]
    if missing:
        print(f"error: sweeps={missing}: not a folder", file=sys.stderr)
        return 2
    table = collect(args.sweeps)
    csv, parquet = write_table(table, args.out or args.sweeps[0] / "tidy")
    runs = table.drop_duplicates(["run_dir", "source"])
    counts = runs.groupby(["source", "status"]).size()
    summary = ", ".join(f"{src} {status}: {n}" for (src, status), n in counts.items())
    print(f"{table['run_dir'].nunique()} runs, {len(table)} rows ({summary})")
    print(f"wrote {csv}\nwrote {parquet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
