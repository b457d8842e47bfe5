"""The reproduction report: read tidy tables, assemble their sections, write the markdown and its figures.

``report_sections`` is a function of the tables and the date alone; ``write_report`` writes the figures and
then the text, each file atomically (mapa_exp.io), so a failure leaves the earlier report whole."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from datetime import datetime
from pathlib import Path

import pandas as pd

from mapa_exp.io import atomic_write_text
from mapa_exp.reporting.claims import claims_under_prior_rules
from mapa_exp.reporting.priors import table_under_prior
from mapa_exp.reporting.sections import (
    Section,
    bandwidth_section,
    bounds_section,
    changes_section,
    claims_section,
    code_section,
    density_section,
    differences_section,
    evaluators_section,
    header_section,
    passes_section,
    runs_section,
    scale_section,
    selection_section,
    sensitivity_section,
    training_time_section,
)
from mapa_exp.reporting.summaries import density_choice, density_rows, passes_summary
from mapa_exp.sweeps.results import SELECT_BY, TIDY_COLUMNS, read_table, selection_metric, tidy_frame


def table_names(paths: Sequence[Path]) -> list[str]:
    """A name per table for the report: the file name, with its folder where two files share a name."""
    names = [Path(p).name for p in paths]
    return [str(Path(Path(p).parent.name) / n) if names.count(n) > 1 else n for p, n in zip(paths, names)]


def read_tables(paths: Sequence[Path]) -> dict[str, pd.DataFrame]:
    """The tidy tables by ``table_names``; ValueError ``key=value: reason`` for a missing file, one that is not
    a tidy table, or tables without a single validation metric to choose by."""
    absent = [str(p) for p in paths if not Path(p).is_file()]
    if absent:
        raise ValueError(f"tables={absent}: no such file")
    out = {}
    for name, path in zip(table_names(paths), paths):
        try:
            raw = pd.read_parquet(path) if Path(path).suffix == ".parquet" else pd.read_csv(path)
        except Exception as exc:  # any reader's failure is the same answer: not a table
            raise ValueError(f"table={path}: not a Parquet or CSV table ({type(exc).__name__})") from None
        lacking = [c for c in ("run_dir", "source", "status", "metric", "value") if c not in raw.columns]
        if lacking:
            raise ValueError(f"table={path}: not a tidy table from scripts/collect.py (no column {', '.join(lacking)})")
        out[name] = read_table(path)
    if not any(set(t["metric"].dropna()) & set(SELECT_BY) for t in out.values()):
        raise ValueError(f"tables={[str(p) for p in paths]}: no run has a validation metric "
                         f"({', '.join(SELECT_BY)}): nothing completed to report")
    return out


def report_sections(tables: Mapping[str, pd.DataFrame], generated: datetime, figure_link: str = "figures"
                    ) -> list[Section]:
    """Every section of the report on ``tables`` (name -> tidy table), in order; figures are linked as
    ``<figure_link>/<name>.png``."""
    table = tidy_frame(pd.concat(list(tables.values()), ignore_index=True)) if tables else tidy_frame([])
    table = table[TIDY_COLUMNS]
    select_by = selection_metric(table)
    plain = table_under_prior(table, None)  # the chosen candidate's numbers: the report's own rule
    choice = density_choice(plain, select_by)
    passes = passes_summary(density_rows(plain))
    by_rule = claims_under_prior_rules(table, select_by)  # no rows without a test KL
    evaluators = evaluators_section(plain)
    sections = [header_section(table, list(tables), generated), changes_section(by_rule),
                scale_section(plain), selection_section(table, select_by), runs_section(table), code_section(tables),
                density_section(choice, figure_link), claims_section(choice, passes),
                sensitivity_section(table, by_rule), evaluators, bandwidth_section(plain, select_by),
                bounds_section(plain), passes_section(passes, figure_link), training_time_section(plain),
                differences_section(table, choice, evaluators is not None)]
    return [s for s in sections if s is not None]


def figure_link(out: Path, figures: Path) -> str:
    """The figures' folder as the report at ``out`` links it: relative to the report's folder."""
    return Path(os.path.relpath(Path(figures).resolve(), Path(out).resolve().parent)).as_posix()


def report_text(sections: Sequence[Section]) -> str:
    """The report's markdown: the sections' own, one blank line apart."""
    return "\n".join(s.markdown.rstrip("\n") + "\n" for s in sections)


def write_report(sections: Sequence[Section], out: Path, figures: Path) -> list[Path]:
    """Write the sections' figures into ``figures`` and the report to ``out``; returns the figure paths."""
    from mapa_exp.sweeps.plots import save

    written = []
    for s in sections:
        for name, fig in s.figures.items():
            save(fig, figures / name)
            written.append(figures / name)
    atomic_write_text(out, report_text(sections))
    return written
