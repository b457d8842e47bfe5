"""``hydra/launcher=slurm``: submitit's SLURM launcher, plus the requeue of a preempted job into its own folder
(``HandBackPreemption``, logic in ``mapa_exp.sweeps.launchers``).

Every job of the sweep is one task of a SLURM array; with ``stack=true`` a job is a stack (a configuration's
restarts and draws trained as one model, ``mapa_exp.sweeps.stacking``), so one task trains all of them.
This module only puts the class where Hydra looks for launcher plugins (the ``hydra_plugins`` namespace).
"""

from dataclasses import dataclass

from hydra.core.config_store import ConfigStore
from hydra_plugins.hydra_submitit_launcher.config import SlurmQueueConf
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import SlurmLauncher as _SubmititSlurmLauncher

from mapa_exp.sweeps.launchers import HandBackPreemption


class SlurmLauncher(_SubmititSlurmLauncher):
    """submitit's SLURM launcher + requeue after preemption (see module doc)."""

    def setup(self, *, hydra_context, task_function, config) -> None:
        super().setup(hydra_context=hydra_context, task_function=HandBackPreemption.wrap(task_function), config=config)


@dataclass
class MapaSlurmQueueConf(SlurmQueueConf):
    """submitit's SLURM settings; conf/hydra/launcher/slurm.yaml builds on it."""

    _target_: str = "hydra_plugins.mapa_exp_launchers.slurm.SlurmLauncher"


ConfigStore.instance().store(group="hydra/launcher", name="submitit_slurm_mapa", node=MapaSlurmQueueConf,
                             provider="mapa_exp")
