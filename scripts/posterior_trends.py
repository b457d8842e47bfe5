"""Posterior-trend figure (method.md §8, paper Sec 6.3): `python scripts/posterior_trends.py dataset=figure8`.

Writes <out_dir>/posterior_trends_<dataset>.csv (tidy), .png (drawn from that table) and .json (slope).
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import pandas as pd
import torch
from omegaconf import DictConfig

import mapa_exp.config  # noqa: F401  the configs' resolvers (${mapa_cwd:}, ...), before Hydra composes
from mapa_exp.evaluation.posteriors import choose_points, curves_table, posterior_curves, trend_slope
from mapa_exp.io import atomic_write_json, atomic_write_text
from mapa_exp.sweeps.plots import posterior_trends_figure, save

log = logging.getLogger(__name__)


@hydra.main(version_base="1.3", config_path="../conf", config_name="posteriors")
def main(cfg: DictConfig) -> None:
    torch.set_num_threads(1)
    gt = hydra.utils.instantiate(cfg.dataset)
    train = gt.splits()["train"]
    points = choose_points(train.x, train.z, cfg.n_points)
    curves = posterior_curves(train.x[points], train.x, train.z, gt.decoder, gt.likelihood, cfg.bandwidth, cfg.J)
    table = curves_table(curves, train.z, points)
    slope = trend_slope(table, cfg.window) | {"slope_all_codes": trend_slope(table, None)["slope"]}
    out = Path(cfg.out_dir)
    stem = out / f"posterior_trends_{gt.name}"
    atomic_write_text(stem.with_suffix(".csv"), table.to_csv(index=False))
    atomic_write_json(stem.with_suffix(".json"), {"dataset": gt.name, "points": points, **slope})
    fig = posterior_trends_figure(pd.read_csv(stem.with_suffix(".csv")), f"{gt.name}: posterior trends "
                                  f"(slope of MAPA on Eq 7: {slope['slope']:.3f})")
    save(fig, stem.with_suffix(".png"))
    log.info("wrote %s.{csv,json,png}; slope %.3f (R^2 %.3f, %d codes)", stem, slope["slope"], slope["r2"], slope["n"])


if __name__ == "__main__":
    main()
