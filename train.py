"""Train one method on one ground truth: `python train.py dataset=spiral method=mapa` (see README).

Exit status: 0 done; 2 bad input (one line `error: key=value: reason`); 1 a run failed (one line, e.g. a
non-finite loss); 128 + signal number when stopped by SIGTERM/SIGUSR2 (preempted) or SIGINT (interrupted: 130)
after a checkpoint; it then prints the command that resumes (the same arguments with the folder pinned). In a
multirun (`-m`, stacked or not) a failed job does not stop the others; the sweep exits with the worst job's
status at the end.
"""

import json
import shlex
import shutil
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from mapa_exp.cli import check_command_line  # light: the command line is checked before torch loads

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
_failed_jobs: list[int] = []  # exit statuses of the failed jobs of a multirun


@hydra.main(version_base="1.3", config_path="conf", config_name="train")
def main(cfg: DictConfig) -> list[dict] | None:
    from mapa_exp.io import FolderBusyError
    from mapa_exp.pipeline import train
    from mapa_exp.runs.training import config_error

    run_dir = Path(cfg.paths.run_dir)
    fresh = not (run_dir / "results.json").exists() and not (run_dir / "checkpoints").exists()
    try:
        results = train(cfg)  # with evaluate=true it also evaluates the completed runs
    except KeyboardInterrupt:  # Ctrl-C outside the epochs (training stops those itself): writing the results,
        # evaluating; every file is written whole (temporary name, then renamed), so the rerun takes up from there
        print("interrupted: SIGINT after the training epochs; the files written so far are whole", file=sys.stderr)
        print(f"resume with: {resume_command(sys.argv[1:])}", file=sys.stderr)
        sys.exit(130)
    except Exception as exc:
        bad = config_error(exc)
        if bad is None:
            raise
        busy = isinstance(bad, FolderBusyError)  # another process's folder: never this one's to remove
        if fresh and not busy and HydraConfig.get().mode == RunMode.RUN:  # a refused run leaves no folder behind
            shutil.rmtree(run_dir, ignore_errors=True)
        return _exit(EXIT_BAD_INPUT, [f"error: {bad}"])
    failed = [f"error: {r['reason']}" for r in results if r.get("status") == "failed"]
    if failed:
        return _exit(EXIT_FAILED, failed)
    for r in results:
        if r.get("status") == "completed":
            print(summary_line(r, cfg.evaluate))
    stopped = [r for r in results if r.get("status") in ("preempted", "interrupted")]
    if stopped:  # stop here, multirun or not: the signal asks the whole process to stop
        print(f"{stopped[0]['status']}: {stopped[0]['reason']}", file=sys.stderr)
        print(f"resume with: {resume_command(sys.argv[1:])}", file=sys.stderr)
        sys.exit(128 + stopped[0]["signal"])
    return results


def summary_line(results: dict, evaluated: bool) -> str:
    """One line per finished run: where it is, its final bounds and, when evaluated, its test KL."""
    line = (f"done: {results['run_dir']}: train bound {results['train_bound']:.4f}, val bound "
            f"{results['val_bound']:.4f} nats per point")
    best = results.get("best_epoch")
    line += f" (best validation bound at epoch {best})" if best is not None else " (no validation ran: last epoch kept)"
    if evaluated:
        try:
            metrics = json.loads((Path(results["run_dir"]) / "eval.json").read_text())["metrics"]
            kl = [f"{v:.4f} ({k.split('/')[1]})" for k, v in sorted(metrics.items()) if k.startswith("test_kl/")]
            line += f"; test KL {', '.join(kl)} nats" if kl else ""
        except (OSError, ValueError, KeyError):
            pass
    return line


def resume_command(argv: list[str]) -> str:
    """The command that resumes this run or sweep: the same arguments, with the folder it wrote pinned
    (``hydra.run.dir``, or ``hydra.sweep.dir`` for a multirun), ready to paste into a shell."""
    hc = HydraConfig.get()
    key, folder = ("hydra.sweep.dir", hc.sweep.dir) if hc.mode == RunMode.MULTIRUN else ("hydra.run.dir", hc.run.dir)
    args = [a for a in argv if not a.startswith(f"{key}=")]
    return " ".join(shlex.quote(a) for a in ["python", "train.py", *args, f"{key}={Path(folder).resolve()}"])


def _exit(status: int, lines: list[str]) -> None:
    print("\n".join(lines), file=sys.stderr)
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        _failed_jobs.append(status)  # results.json says why; let the other jobs run
        return None
    sys.exit(status)


if __name__ == "__main__":
    check_command_line("train", sys.argv[1:])  # bad input: one line, exit 2, before any run folder
    main()
    if _failed_jobs:
        print(f"error: {len(_failed_jobs)} job(s) of the multirun failed; see their results.json", file=sys.stderr)
        sys.exit(max(_failed_jobs))
