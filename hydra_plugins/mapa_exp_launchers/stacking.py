# no `from __future__ import annotations` here: Hydra loads plugin modules without registering them, and
# dataclasses then cannot resolve string annotations.
"""``hydra/sweeper=stacking`` (the default of conf/train.yaml): Hydra's basic sweeper, plus ``stack=true``.

Without ``stack=true`` it is Hydra's basic sweeper. With it, the expanded jobs that differ only in ``seed``
and ``dataset.draw`` are launched as stacked jobs (``mapa_exp.sweeps.stacking``), through whichever
launcher is configured. This module only puts the class where Hydra looks for plugins.
"""


import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any, List

from hydra._internal.core_plugins.basic_sweeper import BasicSweeper, BasicSweeperConf
from hydra.core.config_store import ConfigStore
from hydra.core.override_parser.overrides_parser import OverridesParser
from omegaconf import OmegaConf

from mapa_exp.io import FolderBusyError, FolderLock
from mapa_exp.sweeps.stacking import group_jobs

log = logging.getLogger(__name__)


class StackingSweeper(BasicSweeper):
    """Hydra's basic sweeper; with ``stack=true`` in the config, stacked jobs (module doc)."""

    def sweep(self, arguments: List[str]) -> Any:
        assert self.config is not None and self.launcher is not None and self.hydra_context is not None
        lock = FolderLock([self.config.hydra.sweep.dir], "hydra.sweep.dir", "swept")
        try:  # one sweeping process per sweep folder (a second one is refused at once, in one line)
            lock.acquire()
        except FolderBusyError as exc:
            print(f"error: {exc}", file=sys.stderr)
            sys.exit(2)
        try:
            return self._sweep(arguments)
        finally:
            lock.release()

    def _sweep(self, arguments: List[str]) -> Any:
        if not self.config.get("stack", False):
            return super().sweep(arguments)
        parser = OverridesParser.create(config_loader=self.hydra_context.config_loader)
        overrides = parser.parse_overrides([*self._parse_config(), *arguments])
        (jobs,) = self.split_arguments(overrides, None)
        stacks = group_jobs(jobs)
        log.info(f"stack=true: {len(jobs)} jobs in {len(stacks)} stacked jobs "
                 f"(up to {max(len(s.members) for s in stacks)} members each)")
        sweep_dir = Path(self.config.hydra.sweep.dir)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        OmegaConf.save(self.config, sweep_dir / "multirun.yaml")
        member_subdir = OmegaConf.to_container(self.config.hydra.sweep, resolve=False)["subdir"]
        size = self.max_batch_size or len(stacks)
        returns = []
        for start in range(0, len(stacks), size):
            batch = [s.job_overrides(member_subdir) for s in stacks[start:start + size]]
            self.validate_batch_is_legal(batch)
            results = self.launcher.launch(batch, initial_job_idx=start)
            for r in results:
                _ = r.return_value  # raises if the job raised
            returns.append(results)
        return returns


@dataclass
class StackingSweeperConf(BasicSweeperConf):
    _target_: str = "hydra_plugins.mapa_exp_launchers.stacking.StackingSweeper"


ConfigStore.instance().store(group="hydra/sweeper", name="stacking", node=StackingSweeperConf, provider="mapa_exp")
