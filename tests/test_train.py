"""The training framework end to end: every method on every data set, outputs, caching, bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys

import pandas as pd
import pytest

from mapa_exp.runs.training import run_training
from tests.conftest import FAST, ROOT, compose_cfg

DATASETS = ["figure8", "circle", "absolute_value", "clusters", "spiral"]
METHODS = ["vae", "iwae", "mapa", "mapa_gt", "mapa_naive"]


@pytest.mark.parametrize("dataset", DATASETS)
@pytest.mark.parametrize("method", METHODS)
def test_every_method_trains_on_every_dataset(dataset, method, tmp_path, cache_dir):
    run_dir = tmp_path / "run"
    cfg = compose_cfg([f"dataset={dataset}", f"method={method}", *FAST], run_dir, cache_dir)
    res = run_training(cfg)
    assert res["status"] == "completed"
    assert (res["dataset"], res["method"]) == (dataset, method)
    # bounds are per-point log-likelihoods in nats: finite, and below the Gaussian density's peak
    peak = -math.log(2 * math.pi * 0.01)  # log N(x; x, 0.01 I_2)
    for key in ("train_bound", "val_bound"):
        assert math.isfinite(res[key]) and res[key] < peak
    # forward passes: IWAE pays B*S decoder passes, MAPA at most the batch's unique indices
    if method in ("vae", "iwae"):
        assert res["passes_per_point_decoder"] == pytest.approx(cfg.method.S)
        assert res["passes_per_point_encoder"] == pytest.approx(1.0)
    else:
        assert 1 <= res["passes_per_point_decoder"] <= cfg.method.K + cfg.method.S
        assert res["passes_encoder_total"] == res["passes_decoder_total"]
    saved = json.loads((run_dir / "results.json").read_text())
    # the run's configuration (flat, for grouping) is recorded beside the numbers, as composed
    configuration = saved.pop("configuration")
    assert configuration == res.pop("configuration")
    assert configuration["method.S"] == cfg.method.S and "seed" not in configuration
    assert saved == pytest.approx(res)
    assert (run_dir / "checkpoints" / "last.ckpt").exists()
    assert (run_dir / "config.yaml").exists()
    metrics = pd.read_csv(run_dir / "metrics.csv")
    assert {"train/bound_step", "train/passes_decoder_step", "val/bound"} <= set(metrics.columns)


def test_results_record_everything_a_sweep_needs(tmp_path, cache_dir):
    cfg = compose_cfg(["dataset=figure8", "method=mapa", "seed=3", "dataset.draw=2", *FAST], tmp_path / "r", cache_dir)
    res = run_training(cfg)
    for key in ("status", "dataset", "method", "K", "S", "seed", "draw", "train_bound", "val_bound",
                "passes_encoder_total", "passes_decoder_total", "passes_per_point_decoder",
                "passes_per_point_encoder_decoder", "wall_time_s"):
        assert key in res, key
    assert (res["seed"], res["draw"], res["K"], res["S"]) == (3, 2, 5, 5)


def test_same_seed_same_run(tmp_path, cache_dir):
    """A run is reproducible on CPU: same seed, same final bounds and weights."""
    out = []
    for name in ("a", "b"):
        cfg = compose_cfg(["dataset=clusters", "method=mapa", *FAST], tmp_path / name, cache_dir)
        out.append(run_training(cfg))
    assert out[0]["train_bound"] == out[1]["train_bound"]
    assert out[0]["val_bound"] == out[1]["val_bound"]
    assert out[0]["passes_decoder_total"] == out[1]["passes_decoder_total"]


def test_second_run_hits_the_proximity_cache(tmp_path, monkeypatch, caplog):
    import mapa_exp.data.datamodule as dm

    cache = tmp_path / "cache"
    cfg = compose_cfg(["dataset=circle", "method=mapa", *FAST], tmp_path / "first", cache)
    assert run_training(cfg)["proximity_cache_hit"] is False

    def must_not_run(*a, **k):
        raise AssertionError("distances recomputed despite a cached structure")

    monkeypatch.setattr(dm, "nearest_neighbors", must_not_run)
    caplog.set_level("INFO")
    # another method and another bandwidth on the same data: still a hit, nothing recomputed
    cfg = compose_cfg(["dataset=circle", "method=mapa", "method.bandwidth=0.05", *FAST], tmp_path / "second", cache)
    assert run_training(cfg)["proximity_cache_hit"] is True
    assert "cache hit" in caplog.text
    cfg = compose_cfg(["dataset=circle", "method=iwae", *FAST], tmp_path / "third", cache)
    assert run_training(cfg)["proximity_cache_hit"] is None  # the IWAE needs no proximity structure


def _cli(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "MAPA_EXP_OUTPUTS": str(tmp_path / "outputs"), "MAPA_EXP_CACHE": str(tmp_path / "cache")}
    return subprocess.run([sys.executable, "train.py", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)


def test_unknown_method_lists_the_available_ones(tmp_path):
    p = _cli("method=nonexistent", tmp_path=tmp_path)
    assert p.returncode == 2 and p.stderr.count("\n") == 1
    assert p.stderr.startswith("error: method='nonexistent': no such option; available: ")
    for m in METHODS:
        assert m in p.stderr


# each value's check is tested in-process in test_bad_input.py (BAD_VALUES); here the command line's one line and
# exit status, once by default (a train.py start is ~8 s of this machine's test time) and for the rest with -m slow
@pytest.mark.parametrize(
    "override, key",
    [("method.K=0", "method.K"), pytest.param("method.S=-1", "method.S", marks=pytest.mark.slow),
     pytest.param("method.bandwidth=0", "method.bandwidth", marks=pytest.mark.slow),
     pytest.param("method.rho=1.5", "method.rho", marks=pytest.mark.slow)],
)
def test_bad_method_values_give_one_clear_line(override, key, tmp_path):
    p = _cli(override, tmp_path=tmp_path)
    assert p.returncode == 2
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    assert lines[0].startswith(f"error: {key}=")
    # nothing was marked successful
    for results in (tmp_path / "outputs").rglob("results.json"):
        assert json.loads(results.read_text())["status"] == "failed"


def test_best_checkpoint_is_the_run_stopped_at_its_best_validation_epoch(tmp_path, cache_dir):
    """best.ckpt holds the weights of the epoch with the best validation bound: equal to the last.ckpt of the
    same run trained only that many epochs (an independent run, same seed)."""
    import torch

    base = ["dataset=figure8", "method=mapa", *FAST, "trainer.max_epochs=8", "optimizer.lr=0.03",
            "callbacks.checkpoint.every_n_epochs=1"]  # a large step: the validation bound goes up and down
    res = run_training(compose_cfg(base, tmp_path / "long", cache_dir))
    val = pd.read_csv(tmp_path / "long" / "metrics.csv").dropna(subset=["val/bound"])
    best = val.loc[val["val/bound"].idxmax()]
    assert res["best_epoch"] == int(best["epoch"]) + 1 and res["best_val_bound"] == pytest.approx(best["val/bound"])
    short = run_training(compose_cfg([*base, f"trainer.max_epochs={res['best_epoch']}"], tmp_path / "short", cache_dir))
    assert short["best_epoch"] == res["best_epoch"]
    a = torch.load(tmp_path / "long" / "checkpoints" / "best.ckpt", weights_only=True)["state_dict"]
    b = torch.load(tmp_path / "short" / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    for net in ("encoder", "decoder"):
        assert torch.equal(a[f"{net}.params"], b[f"{net}.params"])
    assert res["val_bound"] != short["val_bound"] or res["best_epoch"] == 8  # last and best differ here


@pytest.mark.parametrize("method, encoder_out", [("iwae", 2), ("mapa", 1)])
def test_each_role_gets_its_own_network_shape(method, encoder_out, tmp_path, cache_dir):
    """net.decoder.* widens the decoder only; the encoder (or g_phi) keeps the net's own 2 x 50."""
    from mapa_exp.runs.training import build

    cfg = compose_cfg(["dataset=figure8", f"method={method}", *FAST, "net.decoder.hidden=[64,64,64]",
                       "net.encoder.activation=tanh"], tmp_path / "r", cache_dir)
    _, module = build(cfg)
    assert module.decoder.shapes == [(1, 64), (64, 64), (64, 64), (64, 2)]
    assert module.decoder.activation == "leaky_relu"
    assert module.encoder.shapes == [(2, 50), (50, 50), (50, encoder_out)] and module.encoder.activation == "tanh"
    assert module.decoder.params.shape == (1, 1 * 64 + 64 + 2 * (64 * 64 + 64) + 64 * 2 + 2)
    default = build(compose_cfg(["dataset=figure8", f"method={method}", *FAST], tmp_path / "d", cache_dir))[1]
    assert default.decoder.shapes == [(1, 50), (50, 50), (50, 2)]  # the paper's network by default


