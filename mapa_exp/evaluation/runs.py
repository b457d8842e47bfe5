"""Finished training runs as Python objects: config, results, data and the trained module, loaded safely.

A run folder is what ``train.py`` writes (``config.yaml``, ``results.json``, ``checkpoints/last.ckpt``).
``load_run`` refuses, with one line naming the folder, anything that is not a completed run.
Checkpoints are read with ``torch.load(weights_only=True)``: no pickled object is ever executed.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from omegaconf import DictConfig, OmegaConf

from mapa_exp.errors import ConfigError, check


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
    check(results_file.exists() and cfg_file.exists(), key, str(path), "is not a training run folder (no results.json/config.yaml)")
    results = json.loads(results_file.read_text())
    check(results.get("status") == "completed", key, str(path),
          f"the run did not complete (status {results.get('status')!r}: {results.get('reason', 'no reason recorded')})")
    check((path / "checkpoints" / "last.ckpt").exists(), key, str(path), "has no checkpoints/last.ckpt")
    return path, OmegaConf.load(cfg_file), results


def load_run(path: str | Path, key: str = "run") -> Run:
    """Rebuild the run's data and module from its resolved config and load its trained weights."""
    from mapa_exp.runs.training import build  # the one place that turns a config into objects

    path, cfg, results = read_run_files(path, key)
    datamodule, module = build(cfg)
    datamodule.setup("evaluate")
    state = torch.load(path / "checkpoints" / "last.ckpt", map_location="cpu", weights_only=True)
    try:
        module.load_state_dict(state["state_dict"])
    except (RuntimeError, KeyError) as exc:
        raise ConfigError(key, str(path), f"checkpoint does not match the run's config ({str(exc).splitlines()[0]})") from exc
    module.eval()
    return Run(path=path, cfg=cfg, results=results, datamodule=datamodule, module=module)
