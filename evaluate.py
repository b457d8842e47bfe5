"""Evaluate trained runs: `python evaluate.py run=<run folder>` or `sweep=<multirun folder>` (see README)."""

import sys

import hydra
import torch
from omegaconf import DictConfig

from mapa_exp.errors import ConfigError
from mapa_exp.evaluation.evaluate import build_estimators, evaluate_configured, evaluate_sweep
from mapa_exp.runs.training import config_error


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    try:
        if cfg.num_threads:
            torch.set_num_threads(int(cfg.num_threads))
        if (cfg.run is None) == (cfg.sweep is None):
            raise ConfigError("run", cfg.run, "give exactly one of run=<run folder> or sweep=<multirun folder>")
        if cfg.run is not None:
            out = evaluate_configured(cfg.run, cfg)
            for k, v in sorted(out["metrics"].items()):
                print(f"{k:32s} {v: .5f}")
        else:
            counts = evaluate_sweep(cfg.sweep, build_estimators(cfg), dict(cfg.prior_recovery), cfg.paths.cache_dir,
                                    cfg.eval_checkpoint)
            print(", ".join(f"{v} {k}" for k, v in counts.items()))
            if counts["failed"]:
                sys.exit(1)
    except Exception as exc:
        bad = config_error(exc)
        if bad is None:
            raise
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
