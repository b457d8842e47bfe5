"""Non-identifiability figure (method.md §8, paper Sec 6.4): `python scripts/nonidentifiability.py dataset=circle`.

Variant 1 is the ground truth (its decoder, its codes); variant 2 a trained VAE on the same data
(its decoder, its encoder means as codes): the same p(x), different decoders. For each variant the
three log-posteriors of the same points are drawn against that variant's codes, with the same
MAPA q. Without ``vae_run=`` a VAE is trained first with ``train.py``'s defaults on the same
dataset. Writes <out_dir>/nonidentifiability_<dataset>.{csv,json,png} and ..._decoders.png.
"""

from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig

import mapa_exp.config  # noqa: F401  the configs' resolvers (${mapa_cwd:}, ...), before Hydra composes
from mapa_exp.evaluation.posteriors import choose_points, curves_table, posterior_curves, trend_slope
from mapa_exp.evaluation.runs import load_run
from mapa_exp.io import atomic_write_json, atomic_write_text
from mapa_exp.sweeps.plots import decoders_figure, posterior_trends_figure, save

log = logging.getLogger(__name__)
ROOT = Path(__file__).resolve().parents[1]


def _train_vae(cfg: DictConfig) -> Path:
    run_dir = Path(cfg.paths.output_dir) / "figures" / f"vae_{cfg.dataset.name}_draw{cfg.dataset.draw}"
    if not (run_dir / "results.json").exists():
        cmd = [sys.executable, str(ROOT / "train.py"), f"dataset={cfg.dataset.name}", "method=vae",
               f"dataset.draw={cfg.dataset.draw}", f"hydra.run.dir={run_dir}", "trainer.enable_progress_bar=false",
               *cfg.vae_overrides]
        log.info("training variant 2: %s", " ".join(cmd))
        subprocess.run(cmd, check=True, cwd=ROOT)
    return run_dir


@hydra.main(version_base="1.3", config_path="../conf", config_name="posteriors")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(1)
    gt = hydra.utils.instantiate(cfg.dataset)
    train = gt.splits()["train"]
    run = load_run(cfg.vae_run or _train_vae(cfg), key="vae_run")
    vae = run.module
    if not torch.equal(run.datamodule.x["train"], train.x):
        raise SystemExit(f"error: vae_run={run.path}: trained on other data than dataset={gt.name} draw={gt.draw}")
    with torch.no_grad():
        vae_codes = vae.encode(train.x)[0]
    points = choose_points(train.x, train.z, cfg.n_points)
    variants = {"ground truth": (gt.decoder, train.z), "trained VAE": (vae.decoder, vae_codes)}
    tables, decoded = [], []
    for name, (decode, codes) in variants.items():
        curves = posterior_curves(train.x[points], train.x, codes, decode, gt.likelihood, cfg.bandwidth, cfg.J)
        tables.append(curves_table(curves, codes, points, variant=name))
        grid = torch.linspace(float(codes.min()), float(codes.max()), 400)[:, None]
        with torch.no_grad():
            f = decode(grid)
        decoded.append(pd.DataFrame({"variant": name, "z": grid[:, 0].numpy(), "x1": f[:, 0].numpy(), "x2": f[:, 1].numpy()}))
    table = pd.concat(tables, ignore_index=True)
    slopes = {v: trend_slope(table[table["variant"] == v], cfg.window) for v in variants}
    out = Path(cfg.out_dir)
    stem = out / f"nonidentifiability_{gt.name}"
    atomic_write_text(stem.with_suffix(".csv"), table.to_csv(index=False))
    atomic_write_text(out / f"nonidentifiability_{gt.name}_decoders.csv", pd.concat(decoded).to_csv(index=False))
    atomic_write_json(stem.with_suffix(".json"), {"dataset": gt.name, "points": points, "vae_run": str(run.path),
                                                  "slopes": slopes})
    title = f"{gt.name}: same MAPA q against two decoders (slopes " + ", ".join(
        f"{v} {s['slope']:.3f}" for v, s in slopes.items()) + ")"
    save(posterior_trends_figure(pd.read_csv(stem.with_suffix(".csv")), title), stem.with_suffix(".png"))
    data = pd.DataFrame({"x1": train.x[:, 0].numpy(), "x2": train.x[:, 1].numpy()})
    save(decoders_figure(pd.read_csv(out / f"nonidentifiability_{gt.name}_decoders.csv"), data, f"{gt.name}: decoders"),
         out / f"nonidentifiability_{gt.name}_decoders.png")
    log.info("wrote %s.{csv,json,png}; slopes %s", stem, {v: round(s["slope"], 3) for v, s in slopes.items()})


if __name__ == "__main__":
    main()
