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
    folder = Path(folder).expanduser().resolve()
    check(folder.is_dir(), "sweep", str(folder), "is not a folder")
    check(not (folder / "results.json").exists(), "sweep", str(folder), "is a run folder; use run=<folder>")
    runs = find_runs(folder)
    check(len(runs) > 0, "sweep", str(folder), "holds no run folder (no results.json below it)")
    return folder, runs


CHECKPOINTS = ("best", "last")


def checkpoint_file(path: Path, which: str = "best", key: str = "run") -> Path:
    """The run's checkpoint to evaluate: ``best`` (the epoch with the best validation bound) or ``last``; a run
    written before best checkpoints existed has only ``last``, which is then used (and said)."""
    check(which in CHECKPOINTS, "eval_checkpoint", which, f"must be one of {CHECKPOINTS}")
    f = path / "checkpoints" / f"{which}.ckpt"
    if not f.exists() and which == "best":
        log.warning("%s has no checkpoints/best.ckpt: evaluating checkpoints/last.ckpt", path)
        return path / "checkpoints" / "last.ckpt"
    return f


def load_run(path: str | Path, key: str = "run", checkpoint: str = "best") -> Run:
    """Rebuild the run's data and module from its resolved config and load its trained weights (``checkpoint``:
    best or last)."""
    from mapa_exp.runs.training import build  # the one place that turns a config into objects

    path, cfg, results = read_run_files(path, key)
    datamodule, module = build(cfg)
    datamodule.setup("evaluate")
    load_member_weights(module, 0, checkpoint_file(path, checkpoint, key), key)
    module.eval()
    return Run(path=path, cfg=cfg, results=results, datamodule=datamodule, module=module)


def load_member_weights(module: torch.nn.Module, e: int, ckpt_path: Path, key: str = "run") -> None:
    """Load a run's checkpoint (one member) into member e of a (stacked) module, with ``weights_only=True``."""
    import torch

    state = torch.load(ckpt_path, map_location="cpu", weights_only=True)["state_dict"]
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
        raise ConfigError(key, str(ckpt_path.parent.parent), "checkpoint does not match the run's config "
                          f"({str(exc).splitlines()[0]})") from exc
