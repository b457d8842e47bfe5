#!/usr/bin/env python
"""Figure 2b / D.2: forward passes per data point per gradient step against S, IWAE and MAPA (each K rule),
in both accountings of method.md §5 -- decoder-dominated (MAPA |U|/B vs IWAE S) and encoder ≈ decoder
(MAPA 2|U|/B vs IWAE 1+S) -- with the "MAPA Max" line of each: MAPA never needs more than the N training points
per batch of B (N/B per point in the first accounting, 2N/B in the second).

    python scripts/plot_passes.py TABLE.parquet [-o passes.png]

Reads only the tidy table written by scripts/collect.py (completed training runs); writes passes.png beside it
unless told otherwise. Bad input is one line ``error: key=value: reason`` and exit status 2, nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mapa_exp.cli import description
from mapa_exp.reporting import read_tables
from mapa_exp.reporting.figures import passes_figure
from mapa_exp.reporting.summaries import passes_summary
from mapa_exp.sweeps.plots import save


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("table", type=Path)
    p.add_argument("-o", "--out", type=Path, default=None, help="default: passes.png beside the table")
    a = p.parse_args(argv)
    try:
        (table,) = read_tables([a.table]).values()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    passes = passes_summary(table)
    if passes.empty:
        print(f"error: table={a.table}: no completed training run with forward-pass counts", file=sys.stderr)
        return 2
    out = a.out or a.table.with_name("passes.png")
    save(passes_figure(passes), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
