"""What the command lines share (train.py, evaluate.py and scripts/): the check of a command line before any
job, and their ``--help`` text.

``check_command_line(config_name, argv)`` is what ``train.py`` and ``evaluate.py`` call before Hydra runs:
it parses the overrides, composes the config of the first job (the first value of every sweep), and
validates it (``mapa_exp.config``); any problem -- an override Hydra cannot parse, an unknown group option, a
key that does not exist, a wrong type, an output folder that cannot be written or that another process
writes, a launcher that cannot run here, an evaluation folder that is no run -- is printed as one line
``error: key=value: reason`` and the process exits with status 2 before any run folder is made.
"""

from __future__ import annotations

import difflib
import re
import sys
from dataclasses import is_dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ValidationError

from mapa_exp.config import compose, expected_type, validate
from mapa_exp.errors import ConfigError, check


def description(doc: str | None) -> str:
    """A script's ``--help`` description: the first paragraph of its docstring, as one sentence or more (the first
    line alone stopped mid-sentence)."""
    first = (doc or "").strip().split("\n\n")[0]
    return " ".join(line.strip() for line in first.splitlines())


# -- the command line ----------------------------------------------------------------------------------
SPECIAL_FLAGS = {"--cfg", "-c", "--info", "-i", "--help", "-h", "--hydra-help", "--shell-completion", "-sc",
                 "--resolve", "--package", "-p", "--version"}
PATH_FLAGS = {"--config-dir": "dir", "-cd": "dir", "--config-path": "path", "-cp": "path",
              "--config-name": "name", "-cn": "name", "--experimental-rerun": "rerun"}


def check_command_line(config_name: str, argv: list[str]) -> None:
    """Exit with one line and status 2 if the command line composes a bad config (module doc); else return."""
    try:
        _check(config_name, argv)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        sys.exit(2)


def _check(config_name: str, argv: list[str]) -> None:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import HydraException

    overrides, config_dir, it = [], None, iter(argv)
    for arg in it:
        if arg in SPECIAL_FLAGS or arg.startswith(("--cfg=", "--info=")):
            return  # Hydra's own modes: nothing runs
        if arg in PATH_FLAGS:
            value = next(it, None)
            if PATH_FLAGS[arg] == "dir":
                config_dir = value
            elif PATH_FLAGS[arg] in ("path", "name", "rerun"):
                return  # another primary config: leave it to Hydra
            continue
        if arg.startswith("-"):
            continue  # -m / --multirun and the like
        overrides.append(arg)
    parser = OverridesParser.create()
    first_job = []
    for text in overrides:
        try:
            ov = parser.parse_override(text)
        except HydraException as exc:
            key, _, value = text.partition("=")
            raise ConfigError(key, value, f"cannot be parsed ({str(exc).splitlines()[0]}); quote the value for "
                              f"Hydra inside the shell's quotes, e.g. \"{key}='{value}'\"") from None
        if ov.is_hydra_override() and not ov.key_or_group.startswith("hydra/") and config_name != "train":
            continue  # hydra.* keys are Hydra's own (train.py's are composed too: its output folders are checked)
        if ov.is_sweep_override():
            try:
                values = list(ov.sweep_string_iterator())
            except Exception:  # noqa: BLE001 -- an interval sweep (another sweeper): not checked here
                continue
            text = f"{ov.get_key_element()}={values[0]}"
        first_job.append(text)
    if config_dir:
        first_job.append(f"hydra.searchpath=[file://{Path(config_dir).expanduser().resolve()}]")
    try:
        cfg = compose(config_name, first_job, return_hydra_config=config_name == "train")
    except Exception as exc:  # noqa: BLE001 -- composition errors come in many types
        raise _composition_error(exc, config_name, first_job) from None
    validate(cfg)
    touched = config_dir is not None or any(t.lstrip("+~").startswith("evaluator") for t in first_job)
    if touched and (config_name == "evaluate" or cfg.get("evaluate")):  # the estimators' own checks, before
        # any training; only when the command line changed them (the shipped defaults pass them, and building
        # the estimators loads torch, seconds a good command line need not wait)
        from mapa_exp.evaluation.evaluate import build_estimators
        from mapa_exp.runs.training import config_error

        try:
            build_estimators(cfg)
        except Exception as exc:  # noqa: BLE001 -- instantiate wraps the estimator's ConfigError
            raise (config_error(exc) or exc) from None
    if config_name == "train":
        _check_train_job(cfg, any(a in ("-m", "--multirun") for a in argv), argv)
    if config_name == "evaluate":  # the folders too: the same checks evaluate.py makes, before torch loads
        from mapa_exp.evaluation.runs import check_sweep_folder, read_run_files

        check((cfg.run is None) != (cfg.sweep is None), "run", cfg.run,
              "give exactly one of run=<run folder> or sweep=<multirun folder>")
        if cfg.run is not None:  # and where eval.json (and a sweep's summary.csv) will go can be written
            probe_writable("run", str(read_run_files(cfg.run)[0]))
        else:
            folder, runs = check_sweep_folder(cfg.sweep)
            for path in (folder, *runs):
                probe_writable("sweep", str(path))


_HELD: list = []  # the folder locks the command-line check took: held until the process ends


