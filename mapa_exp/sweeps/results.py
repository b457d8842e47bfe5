"""Sweep results as one tidy table, and the two reductions every figure and report shares.

``collect(sweeps)`` reads every run folder below the given sweep folders -- ``results.json`` (training,
``source = "train"``), ``eval.json`` (evaluation, ``source = "eval"``) and, for the columns results.json
lacks, the run's resolved ``config.yaml`` -- into one row per run x source x metric:

    sweep, experiment, run, run_dir, dataset, method, K, S, K_fraction, bandwidth, draw, seed,
    n_train, batch_size, val_every, eval_checkpoint, prior, train_commit, eval_commit,
    status, reason, source, metric, value

``val_every`` is the run's validation interval in epochs (``trainer.check_val_every_n_epoch`` of its config).
``train_commit`` and ``eval_commit`` are the git commits of the code that trained and evaluated the run, as
results.json and eval.json record them (``code_commit`` and ``code_dirty``; ``<commit>+dirty`` when the
worktree had changes); ``table_with_commits`` supplies them for runs recorded before commits were.
``eval_checkpoint`` (best or last) and ``prior`` (the prior recovery chosen on validation data, e.g.
``bins=null``; empty for N(0, I) models) are what the run's ``eval.json`` says it scored. Each prior candidate's
numbers are rows too, named ``<metric>@<candidate>`` (``test_kl/quadrature@bins=8``), so the choice's effect
can be read off the table. An ``eval.json`` that scored other weights than the run's checkpoint file holds now
(trained on since) gives rows with status ``stale``.

Nothing is dropped: a failed (or preempted, or still running) run keeps its rows with its status and
reason, a run that has no numbers gets one row with an empty metric, and a job folder that never wrote
results.json is a row with status ``missing``.

A configuration is every key of a run's config that decides what it trains (``mapa_exp.config.run_configuration``,
recorded in results.json; for older runs read from config.yaml), hashed into ``config_id`` -- and, without the
method's K / K_fraction keys, ``config_id_k``; without those and S, ``config_id_s``: no list of a method's keys
is kept here, so a new method's hyper-parameter can never merge two configurations. ``best_restarts`` keeps,
per configuration and draw, the restart (seed) with the highest validation log-likelihood (method.md §7);
``choose_on_validation`` adds the K fraction of the MAPA family, and ``choose_s`` a method's S, both on
validation data; ``mean_se_over_draws`` averages a metric over the D data draws with its standard
error. The plotting scripts and the report read only the table and use these functions: no choice anywhere
is made on test data.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np
import pandas as pd
import yaml

from mapa_exp.config import run_configuration
from mapa_exp.io import atomic_write_bytes, content_key

# identity of a run; "seed" is the restart, "draw" the data draw
CONFIG_COLUMNS = ["sweep", "experiment", "dataset", "method", "K", "S", "K_fraction", "bandwidth", "draw"]
ID_COLUMNS = ["config_id", "config_id_k", "config_id_s"]  # the configuration; the same up to K; up to S and K
RUN_COLUMNS = ["run", "run_dir", *CONFIG_COLUMNS[2:], "seed", "n_train", "batch_size", *ID_COLUMNS, "val_every",
               "eval_checkpoint",
               "prior", "train_commit", "eval_commit"]
TIDY_COLUMNS = ["sweep", "experiment", *RUN_COLUMNS, "status", "reason", "source", "metric", "value"]
INT_COLUMNS = ["K", "S", "seed", "draw", "n_train", "batch_size", "val_every"]
FLOAT_COLUMNS = ["K_fraction", "bandwidth", "value"]
# results.json keys that identify the run rather than measure it
IDENTITY_KEYS = {"status", "reason", "dataset", "method", "K", "S", "seed", "draw", "run_dir", "code_commit",
                 "code_dirty", "configuration"}
# columns read from the run's resolved config.yaml (results.json does not carry them)
FROM_CONFIG = {"K_fraction": "method.K_fraction", "bandwidth": "method.bandwidth", "n_train": "dataset.n_train",
               "batch_size": "data.batch_size", "val_every": "trainer.check_val_every_n_epoch"}
COMMIT_LENGTH = 40  # a full git commit in hex: what results.json / eval.json record, and --train-commit takes

SELECT_BY = ("val_loglik/quadrature", "val_loglik/mog_iwae", "val_bound")  # first present wins


# -- reading run folders ------------------------------------------------------------------------
def find_job_folders(sweep: Path) -> list[Path]:
    """Every run folder at or below ``sweep``: one holding results.json, or a Hydra job folder (``.hydra/``) --
    but not a stacked job's own folder (its members are the runs)."""
    found = {p.parent for p in sweep.rglob("results.json")}
    found |= {p.parent for p in sweep.rglob(".hydra") if p.is_dir() and p.parent != sweep and not _is_stack(p.parent)}
    return sorted(p for p in found if ".submitit" not in p.parts)


