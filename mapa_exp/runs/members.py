"""The members of a training job and their run folders.

A job is one configuration trained for one or more (``seed``, ``dataset.draw``) pairs. A plain run has one
member whose run folder is the job's own folder. A *stacked* job (``python train.py -m ... stack=true``;
``mapa_exp.sweeps.stacking``) carries its members in ``stack_members`` -- a list of ``{seed, draw, num}``
with each member's job number in the unstacked sweep -- and every member gets the run folder it would have
had as its own job (``<sweep dir>/<subdir>`` resolved with its seed, draw and number), with its own
``config.yaml``, ``metrics.csv``, ``results.json`` and later ``eval.json``; the job's own folder (under
``<sweep dir>/stacks/``) holds the stack's checkpoint, ``stack.json`` and the log. The sweeper hands the job the
sweep's own folder template (``stack_subdir``, unresolved) for its members.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path

from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from mapa_exp.errors import check


@dataclass
class Member:
    index: int  # position in the stack
    seed: int
    draw: int
    num: int | None  # the job number it has in the unstacked sweep (None for a plain run)
    cfg: DictConfig  # its own config: seed, dataset.draw and paths.run_dir set, no stack_members

    @property
    def run_dir(self) -> Path:
        return Path(self.cfg.paths.run_dir)


def is_stacked(cfg: DictConfig) -> bool:
    return bool(cfg.get("stack_members"))


def members_of(cfg: DictConfig) -> list[Member]:
    """The job's members, each with its own config and run folder (module doc)."""
    entries = cfg.get("stack_members")
    if not entries:
        return [Member(0, cfg.seed, cfg.dataset.get("draw", 0), None, cfg)]
    full = _job_config()
    out, seen = [], set()
    for i, entry in enumerate(entries):
        seed = entry.get("seed", cfg.seed)
        draw = entry.get("draw", cfg.dataset.get("draw", 0))
        num = entry.get("num")
        check((seed, draw) not in seen, "stack_members", OmegaConf.to_container(entries),
              f"names seed={seed} draw={draw} twice")
        seen.add((seed, draw))
        run_dir = _member_run_dir(full, cfg.get("stack_subdir"), seed, draw, num)
        mcfg = copy.deepcopy(cfg)
        with read_write(mcfg), open_dict(mcfg):
            mcfg.seed, mcfg.dataset.draw, mcfg.paths.run_dir = seed, draw, str(run_dir)
            mcfg.stack_members = mcfg.stack_subdir = None
        out.append(Member(i, seed, draw, num, mcfg))
    return out


def _job_config() -> DictConfig:
    """The job's full config, Hydra's node included (the parent of ``HydraConfig.get()``)."""
    from hydra.core.hydra_config import HydraConfig

    return HydraConfig.get()._get_parent()  # noqa: SLF001 -- Hydra keeps the full config only there


def _member_run_dir(full: DictConfig, subdir: str | None, seed: int, draw: int, num: int | None) -> Path:
    """``<sweep dir>/<subdir>`` resolved as the member's own job would resolve it (``subdir``: the sweep's
    unresolved ``hydra.sweep.subdir``, which the stacked job's own folder replaced)."""
    m = copy.deepcopy(full)
    OmegaConf.copy_cache(from_config=full, to_config=m)  # e.g. ${now:...} in the sweep folder stays the same
    with read_write(m), open_dict(m), read_write(m.hydra), open_dict(m.hydra):
        m.seed, m.dataset.draw = seed, draw
        if num is not None:
            m.hydra.job.num = num
        if subdir is not None:
            m.hydra.sweep.subdir = subdir
    return Path(str(m.hydra.sweep.dir)) / str(m.hydra.sweep.subdir)