def _check_train_job(cfg: DictConfig, multirun: bool, argv: list[str]) -> None:
    """What only the command line tells: ``stack=true`` without ``-m``, an output folder that cannot be written
    or that another process is writing, and a SLURM launcher where there is no SLURM."""
    import shutil

    from hydra.core.hydra_config import HydraConfig

    check(multirun or not cfg.get("stack"), "stack", "true",
          "groups the jobs of a multirun: add -m (a single run is already a stack of one)")
    HydraConfig.instance().set_config(cfg)
    try:
        key = "hydra.sweep.dir" if multirun else "hydra.run.dir"
        folder = str(OmegaConf.select(cfg, key))
        launcher = str(OmegaConf.select(cfg, "hydra.launcher._target_", default="") or "")
    finally:
        HydraConfig.instance().cfg = None
    check_writable_folder(key, folder)
    if any(a.startswith(f"{key}=") for a in argv):  # a pinned folder: held from now on (re-entrant for training)
        from mapa_exp.io import FolderLock

        import atexit

        _HELD.append(FolderLock([folder], key, "swept" if multirun else "written").acquire())
        atexit.register(_HELD[-1].release)
    if multirun and "slurm" in launcher.lower():
        check(shutil.which("sbatch") is not None, "hydra/launcher", "slurm",
              "needs SLURM, and sbatch is not on PATH (on one machine: bash scripts/slurm_cluster.sh start; "
              "locally: hydra/launcher=joblib)")


def check_writable_folder(key: str, folder: str) -> None:
    """ConfigError unless ``folder`` can be made (or exists) and written (``probe_writable``), and no other
    process holds its lock (``mapa_exp.io.FolderLock``)."""
    from mapa_exp.io import FolderLock

    path = probe_writable(key, folder)
    holder = FolderLock.holder(path) if path.is_dir() else None
    if holder is not None:
        from mapa_exp.io import FolderBusyError

        raise FolderBusyError(key, folder, f"is being written by {holder}; wait for it to end or use another folder")


def probe_writable(key: str, folder: str | Path) -> Path:
    """``folder`` as an absolute path, or a ConfigError unless it can be made (or exists) and written. Tried for
    real -- a probe file, removed at once -- since permission bits do not tell a read-only mount (which the root
    user cannot write either), ``/proc`` or a path through a regular file."""
    import os
    import tempfile

    path = Path(folder).expanduser()
    path = path if path.is_absolute() else Path.cwd() / path
    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    check(existing.is_dir(), key, folder, f"cannot be made: {existing} is a file, not a folder")
    try:
        fd, probe = tempfile.mkstemp(dir=existing, prefix=".write-probe-")
        os.close(fd)
        os.unlink(probe)
        if existing != path:  # the first folder to make, made and removed
            first = path
            while first.parent != existing:
                first = first.parent
            first.mkdir()
            first.rmdir()
    except OSError as exc:
        raise ConfigError(key, folder, f"cannot be written ({exc.strerror or exc}: {exc.filename or existing})") from None
    return path


def _value(override: str):
    """The value an override sets, as Hydra parses it (5 for "a=5", the text when it cannot be parsed)."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    try:
        return OverridesParser.create().parse_override(override).value()
    except Exception:  # noqa: BLE001
        return override.partition("=")[2]


def _composition_error(exc: Exception, config_name: str, overrides: list[str]) -> ConfigError:
    """One line for a Hydra composition error: the override, and the option or key it should have been."""
    msg = " ".join(str(exc).split())
    cause = exc.__cause__ or exc.__context__
    missing = re.search(r"Could not find '([^']+)'", msg)
    if missing:
        group, _, option = missing.group(1).rpartition("/")
        found = re.search(r"Available options[^:]*:(.*?)(?:\n\s*\n|$)", str(exc), re.S)
        options = []
        for line in (found.group(1).split("\n") if found else []):
            if line.strip().startswith("Config search path"):
                break
            if line.strip():
                options.append(line.strip())
        return ConfigError(group or option, option, "no such option" + (f"; available: {', '.join(options)}" if options else ""))
    override = re.search(r"Could not (?:override|append to config)[^']*'([^']+)'", msg)
    key = override.group(1) if override else str(getattr(cause, "full_key", "") or "")
    value = next((_value(o) for o in overrides if o.lstrip("+~").partition("=")[0] == key), None)
    schema = getattr(cause, "object_type", None)
    if isinstance(cause, ValidationError) and is_dataclass(schema) and getattr(cause, "key", None) is not None:
        return ConfigError(key, value, f"must be {expected_type(schema, str(cause.key))}")  # a schema'd group's key
    if isinstance(cause, ValidationError) or "could not be converted" in msg or "Value '" in msg:
        kind = re.search(r"converted to (\w+)", msg)
        names = {"Integer": "an integer", "Float": "a number", "Boolean": "true or false"}
        return ConfigError(key, value, f"must be {names.get(kind.group(1), kind.group(1)) if kind else 'of another type'}")
    if key:
        parent, _, leaf = key.rpartition(".")
        rest = [o for o in overrides if o.lstrip("+~").partition("=")[0] != key]
        try:
            base = compose(config_name, overrides=rest)
            node = OmegaConf.select(base, parent) if parent else base
            keys = list(node.keys()) if isinstance(node, DictConfig) else []
        except Exception:  # noqa: BLE001
            keys = []
        near = difflib.get_close_matches(leaf, [str(k) for k in keys], n=1, cutoff=0.4)
        hint = f"; did you mean {parent + '.' if parent else ''}{near[0]}?" if near else ""
        return ConfigError(key, value, f"no such key{hint}")
    return ConfigError("overrides", " ".join(overrides), msg.split(". ")[0][:200])
