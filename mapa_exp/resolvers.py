"""OmegaConf resolvers the configs use; registered when ``mapa_exp`` is imported (before any compose).

* ``${mapa_k:S,fraction,default}`` -- MAPA's top-K size from the tail size (method.md §9):
  ``K = max(1, ceil(fraction * S))``, or ``default`` when ``fraction`` is null. ``fraction = 0`` gives K = 1.
* ``${mapa_concat:a,b,...}`` -- the lists (or single values) concatenated, e.g. W&B tags.
* ``${mapa_num:n}`` -- a job number zero-padded to 4 digits, so a sweep's folders sort in job order.
* ``${mapa_cwd:}`` -- the folder the command was started in: Hydra's ``runtime.cwd`` in a job, the process's
  working folder before Hydra has set its config (a multirun's sweeper resolves the sweep folder then,
  where ``${hydra:runtime.cwd}`` fails with "HydraConfig was not set").
* ``${mapa_run_id:run_dir}`` -- a W&B run id derived from the run folder: a requeued or re-run job (same
  folder) continues its own W&B run, and no two folders share one.
* ``${mapa_options:group,skip}`` -- the options of a config group (its ``conf/<group>/*.yaml``), comma
  separated, without those ending in ``skip``: ``train.py --help`` lists what is there.
* ``${mapa_sweep_group:mode,sweep_dir,output_dir}`` -- a multirun's W&B group: the sweep folder relative
  to the output folder (``multiruns/<date>/<time>``); null for a single run.
"""

from __future__ import annotations

import hashlib
import math
import os

from omegaconf import OmegaConf

from mapa_exp.errors import check


def mapa_k(S, fraction, default=None) -> int:
    """K = max(1, ceil(fraction * S)) (method.md §9), or ``default`` when ``fraction`` is None."""
    if fraction is None:
        return default
    check(isinstance(fraction, (int, float)) and 0 <= fraction <= 1, "method.K_fraction", fraction,
          "must be a number in [0, 1] (or null for a fixed K)")
    check(isinstance(S, int) and S >= 1, "method.S", S, "must be an integer >= 1 when K is a fraction of it")
    # round first so that e.g. 0.1 * 30 = 3.0000000000000004 gives 3, not 4
    return max(1, math.ceil(round(fraction * S, 9)))


def mapa_num(n) -> str:
    """The job number ``n`` as 4 digits (more when it needs them): 0007, 0123, 4374."""
    return f"{int(n):04d}"


def mapa_cwd() -> str:
    """Hydra's runtime.cwd when its config is set, else the current working folder."""
    from hydra.core.hydra_config import HydraConfig

    if HydraConfig.initialized():
        cwd = HydraConfig.get().runtime.get("cwd")
        if cwd:
            return str(cwd)
    return os.getcwd()


def mapa_concat(*parts) -> list:
    """The concatenation of lists; a non-list part counts as a one-element list."""
    out: list = []
    for p in parts:
        if OmegaConf.is_list(p) or isinstance(p, (list, tuple)):
            out.extend(p)
        elif p is not None:
            out.append(p)
    return out


def mapa_sweep_group(mode, sweep_dir, output_dir=None) -> str | None:
    """W&B group of a multirun job: its sweep folder (relative to ``output_dir`` when below it); None otherwise."""
    if not str(mode).endswith("MULTIRUN") or not sweep_dir:
        return None
    group = str(sweep_dir)
    if output_dir:
        try:
            group = os.path.relpath(os.path.abspath(group), os.path.abspath(str(output_dir)))
        except ValueError:  # other drive (Windows)
            pass
        if group.startswith(".."):
            group = str(sweep_dir)
    return group[-128:]  # W&B's limit on group names


def mapa_run_id(run_dir) -> str:
    """16 hex digits of the SHA-256 of the run folder's absolute path."""
    return hashlib.sha256(os.path.abspath(str(run_dir)).encode()).hexdigest()[:16]


def mapa_options(group, skip=None) -> str:
    """The options of config group ``group`` (``conf/<group>/*.yaml`` stems, sorted), except names ending in
    ``skip``."""
    from pathlib import Path

    folder = Path(__file__).resolve().parents[1] / "conf" / str(group)
    names = sorted(p.stem for p in folder.glob("*.yaml") if not (skip and p.stem.endswith(str(skip))))
    return ", ".join(names)


def register() -> None:
    """Register every resolver (idempotent)."""
    for name, fn in (("mapa_k", mapa_k), ("mapa_num", mapa_num), ("mapa_concat", mapa_concat), ("mapa_cwd", mapa_cwd),
                     ("mapa_run_id", mapa_run_id), ("mapa_sweep_group", mapa_sweep_group),
                     ("mapa_options", mapa_options)):
        if not OmegaConf.has_resolver(name):
            OmegaConf.register_new_resolver(name, fn)


register()
