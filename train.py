"""Train one method on one ground truth: `python train.py dataset=spiral method=mapa` (see README).

Exit status: 0 done; 2 bad input (one line `error: key=value: reason`); 1 the run failed (one line, e.g. a
non-finite loss); 128 + signal number when stopped by SIGTERM/SIGUSR2 after a checkpoint (rerun the same
command in the same folder to resume). In a multirun (`-m`) a failed job does not stop the others; the
sweep exits with the worst job's status at the end.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mapa_exp.evaluation.evaluate import evaluate_configured
from mapa_exp.training import RunFailed, config_error, run_training

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
_failed_jobs: list[int] = []  # exit statuses of the failed jobs of a multirun


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> dict | None:
    try:
        results = run_training(cfg)
        if cfg.evaluate and results.get("status") == "completed":
            evaluate_configured(cfg.paths.run_dir, cfg)
    except Exception as exc:
        bad = config_error(exc)
        if bad is None and not isinstance(exc, RunFailed):
            raise
        print(f"error: {bad if bad is not None else exc}", file=sys.stderr)
        status = EXIT_BAD_INPUT if bad is not None else EXIT_FAILED
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            _failed_jobs.append(status)  # results.json says why; let the other jobs run
            return None
        sys.exit(status)
    if results.get("status") == "preempted":
        print(f"preempted: {results['reason']}", file=sys.stderr)
        sys.exit(128 + results["signal"])
    return results


if __name__ == "__main__":
    main()
    if _failed_jobs:
        print(f"error: {len(_failed_jobs)} job(s) of the multirun failed; see their results.json", file=sys.stderr)
        sys.exit(max(_failed_jobs))
