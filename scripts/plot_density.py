#!/usr/bin/env python
"""Figure 2a / D.1: test KL of each method per data set against S, mean ± standard error over the data draws;
per configuration and draw the restart, and per S the MAPA family's K fraction, chosen by validation
log-likelihood (mapa_exp.sweeps.results.choose_on_validation). MAPA's numbers are those of the prior map
chosen per run on validation data (the plain metrics; mapa_exp.reporting.priors).

    python scripts/plot_density.py TABLE.parquet [-o density.png] [--metric test_kl/quadrature]

Reads only the tidy table written by scripts/collect.py; writes density.png beside it unless told otherwise.
Bad input is one line ``error: key=value: reason`` and exit status 2, with nothing written.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from mapa_exp.cli import description
from mapa_exp.reporting import read_tables
from mapa_exp.reporting.figures import density_figure
from mapa_exp.reporting.priors import table_under_prior
from mapa_exp.reporting.summaries import KL_METRICS, density_summary, kl_metric
from mapa_exp.sweeps.plots import save
from mapa_exp.sweeps.results import choose_on_validation, selection_metric


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("table", type=Path)
    p.add_argument("-o", "--out", type=Path, default=None, help="default: density.png beside the table")
    p.add_argument("--metric", default=None, help=f"default: the first of {KL_METRICS} in the table")
    p.add_argument("--select-by", default=None, help="restart selection metric (default: validation log-likelihood)")
    a = p.parse_args(argv)
    try:
        (table,) = read_tables([a.table]).values()
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    table = table_under_prior(table, None)
    present = set(table["metric"].dropna())
    metric = a.metric or kl_metric(table)
    select_by = a.select_by or selection_metric(table)
    for key, value in (("--metric", metric), ("--select-by", select_by)):
        if value not in present:
            reason = "not in the table" if value else f"the table has no test KL ({' or '.join(KL_METRICS)}): " \
                "run the evaluation stage first"
            print(f"error: {key}={value}: {reason}", file=sys.stderr)
            return 2
    out = a.out or a.table.with_name("density.png")
    save(density_figure(density_summary(choose_on_validation(table, select_by), metric), metric), out)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
