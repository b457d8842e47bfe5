"""Checkpoints of a stack: which members (configurations) wrote them, safe loading, and member slices.

A stack's checkpoint is a Lightning checkpoint whose per-member tensors carry the member dimension first:
the networks' (E, P) parameters, the per-member counters, the optimiser's per-parameter state and the
datamodule's per-member generators. ``RunIdentity`` writes each member's identity (what makes two runs the
same run: data, method, net, optimiser, seed) into it; ``check_resumable`` refuses to resume a checkpoint
written for other members. ``slice_checkpoint`` keeps some members -- a finished member's own
``checkpoints/last.ckpt``, or a resumed stack without its completed members -- and the slice is itself a
complete checkpoint: a member resumes from it alone exactly as it would in the stack.

Checkpoints hold only tensors, numbers, strings and containers of them, so they load with
``torch.load(..., weights_only=True)``; ``load_checkpoint_safely`` is the one place that loads them.
"""

from __future__ import annotations

import io
import json
import pickle
import re
from pathlib import Path

import torch
from lightning.pytorch.callbacks import Callback

from mapa_exp.errors import ConfigError
from mapa_exp.io import atomic_write_bytes

IDENTITY_KEY = "run_identity"
DATAMODULE_KEY = "GroundTruthDataModule"  # where Lightning keeps the datamodule's state (its class name)


class RunIdentity(Callback):
    """Stores the members' identities (a list of flat ``{config key: value}``, JSON) in every checkpoint."""

    def __init__(self, identities: list[dict]):
        self.identities = identities

    def on_save_checkpoint(self, trainer, pl_module, checkpoint: dict) -> None:
        checkpoint[IDENTITY_KEY] = dumps_identities(self.identities)


def dumps_identities(identities: list[dict]) -> str:
    return json.dumps(identities, sort_keys=True, default=str)


def checkpoint_identities(ckpt: dict) -> list[dict]:
    """The member identities a checkpoint was written for (a lone run's older single identity as a list)."""
    saved = json.loads(ckpt[IDENTITY_KEY])
    return saved if isinstance(saved, list) else [saved]


class _Absent:
    def __repr__(self) -> str:
        return "(absent)"


_ABSENT = _Absent()


def load_checkpoint_safely(path: str | Path) -> dict:
    """The checkpoint at ``path`` loaded with ``weights_only=True``; ConfigError if that is impossible."""
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise ConfigError("checkpoint", str(path), f"cannot be loaded safely ({_load_failure(exc)}); "
                          "delete it to start this run over") from exc
    if not isinstance(ckpt, dict) or "state_dict" not in ckpt:
        raise ConfigError("checkpoint", str(path), "is not a Lightning checkpoint; delete it to start this run over")
    return ckpt


def _load_failure(exc: Exception) -> str:
    """A short reason from torch.load's (long, multi-line) error message."""
    msg = str(exc)
    found = re.search(r"Unsupported global: GLOBAL ([\w.]+)", msg)
    if found:
        return f"it holds a pickled {found.group(1)} object, refused by weights_only loading"
    if isinstance(exc, pickle.UnpicklingError):
        return "not a torch checkpoint: unpickling failed"
    first = (msg.strip().splitlines() or [type(exc).__name__])[0].split(". ")[0]
    return first[:150]


def _canonical(identity: dict) -> str:
    return json.dumps(json.loads(json.dumps(identity, sort_keys=True, default=str)), sort_keys=True)


def check_resumable(path: str | Path, identities: list[dict]) -> tuple[dict, list[int]]:
    """Load the checkpoint at ``path`` safely and find each of ``identities`` among the members it was written
    for. Returns the checkpoint and, per identity, its member index there; raises ConfigError naming the
    first differing config keys when a member is not in it."""
    ckpt = load_checkpoint_safely(path)
    if IDENTITY_KEY not in ckpt:
        raise ConfigError("checkpoint", str(path), "records no run configuration (not written by mapa-exp); "
                          "use another run folder or delete it")
    saved = checkpoint_identities(ckpt)
    index = {_canonical(s): i for i, s in enumerate(saved)}
    found = []
    for identity in identities:
        i = index.get(_canonical(identity))
        if i is None:
            raise ConfigError("checkpoint", str(path), f"was written by a different configuration "
                              f"({_difference(saved, identity)}); use another run folder or delete it")
        found.append(i)
    return ckpt, found


def _difference(saved: list[dict], current: dict) -> str:
    """The keys in which ``current`` differs from the nearest saved identity, as 'key: there, here'."""
    current = json.loads(json.dumps(current, sort_keys=True, default=str))

    def diff(s: dict) -> list[str]:
        return sorted((k for k in s.keys() | current.keys() if s.get(k, _ABSENT) != current.get(k, _ABSENT)),
                      key=lambda k: (not k.endswith("name"), k))  # names first: "method.name: 'vae' there, ..."

    nearest = min(saved, key=lambda s: len(diff(s)))
    keys = diff(nearest)
    shown = "; ".join(f"{k}: {nearest.get(k, _ABSENT)!r} there, {current.get(k, _ABSENT)!r} here" for k in keys[:3])
    return shown + (f" (+{len(keys) - 3} more)" if len(keys) > 3 else "")


def slice_checkpoint(ckpt: dict, members: list[int]) -> dict:
    """The checkpoint of the stack's ``members`` only (in that order): every tensor whose first dimension is the
    stack's size is indexed, everything else kept. A complete checkpoint a smaller stack resumes from."""
    E = len(checkpoint_identities(ckpt))
    index = torch.as_tensor(members, dtype=torch.long)

    def pick(v):
        if torch.is_tensor(v) and v.dim() > 0 and v.shape[0] == E:
            return v.index_select(0, index).clone()
        if isinstance(v, dict):
            return {k: pick(x) for k, x in v.items()}
        return v

    out = dict(ckpt)
    out["state_dict"] = pick(ckpt["state_dict"])
    out["optimizer_states"] = [{**opt, "state": pick(opt["state"])} for opt in ckpt.get("optimizer_states", [])]
    if DATAMODULE_KEY in ckpt:
        gens = ckpt[DATAMODULE_KEY]["data_generators"]
        out[DATAMODULE_KEY] = {**ckpt[DATAMODULE_KEY], "data_generators": [gens[i] for i in members]}
    out[IDENTITY_KEY] = dumps_identities([checkpoint_identities(ckpt)[i] for i in members])
    return out


def best_checkpoint(ckpt: dict) -> dict:
    """A one-member checkpoint's weights at the member's best validation bound (``best_<net>`` buffers), for
    evaluation: no optimiser state or loop progress (it is not a point to resume from). Unchanged weights when
    no validation ran."""
    state = dict(ckpt["state_dict"])
    validated = "best_epoch" in state and int(state["best_epoch"].reshape(-1)[0]) >= 0
    if validated:
        for key in [k for k in state if k.startswith("best_") and k not in ("best_epoch", "best_val_bound")]:
            state[f"{key[len('best_'):]}.params"] = state[key].clone()
    out = {k: v for k, v in ckpt.items() if k not in ("optimizer_states", "loops", "lr_schedulers")}
    out["state_dict"] = state
    out["selected"] = "best validation bound" if validated else "last epoch (no validation ran)"
    return out


def save_checkpoint(ckpt: dict, path: str | Path) -> None:
    """Write a checkpoint atomically (a temporary name, then renamed)."""
    buf = io.BytesIO()
    torch.save(ckpt, buf)
    atomic_write_bytes(path, buf.getvalue())
