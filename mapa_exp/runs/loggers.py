"""Per-member metric loggers, built from the ``logger`` config group with each member's own config.

Every member of a stack (a lone run is a stack of one) has its own loggers, writing into its own run
folder: ``MetricsCSV`` (``metrics.csv``) and, with ``logger=wandb``, ``WandbRun`` (one W&B run per member,
offline unless an API key says otherwise). A logger takes rows -- ``{"epoch", "step", <metric>: value}`` --
through ``log_metrics``, writes them on ``save`` (at each epoch's checkpoint), and is closed by ``finalize``.
"""

from __future__ import annotations

import csv
import io
import logging
import os
from pathlib import Path

from mapa_exp.io import atomic_write_text

log = logging.getLogger(__name__)

FIRST_COLUMNS = ("epoch", "step")


class MemberLogger:
    """What the training job hands a member's loggers; a logger keeps what it can (every method is optional)."""

    def log_hyperparams(self, config: dict) -> None:
        pass

    def log_metrics(self, row: dict) -> None:
        pass

    def log_summary(self, values: dict) -> None:
        """Final numbers (results.json's, the evaluation's) as the run's summary."""

    def log_images(self, figures: dict, step: int) -> None:
        """matplotlib figures by name."""

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        pass

    @property
    def takes_pictures(self) -> bool:
        return False

    def save(self) -> None:
        pass

    def finalize(self, status: str) -> None:
        pass


class MetricsCSV(MemberLogger):
    """``metrics.csv``: one row per logging event, one column per metric (blank where a row has none).

    Rows are appended at each ``save``; the file is rewritten only when a new column appears. ``keep_epochs``
    (a resumed run) first keeps the earlier attempts' rows of the epochs before it, so each epoch's rows
    appear once whatever the interruptions.
    """

    def __init__(self, path: str | os.PathLike, keep_epochs: int | None = None):
        self.path = Path(path)
        self.rows: list[dict] = []
        self._written, self._columns = 0, []
        if self.path.exists():
            old = read_rows(self.path)
            self.rows = [r for r in old if keep_epochs is not None and _epoch(r) < keep_epochs]
            if len(self.rows) != len(old) or not self.rows:
                self._rewrite()

    def log_metrics(self, row: dict) -> None:  # (config.yaml, results.json and eval.json hold the rest)
        self.rows.append(row)

    def save(self) -> None:
        if self._written == len(self.rows):
            return
        columns = _columns(self.rows)
        if columns != self._columns or not self.path.exists():
            self._rewrite()
            return
        with open(self.path, "a", newline="") as fh:
            csv.DictWriter(fh, fieldnames=columns, restval="").writerows(self.rows[self._written:])
        self._written = len(self.rows)

    def _rewrite(self) -> None:
        self._columns = _columns(self.rows)
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns, restval="")
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.path, buf.getvalue())
        self._written = len(self.rows)

    def finalize(self, status: str) -> None:
        self.save()


def _columns(rows: list[dict]) -> list[str]:
    keys = set().union(*rows) if rows else set()
    return [c for c in FIRST_COLUMNS if c in keys] + sorted(keys - set(FIRST_COLUMNS))


def _epoch(row: dict) -> float:
    try:
        return float(row.get("epoch") or "nan")
    except ValueError:
        return float("nan")


def read_rows(path: str | os.PathLike) -> list[dict]:
    """The rows of a metrics.csv, blank cells left out."""
    with open(path, newline="") as fh:
        return [{k: v for k, v in r.items() if v != ""} for r in csv.DictReader(fh)]


class WandbRun(MemberLogger):
    """One W&B run (of one member), offline when ``offline`` is true, or, when it is null, whenever no
    ``WANDB_API_KEY`` is set or ``WANDB_MODE`` is ``offline`` (air-gapped clusters; `wandb sync` later).

    Several can be open in one process (a stack's members). Metrics are plotted against
    ``trainer/global_step`` (and ``epoch``), so a resumed run that logs a step again does not lose it.
    The run survives losing the W&B service process: on preemption or ``scontrol requeue`` SLURM signals
    every process of the job, ``wandb-core`` included, which exits on SIGTERM; this logger then warns once
    and stops sending (metrics.csv keeps every row), and the requeued attempt continues the same W&B run
    (its id comes from the run folder). The API key is read by wandb from the environment and never
    enters a config or a result file.
    """

    def __init__(self, project: str, save_dir: str, id: str, name: str | None = None, group: str | None = None,
                 job_type: str = "train", tags: list | None = None, entity: str | None = None,
                 offline: bool | None = None, resume: str = "allow"):
        if offline is None:
            offline = os.environ.get("WANDB_MODE") == "offline" or not os.environ.get("WANDB_API_KEY")
        self.settings = dict(project=project, entity=entity, dir=save_dir, id=id, name=name, group=group,
                             job_type=job_type, tags=list(tags or []), resume=resume,
                             mode="offline" if offline else "online")
        self.step = 0
        self.run = None
        self.lost = False

    def _guarded(self, send, *args, **kwargs) -> None:
        """Call ``send`` unless the service is gone; a lost connection is noted once, not raised."""
        if self.lost:
            return
        try:
            send(*args, **kwargs)
        except ConnectionError as exc:
            if not self.lost:
                log.warning("W&B service lost (%s: %s); logging to metrics.csv only for the rest of this attempt",
                            type(exc).__name__, exc)
            self.lost = True

    def log_hyperparams(self, config: dict) -> None:
        self._guarded(self._start, config)

    def _start(self, config: dict) -> None:
        import wandb

        Path(self.settings["dir"]).mkdir(parents=True, exist_ok=True)
        # console="off": a stack's members share one console (train.log keeps it)
        self.run = wandb.init(config=config, reinit="create_new", settings=wandb.Settings(console="off", silent=True),
                              **self.settings)
        self.run.define_metric("trainer/global_step")
        self.run.define_metric("*", step_metric="trainer/global_step")

    def log_metrics(self, row: dict) -> None:
        self.step = row.get("step", self.step)
        data = {k: v for k, v in row.items() if k != "step"} | {"trainer/global_step": self.step}
        self._send(lambda run: run.log(data))

    def log_summary(self, values: dict) -> None:
        self._send(lambda run: run.summary.update({k: v for k, v in values.items() if isinstance(v, (int, float, str))
                                                    or v is None}))

    def log_images(self, figures: dict, step: int) -> None:
        import matplotlib.pyplot as plt
        import wandb

        images = {name: wandb.Image(fig) for name, fig in figures.items()}
        for fig in figures.values():
            plt.close(fig)
        self._send(lambda run: run.log({**images, "trainer/global_step": step}))

    def log_table(self, name: str, columns: list[str], rows: list[list]) -> None:
        import wandb

        self._send(lambda run: run.log({name: wandb.Table(columns=columns, data=rows),
                                        "trainer/global_step": self.step}))

    @property
    def takes_pictures(self) -> bool:
        return not self.lost

    def _send(self, send) -> None:
        if self.run is None:
            self._guarded(self._start, {})
        if self.run is not None:
            self._guarded(send, self.run)

    def finalize(self, status: str) -> None:
        if self.run is None or self.lost:
            return
        folder = getattr(self.run, "dir", None)  # <save_dir>/wandb/<offline-run-...>/files
        self._guarded(self.run.finish, exit_code=0 if status in ("completed", "success") else 1)
        self.run = None
        if self.settings["mode"] == "offline" and folder:
            run_folder = Path(folder).parent
            log.info("W&B offline run %s: %s; upload it with: wandb sync %s", self.settings["id"], run_folder,
                     run_folder)
