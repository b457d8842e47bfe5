"""Observed data sets -- data without a ground-truth decoder -- from user files or arrays, validated.

``ObservedDataset`` has the interface the datamodule, the methods and training read from a
``GroundTruth``: ``name``, ``likelihood``, ``latent_dim``, ``obs_dim``, ``draw``, ``splits()`` ->
{"train", "val", "test"} of ``Split(z, x)``, ``surrogate_mse`` (None) -- and ``has_ground_truth =
False``: there is no decoder, so MAPA-GT and the test KL against a truth are not available.

``FileDataset`` loads a user file. Layout (arrays are (points, features), any real or bool dtype,
stored without pickling):

* ``.npz`` with ``x_train`` (required), ``x_val`` and ``x_test`` (optional), and optional codes
  ``z_train`` / ``z_val`` / ``z_test`` (kept with the data, e.g. for plots; given for every x split
  or for none). A split that is missing is carved from ``x_train``: ``val_fraction`` and
  ``test_fraction`` of its rows, chosen by a permutation seeded by ``draw``.
* ``.npy``: one array, the whole data set, split the same way.

Every problem is one line naming the file and the array: a missing file, an unreadable one, an
unknown array name, a non-numeric dtype, not 2-D, empty, NaN or inf, a column count that differs
between splits, codes whose rows do not match, and values other than 0 and 1 under a Bernoulli
likelihood (``binarize: <threshold>`` maps x to x > threshold first).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mapa_exp.data.groundtruth import SPLITS, Split
from mapa_exp.errors import ConfigError, check
from mapa_exp.math.likelihoods import Bernoulli

ARRAY_KEYS = tuple(f"{v}_{s}" for v in ("x", "z") for s in SPLITS)


class ObservedDataset:
    """Fixed train / val / test arrays under a likelihood; ``x`` and optional ``z`` map split -> array.

    ``key`` and ``value`` name the source in error messages (e.g. ``dataset.path`` and the file).
    """

    has_ground_truth = False
    surrogate_mse = None

    def __init__(self, name: str, likelihood, x: dict, z: dict | None = None, latent_dim: int = 2, draw: int = 0,
                 key: str = "dataset", value="arrays"):
        check(isinstance(latent_dim, int) and latent_dim >= 1, "dataset.latent_dim", latent_dim, "must be an integer >= 1")
        check(isinstance(draw, int) and draw >= 0, "dataset.draw", draw, "must be an integer >= 0")
        check(set(x) == set(SPLITS), key, value, f"needs the splits {SPLITS}, got {tuple(x)}")
        arrays = {f"x_{s}": a for s, a in x.items()} | {f"z_{s}": a for s, a in (z or {}).items()}
        arrays = validate_arrays(arrays, likelihood, key, value)
        z_dim = arrays["z_train"].shape[1] if "z_train" in arrays else None
        check(z_dim in (None, latent_dim), "dataset.latent_dim", latent_dim, f"differs from the codes' {z_dim} columns")
        self.name, self.likelihood, self.latent_dim, self.draw = name, likelihood, latent_dim, draw
        self.obs_dim = int(arrays["x_train"].shape[1])
        self._splits = {
            s: Split(z=torch.from_numpy(arrays[f"z_{s}"]) if f"z_{s}" in arrays else None,
                     x=torch.from_numpy(arrays[f"x_{s}"]))
            for s in SPLITS
        }

    def splits(self) -> dict[str, Split]:
        return self._splits

    @property
    def decoder(self):
        raise ConfigError("dataset", self.name, "is observed data without a ground-truth decoder")

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={v.x.shape[0]}" for s, v in self._splits.items())
        return f"{type(self).__name__}({self.name!r}, obs_dim={self.obs_dim}, {sizes}, {self.likelihood})"


class FileDataset(ObservedDataset):
    """A user's ``.npz`` / ``.npy`` file in the layout of the module doc."""

    def __init__(self, path: str | None, likelihood, name: str = "file", latent_dim: int = 2, draw: int = 0,
                 val_fraction: float = 0.1, test_fraction: float = 0.1, binarize: float | None = None):
        value = str(path)
        arrays = validate_arrays(load_arrays(path), None, "dataset.path", value)
        if binarize is not None:
            check(isinstance(binarize, (int, float)), "dataset.binarize", binarize, "must be a number or null")
            arrays = {k: (a > binarize).astype(np.float32) if k.startswith("x_") else a for k, a in arrays.items()}
        missing = [s for s in ("val", "test") if f"x_{s}" not in arrays]
        if missing:
            fractions = {"val": val_fraction, "test": test_fraction}
            arrays = carve_splits(arrays, {s: fractions[s] for s in missing}, draw, "dataset.path", value)
        x = {s: arrays.pop(f"x_{s}") for s in SPLITS}
        z = {s: arrays.pop(f"z_{s}") for s in SPLITS if f"z_{s}" in arrays}
        super().__init__(name, likelihood, x, z, latent_dim, draw, key="dataset.path", value=value)


