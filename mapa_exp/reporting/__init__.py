"""The reproduction report, built from tidy tables alone (mapa_exp.sweeps.results): each section a function
returning its markdown and its DataFrames (``sections``), the paper's claims (``claims``), MAPA's prior rules
(``priors``), the figures (``figures``), and the assembly (``report``). Imports only mapa_exp.sweeps and
mapa_exp.io of the project: no training, evaluation, Hydra or Lightning."""

from mapa_exp.reporting.report import figure_link, read_tables, report_sections, report_text, write_report
from mapa_exp.reporting.sections import DATE_PREFIX, Section

__all__ = ["DATE_PREFIX", "Section", "figure_link", "read_tables", "report_sections", "report_text", "write_report"]
