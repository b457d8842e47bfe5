#!/usr/bin/env python
"""Write the reproduction report from tidy tables (scripts/collect.py): scale, selection rules, runs, the code's
commits, test KL per data set and method, the paper's claims (method.md §12) by paired comparisons across
draws, their sensitivity to MAPA's prior recovery, the two evaluators, the bandwidth experiment, forward
passes, and what differs from the paper's setting. The sections are mapa_exp.reporting's.

    python scripts/report.py TABLE.parquet [TABLE ...] [-o REPORT.md] [--figures FOLDER] [--wandb]

Without ``-o`` it writes ``REPORT.md`` beside the first table, and the figures into a ``figures`` folder beside
the report (``--figures``), linked relative to it. The report is a function of the tables alone apart from its
date line: ``python scripts/report.py docs/results/*.parquet -o docs/REPORT.md`` rebuilds the committed one.
Bad input is one line ``error: key=value: reason`` and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from datetime import datetime, timezone
from pathlib import Path

import pandas as pd

from mapa_exp.cli import description
from mapa_exp.reporting import figure_link, read_tables, report_sections, report_text, write_report


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("tables", nargs="+", type=Path, help="tidy tables (.parquet or .csv) from scripts/collect.py")
    p.add_argument("-o", "--out", type=Path, default=None, help="default: REPORT.md beside the first table")
    p.add_argument("--figures", type=Path, default=None, help="figure folder (default: <report folder>/figures)")
    p.add_argument("--wandb", action="store_true", help="also log a summary run (job_type=report) to W&B")
    p.add_argument("--wandb-project", default="mapa-exp")
    p.add_argument("--wandb-group", default=None, help="default: the runs' own W&B group (their config.yaml)")
    a = p.parse_args(argv)
    out = a.out or a.tables[0].parent / "REPORT.md"
    figures = a.figures or out.parent / "figures"
    if out.is_dir():
        print(f"error: --out={out}: is a folder; give the report's file name", file=sys.stderr)
        return 2
    try:
        tables = read_tables(a.tables)
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    sections = report_sections(tables, datetime.now(timezone.utc), figure_link(out, figures))
    written = write_report(sections, out, figures)
    print(f"wrote {out}" + "".join(f"\nwrote {f}" for f in written))
    if a.wandb:
        from mapa_exp.reporting.dashboard import log_report_run, runs_wandb_group

        group = a.wandb_group or runs_wandb_group(pd.concat(list(tables.values()), ignore_index=True))
        run_id, offline = log_report_run(sections, report_text(sections), written, a.tables, out.parent,
                                         a.wandb_project, group)
        print(f"logged the summary run {run_id} (group {group}) to W&B"
              + (f" offline: {offline}; upload it with: wandb sync {offline}" if offline else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
