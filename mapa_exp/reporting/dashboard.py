"""The sweep's summary run on Weights & Biases (``job_type=report``): the report's figures, every DataFrame of
every section as a ``wandb.Table`` (``tables/<section>/<name>``), the report as HTML, and the tidy tables as a
``tidy-results`` artifact."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import pandas as pd

from mapa_exp.reporting.sections import Section


def wandb_frame(frame: pd.DataFrame) -> pd.DataFrame:
    """``frame`` with plain Python values (None for missing ones, text for other objects) that a W&B table
    accepts: no pandas NA, no nullable dtypes."""
    out = frame.reset_index(drop=True).astype(object)
    out = out.where(frame.reset_index(drop=True).notna(), None)
    return out.map(lambda v: v if v is None or isinstance(v, (bool, int, float, str)) else
                   (v.item() if hasattr(v, "item") else str(v)))


def runs_wandb_group(table: pd.DataFrame) -> str | None:
    """The W&B group the sweep's runs logged to (their resolved config.yaml), else the sweep folder's name."""
    import yaml

    for run_dir in table["run_dir"].dropna().unique()[:50]:
        try:
            cfg = yaml.safe_load((Path(run_dir) / "config.yaml").read_text())
        except (OSError, yaml.YAMLError):
            continue
        group = (((cfg or {}).get("logger") or {}).get("wandb") or {}).get("group")
        if group:
            return group
    sweeps = table["sweep"].dropna().unique()
    return Path(sweeps[0]).name if len(sweeps) else None


def log_report_run(sections: Sequence[Section], text: str, figures: Sequence[Path], tables: Sequence[Path],
                   run_dir: Path, project: str, group: str | None,
                   offline: bool | None = None) -> tuple[str, Path | None]:
    """Log the summary run (files under ``run_dir``); returns its id and, offline, its folder (what ``wandb sync``
    uploads; None online). Offline when ``offline`` or, if None, when ``WANDB_MODE=offline`` or no
    ``WANDB_API_KEY`` is set."""
    import wandb

    if offline is None:
        offline = os.environ.get("WANDB_MODE") == "offline" or not os.environ.get("WANDB_API_KEY")
    run = wandb.init(project=project, group=group, job_type="report", name=f"report {group or ''}".strip(),
                     dir=str(run_dir), mode="offline" if offline else "online", reinit="create_new",
                     settings=wandb.Settings(console="off", silent=True))
    run.log({f"figures/{Path(p).stem}": wandb.Image(str(p)) for p in figures})
    for s in sections:
        for name, frame in s.tables.items():
            if len(frame.columns):
                run.log({f"tables/{s.key}/{name}": wandb.Table(dataframe=wandb_frame(frame))})
    run.log({"report": wandb.Html(f"<pre>{text}</pre>")})
    artifact = wandb.Artifact("tidy-results", type="dataset", description="scripts/collect.py tables of the sweep")
    for t in tables:
        artifact.add_file(str(t))
    run.log_artifact(artifact)
    run_id, folder = run.id, Path(run.dir).parent  # <run_dir>/wandb/<offline-run-...>/files
    run.finish()
    return run_id, folder if offline else None
