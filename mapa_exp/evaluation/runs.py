"""Finished training runs as Python objects: config, results, data and the trained module, loaded safely.

A run folder is what ``train.py`` writes (``config.yaml``, ``results.json``, ``checkpoints/last.ckpt`` and
``checkpoints/best.ckpt``: the weights at the epoch with the best validation bound, what is evaluated by default).
``load_run`` refuses, with one line naming the folder, anything that is not a completed run.
Checkpoints are read with ``torch.load(weights_only=True)``: no pickled object is ever executed.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from omegaconf import DictConfig, OmegaConf

from mapa_exp.errors import ConfigError, check
from mapa_exp.io import sha256_bytes

if TYPE_CHECKING:
    import torch

log = logging.getLogger(__name__)  # torch is imported where weights are read: the folder checks run before it loads


@dataclass
class Run:
    path: Path
    cfg: DictConfig
    results: dict
    datamodule: object  # GroundTruthDataModule, set up
    module: torch.nn.Module  # the trained LightningModule, eval mode, on the CPU


def find_runs(folder: str | Path) -> list[Path]:
    """Every run folder (one holding results.json) at or below ``folder``, sorted."""
    folder = Path(folder)
    return sorted(p.parent for p in folder.rglob("results.json"))


def read_run_files(path: str | Path, key: str = "run") -> tuple[Path, DictConfig, dict]:
    """The resolved config and results of a completed run, or a ConfigError saying why not."""
    check(str(path).strip() != "", key, str(path), "is empty: give a run folder")
    path = Path(path).expanduser().resolve()
    check(path.is_dir(), key, str(path), "is not a folder")
    results_file, cfg_file = path / "results.json", path / "config.yaml"
    check(results_file.exists() or not find_runs(path), key, str(path), "is a sweep folder; use sweep=<folder>")
    check(results_file.exists() and cfg_file.exists(), key, str(path), "is not a training run folder (no results.json/config.yaml)")
    results = json.loads(results_file.read_text())
    check(results.get("status") == "completed", key, str(path),
          f"the run did not complete (status {results.get('status')!r}: {results.get('reason', 'no reason recorded')})")
    check((path / "checkpoints" / "last.ckpt").exists(), key, str(path), "has no checkpoints/last.ckpt")
    return path, OmegaConf.load(cfg_file), results


def check_sweep_folder(folder: str | Path) -> tuple[Path, list[Path]]:
    """The resolved sweep folder and its run folders, or a ConfigError saying why it is not one."""
    check(str(folder).strip() != "", "sweep", str(folder), "is empty: give a multirun folder")
    folder = Path(folder).expanduser().resolve()
    check(folder.is_dir(), "sweep", str(folder), "is not a folder")
    check(not (folder / "results.json").exists(), "sweep", str(folder), "is a run folder; use run=<folder>")
    runs = find_runs(folder)
    check(len(runs) > 0, "sweep", str(folder), "holds no run folder (no results.json below it)")
    return folder, runs


CHECKPOINTS = ("best", "last")


def checkpoint_file(path: Path, which: str = "best", key: str = "run") -> Path:
    """The run's checkpoint to evaluate: ``best`` (the epoch with the best validation bound) or ``last``. A missing
    file is a ConfigError: the evaluation never scores another checkpoint than the one asked for."""
    check(which in CHECKPOINTS, "eval_checkpoint", which, f"must be one of {CHECKPOINTS}")
    f = path / "checkpoints" / f"{which}.ckpt"
    other = " (eval_checkpoint=last scores checkpoints/last.ckpt)" if which == "best" else ""
    check(f.exists(), key, str(path), f"has no checkpoints/{which}.ckpt{other}")
    return f


def checkpoint_sha256(path: Path) -> str:
    """The SHA-256 of a checkpoint file: what an evaluation record names as the weights it scored."""
    return sha256_bytes(Path(path).read_bytes())


def read_checkpoint(path: Path, which: str, key: str = "run") -> tuple[dict, dict]:
    """A run's checkpoint (``which``: best or last), loaded safely, and the record an evaluation keeps of it:
    ``{which, file, epoch, sha256}``, ``epoch`` being the epochs trained when its weights were taken."""
    import io

    import torch

    f = checkpoint_file(path, which, key)
    data = f.read_bytes()
    try:
        ckpt = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        state = ckpt["state_dict"]
    except Exception as exc:  # truncated, corrupt or foreign: one line, never a traceback
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
        raise ConfigError(key, str(path), f"checkpoints/{which}.ckpt cannot be loaded ({first}); retrain the run "
                          "or delete the folder") from exc
    best = state.get("best_epoch")
    if which == "best" and best is not None and int(best.reshape(-1)[0]) >= 0:
        epoch = int(best.reshape(-1)[0]) + 1
    else:
        epoch = int(ckpt.get("epoch", -1)) + 1
    record = {"which": which, "file": str(f.relative_to(path)), "epoch": epoch,
              "sha256": sha256_bytes(data)}
    return state, record


def load_run(path: str | Path, key: str = "run", checkpoint: str = "best") -> Run:
    """Rebuild the run's data and module from its resolved config and load its trained weights (``checkpoint``:
    best or last)."""
    from mapa_exp.runs.training import build  # the one place that turns a config into objects

    path, cfg, results = read_run_files(path, key)
    datamodule, module = build(cfg)
    datamodule.setup("evaluate")
    load_member_weights(module, 0, read_checkpoint(path, checkpoint, key)[0], path, key)
    module.eval()
    return Run(path=path, cfg=cfg, results=results, datamodule=datamodule, module=module)


def load_member_weights(module: torch.nn.Module, e: int, state: dict, path: Path, key: str = "run") -> None:
    """Load a run's checkpoint ``state_dict`` (one member) into member e of a (stacked) module."""
    own = module.state_dict()
    try:
        for name, value in state.items():
            target = own[name]
            if target.dim() == 0:
                continue  # no per-member content
            if value.shape[1:] != target.shape[1:] or value.shape[0] != 1:
                raise RuntimeError(f"{name} has shape {tuple(value.shape)}, the run's config gives {tuple(target.shape)}")
            target[e].copy_(value[0])
        missing = own.keys() - state.keys()
        if missing:
            raise KeyError(f"missing {sorted(missing)[0]}")
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(key, str(path), "checkpoint does not match the run's config "
                          f"({str(exc).splitlines()[0]})") from exc
