"""Train one method on one ground truth: `python train.py dataset=spiral method=mapa` (see README).

Exit status: 0 done; 2 bad input (one line `error: key=value: reason`); 1 a run failed (one line, e.g. a
non-finite loss); 128 + signal number when stopped by SIGTERM/SIGUSR2 after a checkpoint (rerun the same
command in the same folder to resume). In a multirun (`-m`, stacked or not) a failed job does not stop the
others; the sweep exits with the worst job's status at the end.
"""

import sys

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mapa_exp.evaluation.evaluate import evaluate_configured
from mapa_exp.runs.training import config_error, run_job

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
_failed_jobs: list[int] = []  # exit statuses of the failed jobs of a multirun


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> list[dict] | None:
    try:
        results = run_job(cfg)
        completed = [r["run_dir"] for r in results if r.get("status") == "completed"]
        if cfg.evaluate and completed:
            evaluate_configured(completed, cfg)
    except Exception as exc:
        bad = config_error(exc)
        if bad is None:
            raise
        return _exit(EXIT_BAD_INPUT, [f"error: {bad}"])
    failed = [f"error: {r['reason']}" for r in results if r.get("status") == "failed"]
    if failed:
        return _exit(EXIT_FAILED, failed)
    preempted = [r for r in results if r.get("status") == "preempted"]
    if preempted:  # stop here, multirun or not: the signal asks the whole process to stop
        print(f"preempted: {preempted[0]['reason']}", file=sys.stderr)
        sys.exit(128 + preempted[0]["signal"])
    return results


def _exit(status: int, lines: list[str]) -> None:
    print("\n".join(lines), file=sys.stderr)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        _failed_jobs.append(status)  # results.json says why; let the other jobs run
        return None
    sys.exit(status)


if __name__ == "__main__":
    main()
    if _failed_jobs:
        print(f"error: {len(_failed_jobs)} job(s) of the multirun failed; see their results.json", file=sys.stderr)
        sys.exit(max(_failed_jobs))
