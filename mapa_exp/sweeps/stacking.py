"""Stacked sweeps: the jobs of a sweep that differ only in ``seed`` and ``dataset.draw`` become one job.

``python train.py -m experiment=paper_density stack=true`` expands the sweep as usual, then groups the jobs
whose other overrides are identical -- a configuration's R restarts x D draws -- into one *stacked job* that
trains them as one model in one process (``mapa_exp.runs``). The stacked job carries its members as
``stack_members=[{seed, draw, num}, ...]`` (``num``: the member's job number in the unstacked sweep, so its
run folder is the one it would have had on its own) and runs in ``<sweep dir>/stacks/<k>_<dataset>_<method>``.
It is an ordinary Hydra job: every launcher (basic, joblib, SLURM: one array task per stack) runs it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

STACK_KEYS = {"seed": "seed", "dataset.draw": "draw"}  # override key -> member field
STACK_SUBDIR = "stacks/${mapa_num:${hydra.job.num}}_${dataset.name}_${method.name}"


@dataclass
class StackedJob:
    overrides: list[str]  # the overrides the members share
    members: list[dict] = field(default_factory=list)  # {num, seed?, draw?} per member, in sweep order

    def job_overrides(self, member_subdir: str) -> list[str]:
        """The stacked job's own overrides: the shared ones, the first member's seed and draw (so that the job
        config is a valid run config), the members, the template of their run folders (the sweep's
        ``hydra.sweep.subdir``, unresolved: each member resolves it as its own job would) and the stack's
        folder."""
        first = self.members[0]
        own = [f"{k}={first[v]}" for k, v in STACK_KEYS.items() if v in first]
        listed = ",".join("{" + ",".join(f"{k}:{m[k]}" for k in ("seed", "draw", "num") if k in m) + "}"
                          for m in self.members)
        literal = member_subdir.replace("\\", "\\\\").replace("'", "\\'").replace("${", "\\${")  # kept unresolved
        return [*self.overrides, *own, f"stack_members=[{listed}]", f"stack_subdir='{literal}'",
                f"hydra.sweep.subdir='{STACK_SUBDIR}'"]  # quoted: Hydra's grammar wants nested ${} quoted


def group_jobs(jobs: list[list[str]], first_num: int = 0) -> list[StackedJob]:
    """Group job override lists that differ only in ``seed`` / ``dataset.draw`` (integers), keeping the order
    in which each group first appears; job i of ``jobs`` has number ``first_num + i``."""
    groups: dict[tuple[str, ...], StackedJob] = {}
    for i, overrides in enumerate(jobs):
        shared, member = [], {"num": first_num + i}
        for o in overrides:
            key, _, value = o.partition("=")
            if key in STACK_KEYS and _is_int(value):
                member[STACK_KEYS[key]] = int(value)
            else:
                shared.append(o)
        groups.setdefault(tuple(shared), StackedJob(shared)).members.append(member)
    return list(groups.values())


def _is_int(value: str) -> bool:
    try:
        int(value)
        return True
    except ValueError:
        return False
