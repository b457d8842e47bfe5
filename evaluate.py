"""Evaluate trained runs: `python evaluate.py run=<run folder>` or `sweep=<multirun folder>` (see README)."""

import sys

import hydra
from omegaconf import DictConfig

from mapa_exp.cli import check_command_line  # light: the command line is checked before torch loads
from mapa_exp.errors import ConfigError


@hydra.main(version_base="1.3", config_path="conf", config_name="evaluate")
def main(cfg: DictConfig) -> None:
    import torch

    from mapa_exp.evaluation.evaluate import build_estimators, evaluate_configured, evaluate_sweep
    from mapa_exp.runs.training import config_error

    try:
        if cfg.num_threads:
            torch.set_num_threads(int(cfg.num_threads))
        if (cfg.run is None) == (cfg.sweep is None):
            raise ConfigError("run", cfg.run, "give exactly one of run=<run folder> or sweep=<multirun folder>")
        if cfg.run is not None:
            out = evaluate_configured(cfg.run, cfg)
            for k, v in sorted(out["metrics"].items()):
                print(f"{k:32s} {v: .5f}")
            kl = {k.split("/")[1]: v for k, v in out["metrics"].items() if k.startswith("test_kl/")}
            ll = {k.split("/")[1]: v for k, v in out["metrics"].items() if k.startswith("test_loglik/")}
            shown = ", ".join(f"test KL {v:.4f} nats ({k})" for k, v in kl.items()) or \
                ", ".join(f"test log-likelihood {v:.4f} nats ({k})" for k, v in ll.items())
            ckpt, prior = out["scored"]["checkpoint"], out["scored"]["prior"]
            chosen = f", prior {prior['chosen']} (chosen on validation data)" if prior else ""
            print(f"evaluated {out['run_dir']} at its {ckpt['which']} checkpoint (epoch {ckpt['epoch']}){chosen}: "
                  f"{shown}; wrote eval.json")
        else:
            counts = evaluate_sweep(cfg.sweep, build_estimators(cfg), dict(cfg.prior_recovery), cfg.paths.cache_dir,
                                    cfg.eval_checkpoint)
            print(f"{cfg.sweep}: " + ", ".join(f"{v} {k}" for k, v in counts.items()) + "; summary.csv written")
            if counts["failed"]:
                sys.exit(1)
    except KeyboardInterrupt:  # Ctrl-C: every eval.json finished so far is complete and kept
        print("interrupted: the runs evaluated so far keep their eval.json; rerun the same command to go on",
              file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        bad = config_error(exc)
        if bad is None:
            raise
        print(f"error: {bad}", file=sys.stderr)
        sys.exit(2)


if __name__ == "__main__":
    check_command_line("evaluate", sys.argv[1:])  # bad input: one line, exit 2, before any run folder
    main()
