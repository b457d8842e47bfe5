"""Train one method on one ground truth: `python train.py dataset=spiral method=mapa` (see README)."""

import sys

import hydra
from omegaconf import DictConfig

from mapa_exp.training import config_error, run_training


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> None:
    try:
        run_training(cfg)
    except Exception as exc:
        bad = config_error(exc)
        if bad is None:
            raise
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    main()