def test_a_bad_role_width_is_one_line(tmp_path, cache_dir):
    cfg = compose_cfg(["dataset=figure8", "method=vae", *FAST, "net.decoder.hidden=[64,0]"], tmp_path / "r", cache_dir)
    with pytest.raises(Exception, match=r"net.decoder.hidden=\[64, 0\]: every width must be >= 1"):
        run_training(cfg)


@pytest.mark.slow  # 10-60 s of subprocesses or training: in CI's -m slow stage, so the default run stays under 4 min
def test_a_method_defined_outside_the_package_trains_and_evaluates_through_the_command_lines(tmp_path, cache_dir):
    """The seam: tests/toy_method holds one module and one config file; train.py and evaluate.py run it with the
    folder on PYTHONPATH and --config-dir, and nothing in mapa_exp/ or conf/ names it."""
    import json
    import os
    import subprocess
    import sys

    from tests.conftest import ROOT

    toy = ROOT / "tests" / "toy_method"
    for folder in ("mapa_exp", "conf"):
        assert not [p for p in (ROOT / folder).rglob("*") if p.is_file() and "FixedVarianceVAE" in p.read_text(
            errors="ignore")]
    env = {**os.environ, "PYTHONPATH": f"{toy}{os.pathsep}{ROOT}", "MAPA_EXP_OUTPUTS": str(tmp_path / "out"),
           "MAPA_EXP_CACHE": str(cache_dir)}
    run_dir = tmp_path / "run"
    p = subprocess.run([sys.executable, "train.py", "--config-dir", str(toy / "conf"), "method=toy", *FAST,
                        "trainer.max_epochs=2", f"hydra.run.dir={run_dir}"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "completed" and res["method"] == "toy" and res["passes_per_point_decoder"] == 1.0
    p = subprocess.run([sys.executable, "evaluate.py", f"run={run_dir}", "evaluator=quadrature",
                        "evaluator.quadrature.J_1d=1000"], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert p.returncode == 0, p.stderr[-3000:]
    assert json.loads((run_dir / "eval.json").read_text())["metrics"]["test_kl/quadrature"] > 0


@pytest.mark.parametrize("method", ["mapa", "mapa_gt", "mapa_naive"])
def test_the_posterior_picture_gets_each_mapa_methods_own_q(method, tmp_path, cache_dir):
    # the W&B posterior picture draws the method's q(m | x) over the training points: a distribution over m for
    # every method of the family, and for MAPA the kernel softmax of Eq 8 computed here by hand
    import torch

    from mapa_exp.runs.training import build

    cfg = compose_cfg(["dataset=figure8", f"method={method}", *FAST], tmp_path / "run", cache_dir)
    data, module = build(cfg)
    data.setup("evaluate")
    x = data.x["test"][:3]
    q = module.proposal_density(x, 0, data)
    assert q["kind"] == "points" and q["log_density"].shape == (3, data.x["train"].shape[0])
    assert torch.allclose(q["log_density"].double().exp().sum(1), torch.ones(3, dtype=torch.float64), atol=1e-5)
    if method == "mapa":
        d2 = ((x[:, None, :].double() - data.x["train"][None].double()) ** 2).sum(-1)
        expected = torch.log_softmax(-d2 / (2 * 0.01), dim=1)  # bandwidth h = sigma^2 = 0.01
        assert torch.allclose(q["log_density"].double(), expected, atol=1e-3)
    if method == "mapa_naive":
        assert torch.allclose(q["log_density"].double().exp(), torch.full((3, 200), 1 / 200, dtype=torch.float64))
