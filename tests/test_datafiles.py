"""Observed data: the ``.npz`` / ``.npy`` loader and its validation, the binarized digits, and training on both.

Every malformed file is refused with one line that names the file, the array and what is wrong;
MAPA-GT on data without a ground truth is refused in one line before any work.
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mapa_exp.data.datamodule as dm
from mapa_exp.data.digits import Digits, binarized_digits
from mapa_exp.data.files import FileDataset
from mapa_exp.errors import ConfigError
from mapa_exp.math.likelihoods import Bernoulli, Gaussian
from mapa_exp.runs.training import run_training
from tests.conftest import FAST, ROOT, compose_cfg

TRAINER_FAST = [o for o in FAST if o.startswith("trainer.")]


def write(tmp_path, name="data.npz", **arrays):
    path = tmp_path / name
    if name.endswith(".npy"):
        np.save(path, arrays["x"])
    else:
        np.savez(path, **arrays)
    return path


def good(n=50, d=3, seed=0):
    return np.random.default_rng(seed).standard_normal((n, d)).astype(np.float32)


# -- the loader ------------------------------------------------------------------------------
def test_full_layout_is_used_as_given(tmp_path):
    x, z = good(60), good(60, 2, seed=1)
    path = write(tmp_path, x_train=x[:40], x_val=x[40:50], x_test=x[50:], z_train=z[:40], z_val=z[40:50], z_test=z[50:])
    ds = FileDataset(str(path), Gaussian(0.1), latent_dim=2)
    s = ds.splits()
    assert (ds.obs_dim, ds.latent_dim, ds.has_ground_truth, ds.surrogate_mse) == (3, 2, False, None)
    assert torch.equal(s["train"].x, torch.from_numpy(x[:40])) and torch.equal(s["test"].z, torch.from_numpy(z[50:]))
    assert s["val"].x.dtype == torch.float32


def test_missing_splits_are_carved_by_draw(tmp_path):
    x = good(100)
    z = np.arange(100, dtype=np.float32)[:, None]  # the codes name the rows
    path = write(tmp_path, x_train=x, z_train=z)
    splits = [FileDataset(str(path), Gaussian(0.1), latent_dim=1, draw=d, val_fraction=0.2).splits() for d in (0, 0, 1)]
    sizes = {k: v.x.shape[0] for k, v in splits[0].items()}
    assert sizes == {"train": 70, "val": 20, "test": 10}
    rows = torch.cat([splits[0][k].z[:, 0] for k in ("train", "val", "test")]).long()
    assert sorted(rows.tolist()) == list(range(100))  # a partition of the file's rows
    for k in ("train", "val", "test"):  # x and z stay paired
        assert torch.equal(splits[0][k].x, torch.from_numpy(x)[splits[0][k].z[:, 0].long()])
    assert torch.equal(splits[0]["val"].x, splits[1]["val"].x)  # same draw, same split
    assert not torch.equal(splits[0]["val"].x, splits[2]["val"].x)


def test_npy_and_binarize(tmp_path):
    x = np.random.default_rng(0).random((40, 5))
    path = write(tmp_path, "data.npy", x=x)
    ds = FileDataset(str(path), Bernoulli(0.9), binarize=0.5)
    xs = torch.cat([v.x for v in ds.splits().values()])
    assert set(xs.unique().tolist()) == {0.0, 1.0} and xs.shape == (40, 5)
    assert xs.sum() == (x > 0.5).sum()


def bad_file_cases():
    x = good()
    nan, inf = x.copy(), x.copy()
    nan[3, 1], inf[7, 2] = np.nan, np.inf
    return [
        ("missing file", None, "no such file"),
        ("wrong suffix", dict(name="data.csv"), "must be a .npz or .npy file"),
        ("no x_train", dict(x_val=x), "has no array 'x_train' (found: x_val)"),
        ("unknown array", dict(x_train=x, x_tset=x), "unexpected array 'x_tset'"),
        ("NaN", dict(x_train=nan), "x_train has 1 non-finite values (NaN or inf, or beyond float32), the first at row 3, column 1"),
        ("inf", dict(x_train=x, x_val=inf), "x_val has 1 non-finite values"),
        ("overflow", dict(x_train=x * 1e300), "non-finite"),
        ("1-D", dict(x_train=x[:, 0]), "x_train has shape (50,); expected 2-D"),
        ("3-D", dict(x_train=x.reshape(50, 3, 1)), "x_train has shape (50, 3, 1); expected 2-D"),
        ("empty", dict(x_train=x[:0]), "x_train has shape (0, 3): it is empty"),
        ("no columns", dict(x_train=x[:, :0]), "it is empty"),
        ("strings", dict(x_train=np.array([["a", "b"]] * 5)), "x_train has dtype <U1; expected real numbers"),
        ("columns", dict(x_train=x, x_val=x[:, :2]), "x_val has 2 columns but x_train has 3"),
        ("z rows", dict(x_train=x, z_train=x[:10, :2]), "z_train has 10 rows but x_train has 50"),
        ("z partial", dict(x_train=x, x_val=x, z_train=x[:, :2]), "z_val is missing while z_train is given"),
        ("too few rows", dict(x_train=x[:2]), "x_train has 2 rows, too few to carve"),
    ]


@pytest.mark.parametrize("case, arrays, message", bad_file_cases(), ids=[c[0] for c in bad_file_cases()])
def test_bad_files_are_refused_in_one_line(tmp_path, case, arrays, message):
    if arrays is None:
        path = tmp_path / "absent.npz"
    else:
        arrays = dict(arrays)
        name = arrays.pop("name", "data.npz")
        path = tmp_path / name
        if name.endswith(".npz"):
            np.savez(path, **arrays)
        else:
            path.write_text("1,2\n")
    with pytest.raises(ConfigError) as err:
        FileDataset(str(path), Gaussian(0.1), latent_dim=2)
    msg = str(err.value)
    assert err.value.key == "dataset.path" and msg.startswith(f"dataset.path={str(path)!r}: ")
    assert message in msg and "\n" not in msg


def test_unreadable_and_pickled_files_are_refused(tmp_path):
    junk = tmp_path / "junk.npz"
    junk.write_bytes(b"not a zip file at all")
    with pytest.raises(ConfigError, match=r"cannot be read as a numpy \.npz file"):
        FileDataset(str(junk), Gaussian(0.1))
    pickled = tmp_path / "objects.npy"
    np.save(pickled, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(ConfigError, match=r"cannot be read as a numpy \.npy file \(.*allow_pickle"):
        FileDataset(str(pickled), Gaussian(0.1))
    with pytest.raises(ConfigError, match=r"^dataset.path=None: set it to a .npz or .npy file"):
        FileDataset(None, Gaussian(0.1))


def test_bernoulli_refuses_non_binary_values(tmp_path):
    x = (np.random.default_rng(0).random((50, 4)) < 0.5).astype(np.float32)
    x_val = x.copy()
    x_val[4, 2] = 0.5
    path = write(tmp_path, x_train=x, x_val=x_val)
    with pytest.raises(ConfigError) as err:
        FileDataset(str(path), Bernoulli(0.95))
    assert "x_val has values other than 0 and 1 (e.g. 0.5 at row 4, column 2) but the likelihood is Bernoulli" in str(err.value)
    FileDataset(str(write(tmp_path, "ok.npz", x_train=x, x_val=x.astype(bool))), Bernoulli(0.95))  # bool is binary


def test_latent_dim_must_match_the_codes(tmp_path):
    path = write(tmp_path, x_train=good(), z_train=good(50, 3))
    with pytest.raises(ConfigError, match=r"^dataset.latent_dim=2: differs from the codes' 3 columns"):
        FileDataset(str(path), Gaussian(0.1), latent_dim=2)


# -- digits ---------------------------------------------------------------------------------
def test_digits_are_binary_64d_and_split_by_draw():
    a, b, c = Digits(draw=0), Digits(draw=0), Digits(draw=1)
    s = a.splits()
    assert {k: tuple(v.x.shape) for k, v in s.items()} == {"train": (1197, 64), "val": (300, 64), "test": (300, 64)}
    assert (a.obs_dim, a.latent_dim, a.name, a.likelihood.metric) == (64, 2, "digits", "hamming")
    everything = torch.cat([v.x for v in s.values()])
    assert set(everything.unique().tolist()) == {0.0, 1.0}
    assert sorted(map(tuple, everything.int().tolist())) == sorted(map(tuple, binarized_digits().astype(int).tolist()))
    assert torch.equal(s["val"].x, b.splits()["val"].x) and not torch.equal(s["val"].x, c.splits()["val"].x)
    assert 0.3 < everything.mean() < 0.6  # thresholding at half the intensity range keeps real strokes
    with pytest.raises(ConfigError, match=r"^dataset\.n_test=1700: leaves no training images"):
        Digits(n_test=1700)


# -- training -------------------------------------------------------------------------------
def test_digits_trains_with_mapa(tmp_path, cache_dir):
    cfg = compose_cfg(["dataset=digits", "method=mapa", *TRAINER_FAST], tmp_path / "run", cache_dir)
    res = run_training(cfg)
    assert res["status"] == "completed" and res["dataset"] == "digits"
    # a Bernoulli log-likelihood is <= 0; an untrained 64-D model sits far below, but finite
    for key in ("train_bound", "val_bound"):
        assert -64 * math.log(2) * 3 < res[key] < 0
    assert 1 <= res["passes_per_point_decoder"] <= cfg.method.K + cfg.method.S


def test_user_file_trains(tmp_path, cache_dir):
    t = np.random.default_rng(0).uniform(0, 2 * np.pi, 300)
    x = np.stack([np.cos(t), np.sin(t)], 1) + 0.1 * np.random.default_rng(1).standard_normal((300, 2))
    path = write(tmp_path, x_train=x)
    for method in ("mapa", "iwae"):
        cfg = compose_cfg(["dataset=file", f"dataset.path={path}", f"method={method}", *TRAINER_FAST],
                          tmp_path / method, cache_dir)
        res = run_training(cfg)
        assert res["status"] == "completed" and math.isfinite(res["val_bound"])


def test_mapa_gt_without_ground_truth_fails_before_any_work(tmp_path, cache_dir, monkeypatch):
    def must_not_run(*a, **k):
        raise AssertionError("proximity structure computed before the data check")

    monkeypatch.setattr(dm, "nearest_neighbors", must_not_run)
    cfg = compose_cfg(["dataset=digits", "method=mapa_gt", *TRAINER_FAST], tmp_path / "run", cache_dir)
    with pytest.raises(ConfigError, match=r"^method='mapa_gt': needs ground-truth codes and a decoder, and dataset 'digits' has none"):
        run_training(cfg)


@pytest.mark.slow  # the check itself is tested in-process just above; this is its line through train.py (~8 s)
def test_mapa_gt_on_digits_from_the_cli_is_one_line(tmp_path):
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "outputs"), "MAPA_EXP_CACHE": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "train.py", "dataset=digits", "method=mapa_gt"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: method='mapa_gt': needs ground-truth codes"), p.stderr


def test_data_paths_are_stored_absolute(tmp_path, cache_dir, monkeypatch):
    """A relative or ~ path is what the user typed in one folder; the run's config.yaml stores the file's absolute
    path, so evaluating the run from another folder finds the same file."""
    import yaml

    t = np.random.default_rng(0).uniform(0, 2 * np.pi, 300)
    x = np.stack([np.cos(t), np.sin(t)], 1)
    (tmp_path / "data").mkdir()
    path = write(tmp_path / "data", x_train=x)
    monkeypatch.chdir(tmp_path / "data")
    for i, typed in enumerate((f"./{path.name}", f"../data/{path.name}")):
        run_dir = tmp_path / f"run{i}"
        cfg = compose_cfg(["dataset=file", f"dataset.path={typed}", "method=iwae", *TRAINER_FAST], run_dir, cache_dir)
        assert run_training(cfg)["status"] == "completed"
        stored = yaml.safe_load((run_dir / "config.yaml").read_text())["dataset"]["path"]
        assert stored == str(path.resolve())
    monkeypatch.setenv("HOME", str(tmp_path))
    cfg = compose_cfg(["dataset=file", "dataset.path='~/data/" + path.name + "'", "method=iwae", *TRAINER_FAST],
                      tmp_path / "home", cache_dir)
    assert run_training(cfg)["status"] == "completed"
    assert yaml.safe_load((tmp_path / "home" / "config.yaml").read_text())["dataset"]["path"] == str(path.resolve())