def _is_stack(folder: Path) -> bool:
    if (folder / "stack.json").exists():
        return True
    try:
        return "stack_members=" in (folder / ".hydra" / "overrides.yaml").read_text()
    except OSError:
        return False


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.load(path.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    except (OSError, yaml.YAMLError):
        return {}
    return data if isinstance(data, dict) else {}


def _select(d: dict, dotted: str):
    for part in dotted.split("."):
        if not isinstance(d, dict) or part not in d:
            return None
        d = d[part]
    return d if not isinstance(d, str) or not d.startswith("${") else None  # unresolved interpolation


def recorded_commit(data: dict | None) -> str | None:
    """The code's git commit a results.json / eval.json records (``code_commit``, ``code_dirty``), with a
    ``+dirty`` suffix when the code had uncommitted changes; None when it records none."""
    commit = (data or {}).get("code_commit")
    if not isinstance(commit, str) or not commit:
        return None
    return commit + ("+dirty" if (data or {}).get("code_dirty") is True else "")


def _number(v) -> float | None:
    """A float for numbers and booleans; None for anything else (strings, lists, None)."""
    if isinstance(v, bool):
        return float(v)
    if isinstance(v, (int, float)) and not (isinstance(v, float) and math.isnan(v)):
        return float(v)
    return None


def _run_identity(folder: Path, sweep: Path, results: dict | None) -> dict:
    """The run's identity columns, from results.json, else its config.yaml, else Hydra's job config."""
    res = results or {}
    cfg = _read_yaml(folder / "config.yaml") or _read_yaml(folder / ".hydra" / "config.yaml")
    job = Path(res["stack_dir"]) if res.get("stack_dir") else folder  # a stack's member: its stacked job's Hydra
    hydra_cfg = _read_yaml(job / ".hydra" / "hydra.yaml")
    ident = {
        "sweep": str(sweep),
        "experiment": _select(hydra_cfg, "hydra.runtime.choices.experiment"),
        "run": str(folder.relative_to(sweep)) if folder != sweep else ".",
        "run_dir": str(folder),
        "dataset": res.get("dataset", _select(cfg, "dataset.name")),
        "method": res.get("method", _select(cfg, "method.name")),
        "K": res.get("K", _select(cfg, "method.K")),
        "S": res.get("S", _select(cfg, "method.S")),
        "seed": res.get("seed", _select(cfg, "seed")),
        "draw": res.get("draw", _select(cfg, "dataset.draw")),
    }
    for column, key in FROM_CONFIG.items():
        ident[column] = _select(cfg, key)
    ident["train_commit"] = recorded_commit(results)
    configuration = res.get("configuration") or (run_configuration(cfg) if cfg else None)
    if configuration:
        ident.update(configuration_ids(configuration))
    return ident


CHOICE_LEAVES = {"config_id": (), "config_id_k": ("K", "K_fraction"), "config_id_s": ("K", "K_fraction", "S")}


def configuration_ids(configuration: dict) -> dict[str, str]:
    """The ID_COLUMNS of a run's configuration (``mapa_exp.config.run_configuration``: every key that decides
    what it trains): a hash of all of it, and of all but the method's keys named K / K_fraction (where the K
    fraction is chosen), and also S (where S is chosen), at any depth below ``method.``."""
    out = {}
    for column, leaves in CHOICE_LEAVES.items():
        kept = {k: v for k, v in configuration.items()
                if not (k.startswith("method.") and k.rsplit(".", 1)[-1] in leaves)}
        out[column] = content_key(kept)[:16]
    return out


def _file_rows(ident: dict, source: str, data: dict, metrics: dict) -> list[dict]:
    """Rows of one results.json / eval.json: one per numeric metric, or one empty row if there is none."""
    base = {**ident, "status": data.get("status", "unknown"), "reason": data.get("reason"), "source": source}
    rows = [{**base, "metric": name, "value": num} for name, v in metrics.items() if (num := _number(v)) is not None]
    return rows or [{**base, "metric": None, "value": np.nan}]


def run_rows(folder: Path, sweep: Path) -> list[dict]:
    """The tidy rows of one run folder (see the module docstring)."""
    results = _read_json(folder / "results.json")
    ident = _run_identity(folder, sweep, results)
    if results is None:
        reason = "no results.json: the job died before training started" if not (folder / "results.json").exists() \
            else "results.json is unreadable"
        return [{**ident, "status": "missing", "reason": reason, "source": "train", "metric": None, "value": np.nan}]
    evaluation = _read_json(folder / "eval.json")
    if evaluation is not None:
        scored = evaluation.get("scored") or {}
        ident["eval_checkpoint"] = (scored.get("checkpoint") or {}).get("which", evaluation.get("checkpoint"))
        ident["prior"] = (scored.get("prior") or {}).get("chosen")
        ident["eval_commit"] = recorded_commit(evaluation)
    rows = _file_rows(ident, "train", results, {k: v for k, v in results.items() if k not in IDENTITY_KEYS})
    if evaluation is not None:
        metrics = dict(evaluation.get("metrics") or {})
        for label, values in (evaluation.get("prior_candidates") or {}).items():
            metrics.update({f"{k}@{label}": v for k, v in values.items()})
        eval_rows = _file_rows(ident, "eval", evaluation, metrics)
        stale = _stale(folder, evaluation)
        if stale:
            eval_rows = [{**r, "status": "stale", "reason": stale} for r in eval_rows]
        rows += eval_rows
    elif (folder / "eval.json").exists():
        rows.append({**ident, "status": "missing", "reason": "eval.json is unreadable", "source": "eval",
                     "metric": None, "value": np.nan})
    return rows


def _stale(folder: Path, evaluation: dict) -> str | None:
    """Why ``eval.json`` no longer describes the run's checkpoint (its file changed or vanished), or None."""
    from mapa_exp.io import sha256_bytes

    ckpt = ((evaluation.get("scored") or {}).get("checkpoint")) or {}
    if evaluation.get("status") != "completed" or not ckpt.get("sha256"):
        return None
    try:
        now = sha256_bytes((folder / ckpt["file"]).read_bytes())
    except OSError:
        return f"eval.json scored {ckpt['file']}, which is gone; rerun evaluate.py"
    if now != ckpt["sha256"]:
        return (f"eval.json scored {ckpt['file']} at epoch {ckpt.get('epoch')}; the run was trained on since; "
                "rerun evaluate.py")
    return None


def collect(sweeps: Iterable[str | Path]) -> pd.DataFrame:
    """One tidy table of every run below the given sweep (or run) folders."""
    rows: list[dict] = []
    for sweep in sweeps:
        sweep = Path(sweep).expanduser().resolve()
        if not sweep.is_dir():
            raise FileNotFoundError(f"sweep folder {sweep} does not exist")
        for folder in find_job_folders(sweep):
            rows += run_rows(folder, sweep)
    return tidy_frame(rows)


def table_with_commits(table: pd.DataFrame, train_commit: str | None = None, eval_commit: str | None = None
                       ) -> pd.DataFrame:
    """``table`` with ``train_commit`` (``eval_commit``) set to the given commit for the runs whose results.json
    (eval.json) records none -- runs trained (evaluated) before the files recorded their code's commit. A run
    without the file (status ``missing``) gets none. ValueError for a value that is not a full 40-hex commit."""
    out = table.copy()
    for column, source, commit in (("train_commit", "train", train_commit), ("eval_commit", "eval", eval_commit)):
        if commit is None:
            continue
        commit = checked_commit(commit, f"--{column.replace('_', '-')}")
        has_file = out.loc[(out["source"] == source) & (out["status"] != "missing"), "run_dir"].unique()
        fill = out["run_dir"].isin(has_file) & out[column].isna()
        out.loc[fill, column] = commit
    return out


def checked_commit(commit: str, key: str) -> str:
    """``commit`` in lower case if it is a full 40-hex git commit; ValueError ``key=commit: reason`` if not."""
    if len(commit) != COMMIT_LENGTH or any(c not in "0123456789abcdef" for c in commit.lower()):
        raise ValueError(f"{key}={commit}: must be a full {COMMIT_LENGTH}-hex git commit (git rev-parse <revision>)")
    return commit.lower()


def tidy_frame(rows: list[dict] | pd.DataFrame) -> pd.DataFrame:
    """Rows as a DataFrame with the tidy columns, in order, and stable dtypes (nullable ints)."""
    df = pd.DataFrame(rows)
    for c in TIDY_COLUMNS:
        if c not in df.columns:
            df[c] = None
    df = df[TIDY_COLUMNS].copy()
    for c in INT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("Int64")
    for c in FLOAT_COLUMNS:
        df[c] = pd.to_numeric(df[c], errors="coerce").astype("float64")
    for c in set(TIDY_COLUMNS) - set(INT_COLUMNS) - set(FLOAT_COLUMNS):
        df[c] = df[c].astype("string")
    return df.sort_values(["sweep", "run", "source", "metric"], na_position="first", kind="stable").reset_index(drop=True)


# -- files -------------------------------------------------------------------------------------
def write_table(df: pd.DataFrame, stem: str | Path) -> tuple[Path, Path]:
    """``<stem>.csv`` and ``<stem>.parquet``, each written atomically; returns both paths."""
    stem = Path(stem)
    csv, parquet = stem.with_name(stem.name + ".csv"), stem.with_name(stem.name + ".parquet")
    atomic_write_bytes(csv, df.to_csv(index=False).encode())
    buf = io.BytesIO()
    df.to_parquet(buf, index=False)
    atomic_write_bytes(parquet, buf.getvalue())
    return csv, parquet


def read_table(path: str | Path) -> pd.DataFrame:
    """A tidy table from ``.parquet`` or ``.csv``, with the dtypes ``collect`` gives."""
    path = Path(path)
    df = pd.read_parquet(path) if path.suffix == ".parquet" else pd.read_csv(path, keep_default_na=True)
    return tidy_frame(df)


# -- reductions --------------------------------------------------------------------------------
def wide(table: pd.DataFrame, metrics: Sequence[str] | None = None) -> pd.DataFrame:
    """One row per run: its identity columns, ``status_train`` / ``status_eval``, and a column per metric."""
    keys = ["sweep", "experiment", *RUN_COLUMNS]
    t = table if metrics is None else table[table["metric"].isin(list(metrics))]
    runs = table[keys].drop_duplicates("run_dir")
    status = table.drop_duplicates(["run_dir", "source"]).pivot(index="run_dir", columns="source", values="status")
    status.columns = [f"status_{c}" for c in status.columns]
    values = t.dropna(subset=["metric"]).pivot_table(index="run_dir", columns="metric", values="value", aggfunc="first")
    out = runs.merge(status, left_on="run_dir", right_index=True, how="left")
    out = out.merge(values, left_on="run_dir", right_index=True, how="left")
    for c in ("status_train", "status_eval"):
        if c not in out.columns:
            out[c] = pd.NA
    return out.reset_index(drop=True)


def selection_metric(table: pd.DataFrame, candidates: Sequence[str] = SELECT_BY) -> str:
    """The first of ``candidates`` the table has values for (validation log-likelihood first)."""
    present = set(table["metric"].dropna())
    for m in candidates:
        if m in present:
            return m
    raise KeyError(f"none of the selection metrics {list(candidates)} is in the table")


LEGACY_ID_COLUMNS = {  # what identified a configuration in tables collected before ID_COLUMNS existed
    "config_id": [c for c in CONFIG_COLUMNS if c != "draw"],
    "config_id_k": ["experiment", "dataset", "method", "bandwidth", "S"],
    "config_id_s": ["experiment", "dataset", "method", "bandwidth"],
}


def with_configuration_ids(w: pd.DataFrame) -> pd.DataFrame:
    """A wide table whose ID_COLUMNS are filled. Where some run was collected without them (a table from before
    they existed), every run gets ids made of the columns that identified a configuration then
    (LEGACY_ID_COLUMNS), so that old and new tables group alike and as the old ones did."""
    w = w.copy()
    legacy = any(c not in w.columns or w[c].isna().any() for c in ID_COLUMNS)
    for column, columns in LEGACY_ID_COLUMNS.items():
        if legacy:
            keys = w[columns].apply(lambda row: "|".join(str(v) for v in row), axis=1) if len(w) else w[columns[0]]
            w[column] = keys.map(lambda key: "legacy:" + content_key(key)[:16])
        w[column] = w[column].astype(str)
    return w


def best_restarts(table: pd.DataFrame, select_by: str | None = None, config: Sequence[str] | None = None
                  ) -> pd.DataFrame:
    """Per configuration and draw (default ``config``: the experiment, the run's ``config_id`` -- every key of
    its config that decides what it trains -- and ``draw``), the one completed restart with the highest
    ``select_by`` (default: ``selection_metric``), as a wide table (see ``wide``) with a column ``restarts`` =
    the number of completed restarts it was chosen from. Ties go to the lowest seed."""
    select_by = select_by or selection_metric(table)
    w = with_configuration_ids(wide(table))
    if select_by not in w.columns:
        raise KeyError(f"selection metric {select_by!r} is not in the table")
    ok = w["status_train"].eq("completed").fillna(False)
    source = table.loc[table["metric"] == select_by, "source"]
    if len(source) and (source == "eval").all():
        ok &= w["status_eval"].eq("completed").fillna(False)
    w = w[ok & w[select_by].notna()].copy()
    config = list(config or ["experiment", "config_id", "draw"])
    w["restarts"] = w.groupby(config, dropna=False)["run_dir"].transform("size")
    w = w.sort_values([*config, select_by, "seed"], ascending=[True] * len(config) + [False, True], na_position="first")
    return w.drop_duplicates(config, keep="first").reset_index(drop=True)


def choose_on_validation(table: pd.DataFrame, select_by: str | None = None) -> pd.DataFrame:
    """The runs a report shows, every choice made on validation data (``select_by``, default
    ``selection_metric``): per configuration and draw the best restart (``best_restarts``); then, where a
    method was run with several K fractions, per configuration up to K (``config_id_k``) the fraction whose
    chosen restarts have the highest mean ``select_by`` over draws. A wide table, one row per
    (configuration, draw), with ``k_fractions`` = how many fractions were compared."""
    select_by = select_by or selection_metric(table)
    best = best_restarts(table, select_by)
    keys = ["experiment", "config_id_k"]
    score = best.groupby([*keys, "K_fraction"], dropna=False)[select_by].mean().rename("_score").reset_index()
    score["k_fractions"] = score.groupby(keys, dropna=False)["_score"].transform("size")
    score = score.sort_values([*keys, "_score", "K_fraction"], ascending=[True] * len(keys) + [False, True],
                              na_position="first")
    chosen = score.drop_duplicates(keys, keep="first")[[*keys, "K_fraction", "k_fractions"]]
    out = best.merge(chosen, on=[*keys, "K_fraction"], how="inner")
    return out.sort_values(["experiment", "dataset", "method", "bandwidth", "S", "draw"],
                           na_position="first").reset_index(drop=True)


def choose_s(chosen: pd.DataFrame, select_by: str, by: Sequence[str] = ("experiment", "config_id_s")) -> pd.DataFrame:
    """Per ``by`` (default: the configuration up to S and K), the S whose (validation-chosen) runs have the
    highest mean ``select_by`` over draws: those runs, one per draw, with ``S_choices`` = how many values of S
    were compared."""
    chosen = with_configuration_ids(chosen)
    by = [c for c in by if c in chosen.columns]
    score = chosen.groupby([*by, "S"], dropna=False)[select_by].mean().rename("_score").reset_index()
    score["S_choices"] = score.groupby(by, dropna=False)["_score"].transform("size")
    score = score.sort_values([*by, "_score", "S"], ascending=[True] * len(by) + [False, True], na_position="first")
    best_s = score.drop_duplicates(by, keep="first")[[*by, "S", "S_choices"]]
    return chosen.merge(best_s, on=[*by, "S"], how="inner").reset_index(drop=True)


def mean_se_over_draws(best: pd.DataFrame, metric: str, by: Sequence[str] | None = None) -> pd.DataFrame:
    """Mean, standard error (sample sd / sqrt(n), NaN for one draw) and n of ``metric`` over draws,
    per ``by`` (default: the configuration columns without ``draw``, and its ``config_id``), from a
    ``best_restarts`` table."""
    by = [c for c in (by or [*CONFIG_COLUMNS, "config_id"]) if c != "draw"]
    if metric not in best.columns:
        raise KeyError(f"metric {metric!r} is not in the table")
    g = best.dropna(subset=[metric]).groupby(by, dropna=False)[metric]
    out = g.agg(mean="mean", sd=lambda v: v.std(ddof=1), n="count").reset_index()
    out["se"] = out["sd"] / np.sqrt(out["n"])
    out.loc[out["n"] < 2, "se"] = np.nan
    return out.drop(columns="sd")[[*by, "mean", "se", "n"]]


def series_label(table: pd.DataFrame) -> pd.Series:
    """A legend label per row: the method, plus its K rule where one method appears with several
    (``K_fraction`` f: "mapa K=ceil(0.1S)", f = 0: "mapa K=1"; a fixed K: "mapa K=5")."""
    def rule(row) -> str:
        f = row["K_fraction"]
        if pd.notna(f):
            return "K=1" if f == 0 else f"K=ceil({f:g}S)"
        return f"K={int(row['K'])}" if pd.notna(row["K"]) else ""

    rules = table.apply(rule, axis=1) if len(table) else pd.Series([], dtype="string")
    several = rules.groupby(table["method"]).transform("nunique") > 1 if len(table) else rules
    return table["method"].astype(str).where(~several, table["method"].astype(str) + " " + rules)