def load_arrays(path) -> dict[str, np.ndarray]:
    """The named arrays of a ``.npz`` file, or ``{"x_train": a}`` for a ``.npy`` file; one-line errors."""
    check(path is not None and str(path) != "", "dataset.path", path,
          "set it to a .npz or .npy file (layout: README, 'Data files')")
    p = Path(str(path)).expanduser()
    check(p.suffix in (".npz", ".npy"), "dataset.path", str(path), "must be a .npz or .npy file")
    check(p.is_file(), "dataset.path", str(path), "no such file")
    try:
        if p.suffix == ".npy":
            return {"x_train": np.load(p, allow_pickle=False)}
        with np.load(p, allow_pickle=False) as f:
            names = list(f.files)
            for k in names:
                check(k in ARRAY_KEYS, "dataset.path", str(path), f"holds an unexpected array {k!r} (allowed: {', '.join(ARRAY_KEYS)})")
            check("x_train" in names, "dataset.path", str(path), f"has no array 'x_train' (found: {', '.join(names) or 'none'})")
            return {k: f[k] for k in names}
    except ConfigError:
        raise
    except Exception as exc:  # not a numpy file, truncated, pickled objects, ...
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ConfigError("dataset.path", str(path), f"cannot be read as a numpy {p.suffix} file ({reason})") from None


def validate_arrays(arrays: dict[str, np.ndarray], likelihood, key: str, value) -> dict[str, np.ndarray]:
    """Checked float32 copies of x_* (and z_*) arrays; raises ConfigError(key, value, <what is wrong>).

    The binary check runs when ``likelihood`` is a Bernoulli (None skips it).
    """
    out = {}
    for k, a in arrays.items():
        a = np.asarray(a)
        numeric = a.dtype == bool or (np.issubdtype(a.dtype, np.number) and not np.issubdtype(a.dtype, np.complexfloating))
        check(numeric, key, value, f"{k} has dtype {a.dtype}; expected real numbers")
        check(a.ndim == 2, key, value, f"{k} has shape {a.shape}; expected 2-D (points, features), e.g. a.reshape(len(a), -1)")
        check(a.size > 0, key, value, f"{k} has shape {a.shape}: it is empty")
        with np.errstate(over="ignore"):
            a = a.astype(np.float32)
        bad = ~np.isfinite(a)
        if bad.any():
            i, j = np.argwhere(bad)[0]
            raise ConfigError(key, value, f"{k} has {int(bad.sum())} non-finite values (NaN or inf, or beyond float32), "
                                          f"the first at row {i}, column {j}")
        out[k] = a
    for v in ("x", "z"):
        first = next((k for k in (f"{v}_{s}" for s in SPLITS) if k in out), None)
        for k in (f"{v}_{s}" for s in SPLITS):
            if k in out and first is not None:
                check(out[k].shape[1] == out[first].shape[1], key, value,
                      f"{k} has {out[k].shape[1]} columns but {first} has {out[first].shape[1]}")
    has_z = [s for s in SPLITS if f"z_{s}" in out]
    if has_z:
        for s in SPLITS:
            if f"x_{s}" in out:
                check(f"z_{s}" in out, key, value, f"z_{s} is missing while z_{has_z[0]} is given (give codes for every split or none)")
                check(len(out[f"z_{s}"]) == len(out[f"x_{s}"]), key, value,
                      f"z_{s} has {len(out[f'z_{s}'])} rows but x_{s} has {len(out[f'x_{s}'])}")
    if isinstance(likelihood, Bernoulli):
        for k, a in out.items():
            nonbinary = (a != 0) & (a != 1)
            if k.startswith("x_") and nonbinary.any():
                i, j = np.argwhere(nonbinary)[0]
                raise ConfigError(key, value, f"{k} has values other than 0 and 1 (e.g. {a[i, j]:g} at row {i}, column {j}) "
                                              "but the likelihood is Bernoulli; set dataset.binarize=<threshold> or use a Gaussian")
    return out


def carve_splits(arrays: dict[str, np.ndarray], fractions: dict[str, float], draw: int, key: str, value) -> dict:
    """Move ``fractions[split]`` of the training rows (x_train and z_train alike) into new splits.

    The rows are chosen by a permutation seeded by ``draw``; the rest stay in training, in file order.
    """
    check(isinstance(draw, int) and draw >= 0, "dataset.draw", draw, "must be an integer >= 0")
    n = len(arrays["x_train"])
    counts = {}
    for s, f in fractions.items():
        check(isinstance(f, (int, float)) and 0 < f < 1, f"dataset.{s}_fraction", f,
              f"must lie in (0, 1): the file has no x_{s} to use instead")
        counts[s] = max(1, int(round(f * n)))
    check(sum(counts.values()) < n, key, value,
          f"x_train has {n} rows, too few to carve {', '.join(f'{c} {s}' for s, c in counts.items())} rows from")
    perm = np.random.default_rng([int(draw), 20240601]).permutation(n)
    out, start = dict(arrays), 0
    for s, c in counts.items():
        rows = np.sort(perm[start : start + c])
        start += c
        out[f"x_{s}"] = arrays["x_train"][rows]
        if "z_train" in arrays:
            out[f"z_{s}"] = arrays["z_train"][rows]
    rest = np.sort(perm[start:])
    out["x_train"] = arrays["x_train"][rest]
    if "z_train" in arrays:
        out["z_train"] = arrays["z_train"][rest]
    return out
