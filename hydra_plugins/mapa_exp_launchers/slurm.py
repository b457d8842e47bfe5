"""``hydra/launcher=slurm``: submitit's SLURM launcher, with two additions (logic in ``mapa_exp.launchers``):

* a job that training stopped as preempted is requeued into its own run folder (``HandBackPreemption``);
* ``jobs_per_task: n`` runs n consecutive jobs of the sweep one after the other in one SLURM array task
  (one Python process): in the experiment grids the restarts and draws of a configuration are consecutive,
  so ``n = R x D`` trains them together and pays Python's start-up once instead of n times. Each job is
  still an ordinary Hydra job with its own run folder, config and results, so the numbers are exactly
  those of separate runs; a requeued task skips its completed jobs and resumes the interrupted one.

This module only puts the class where Hydra looks for launcher plugins (the ``hydra_plugins`` namespace).
"""


import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from hydra.core.config_store import ConfigStore
from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.config import BaseQueueConf, SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher
from omegaconf import OmegaConf

from mapa_exp.errors import check
from mapa_exp.launchers import HandBackPreemption, JobGroup

log = logging.getLogger(__name__)


class SlurmLauncher(_SubmititSlurmLauncher):
    """submitit's SLURM launcher + requeue after preemption + ``jobs_per_task`` (see module doc)."""

    def __init__(self, jobs_per_task: int = 1, **params: Any) -> None:
        check(isinstance(jobs_per_task, int) and jobs_per_task >= 1, "hydra.launcher.jobs_per_task", jobs_per_task,
              "must be an integer >= 1")
        super().__init__(**params)
        self.jobs_per_task = jobs_per_task

    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=HandBackPreemption.wrap(task_function), config=config)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        if self.jobs_per_task == 1:
            return super().launch(job_overrides, initial_job_idx)
        import submitit

        assert self.config is not None
        # the executor exactly as submitit's launcher builds it
        init_keys = {"max_num_timeout"}
        executor = submitit.AutoExecutor(
            cluster=self._EXECUTOR, folder=self.params["submitit_folder"],
            **{f"{self._EXECUTOR}_{k}": v for k, v in self.params.items() if k in init_keys},
        )
        base = set(OmegaConf.structured(BaseQueueConf).keys())
        executor.update_parameters(**{k if k in base else f"{self._EXECUTOR}_{k}": v for k, v in self.params.items()
                                      if k not in init_keys | {"submitit_folder"}})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        jobs = []
        for idx, overrides in enumerate(job_overrides, start=initial_job_idx):
            log.info(f"\t#{idx} : {' '.join(filter_overrides(overrides))}")
            jobs.append((list(overrides), "hydra.sweep.dir", idx, f"job_id_for_{idx}", Singleton.get_state()))
        groups = [jobs[i:i + self.jobs_per_task] for i in range(0, len(jobs), self.jobs_per_task)]
        log.info(f"Submitit '{self._EXECUTOR}' sweep output dir : {sweep_dir}; {len(jobs)} jobs in {len(groups)} "
                 f"tasks of up to {self.jobs_per_task}")
        tasks = executor.map_array(JobGroup(self), groups)
        return [ret for task in tasks for ret in task.results()[0]]


@dataclass
class MapaSlurmQueueConf(SlurmQueueConf):
    """submitit's SLURM settings plus ``jobs_per_task``; conf/hydra/launcher/slurm.yaml builds on it."""

    _target_: str = "hydra_plugins.mapa_exp_launchers.slurm.SlurmLauncher"
    jobs_per_task: int = 1


ConfigStore.instance().store(group="hydra/launcher", name="submitit_slurm_mapa", node=MapaSlurmQueueConf,
                             provider="mapa_exp")
