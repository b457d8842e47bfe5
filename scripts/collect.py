#!/usr/bin/env python
"""Collect sweep folders into one tidy table (CSV and Parquet): one row per run x source x metric.

    python scripts/collect.py outputs/multiruns/paper_density/2026-11-24_10-00-00-000000 [more sweeps ...]
        [-o STEM]   # writes STEM.csv and STEM.parquet; default: <first sweep>/tidy
        [--train-commit SHA] [--eval-commit SHA]   # the code's commit, for runs whose files do not record it

Reads every run's results.json (source "train"), eval.json (source "eval") and config.yaml; failed,
preempted and never-finished jobs stay in the table with their status and reason (mapa_exp.sweeps.results).
Runs trained or evaluated before results.json / eval.json recorded the code's git commit get the one given
here in ``train_commit`` / ``eval_commit``; a commit the files record is never overwritten.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mapa_exp.cli import description
from mapa_exp.sweeps.results import checked_commit, collect, table_with_commits, write_table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=description(__doc__))
    parser.add_argument("sweeps", nargs="+", type=Path, help="sweep (or run) folders")
    parser.add_argument("-o", "--out", type=Path, default=None, help="output stem (default: <first sweep>/tidy)")
    parser.add_argument("--train-commit", default=None, metavar="SHA",
                        help="the training code's full git commit, for runs whose results.json records none")
    parser.add_argument("--eval-commit", default=None, metavar="SHA",
                        help="the evaluation code's full git commit, for runs whose eval.json records none")
    args = parser.parse_args(argv)
    missing = [str(s) for s in args.sweeps if not s.is_dir()]
    if missing:
        print(f"error: sweeps={missing}: not a folder", file=sys.stderr)
        return 2
    try:
        for key, commit in (("--train-commit", args.train_commit), ("--eval-commit", args.eval_commit)):
            if commit is not None:
                checked_commit(commit, key)  # refused before any folder is read
        table = table_with_commits(collect(args.sweeps), args.train_commit, args.eval_commit)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    csv, parquet = write_table(table, args.out or args.sweeps[0] / "tidy")
    runs = table.drop_duplicates(["run_dir", "source"])
    counts = runs.groupby(["source", "status"]).size()
    summary = ", ".join(f"{src} {status}: {n}" for (src, status), n in counts.items())
    print(f"{table['run_dir'].nunique()} runs, {len(table)} rows ({summary})")
    print(f"wrote {csv}\nwrote {parquet}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
