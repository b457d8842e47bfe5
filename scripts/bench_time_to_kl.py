"""Time to reach a test KL, MAPA vs IWAE at S = 50 on Figure-8 (issue 5): wall time of training only.

    python scripts/bench_time_to_kl.py                        # target 0.1 nats, up to 300 epochs each
    python scripts/bench_time_to_kl.py --target 0.05 --max-epochs 500

Both methods train on the same Figure-8 draw (N = 1000, batch 100, the 2 x 50 MLP, Adam 1e-3, one
thread) with S = 50 (MAPA: K = 5). Every ``--every`` epochs a callback scores the test set exactly
(quadrature, J = 2000; MAPA after its copula prior recovery) and records the training wall time so
far, with the scoring time excluded; the run stops once test KL <= target. The ratio MAPA / IWAE of
the times to target is measured in the same process. Writes docs/benchmarks/time_to_kl.json and the
section "Time to a test KL" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import lightning as L
import torch

from mapa_exp.benchmarking import write_markdown_section
from mapa_exp.evaluation.estimators import QuadratureEstimator, standard_model
from mapa_exp.evaluation.evaluate import model_of_module
from mapa_exp.io import atomic_write_json
from mapa_exp.runs.training import build

ROOT = Path(__file__).resolve().parents[1]


class TestKLMonitor(L.Callback):
    """Scores test KL every n epochs; training time excludes the scoring; stops at the target."""

    def __init__(self, datamodule, every: int, target: float, J: int = 2000):
        self.dm, self.every, self.target = datamodule, every, target
        self.est = QuadratureEstimator(J_1d=J, check_convergence=False)
        gt = datamodule.groundtruth
        res, _ = self.est.evaluate(standard_model(gt.decoder, gt.likelihood, gt.latent_dim), None, {"test": datamodule.x["test"]})
        self.gt_ll = res["test"][0]
        self.history, self.train_time, self._t = [], 0.0, None

    def on_train_epoch_start(self, trainer, module):
        self._t = time.perf_counter()

    def on_train_epoch_end(self, trainer, module):
        self.train_time += time.perf_counter() - self._t
        epoch = trainer.current_epoch + 1
        if epoch % self.every:
            return
        was = module.training
        module.eval()
        model = model_of_module(module, self.dm.x["train"])
        res, _ = self.est.evaluate(model, None, {"test": self.dm.x["test"]})
        module.train(was)
        kl = float((self.gt_ll - res["test"][0]).mean())
        self.history.append({"epoch": epoch, "train_time_s": self.train_time, "test_kl": kl})
        if kl <= self.target:
            trainer.should_stop = True


def run(method: str, args) -> dict:
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=["dataset=figure8", f"method={method}", "method.S=50"])
    torch.set_num_threads(1)
    L.seed_everything(0, verbose=False)
    dm, module = build(cfg)
    dm.setup("fit")
    mon = TestKLMonitor(dm, args.every, args.target)
    trainer = L.Trainer(max_epochs=args.max_epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0, callbacks=[mon])
    trainer.fit(module, datamodule=dm)
    hit = next((h for h in mon.history if h["test_kl"] <= args.target), None)
    return {"method": method, "K": cfg.method.get("K"), "S": 50, "reached": hit is not None,
            "time_to_target_s": hit["train_time_s"] if hit else None, "epochs_to_target": hit["epoch"] if hit else None,
            "final_test_kl": mon.history[-1]["test_kl"], "history": mon.history,
            "passes_per_point_decoder": module.forward_pass_summary()["passes_per_point_decoder"]}


def render(data: dict) -> str:
    rows = ["| method | K | S | epochs to target | training time to target (s) | final test KL | decoder passes / point |",
            "|---|---|---|---|---|---|---|"]
    for r in data["runs"]:
        t = f"{r['time_to_target_s']:.1f}" if r["reached"] else f"not reached in {data['max_epochs']} epochs"
        rows.append(f"| {r['method']} | {r['K'] or ''} | {r['S']} | {r['epochs_to_target'] or ''} | {t} | "
                    f"{r['final_test_kl']:.3f} | {r['passes_per_point_decoder']:.2f} |")
    ratio = data.get("ratio_mapa_over_iwae")
    head = (f"Measured by `python scripts/bench_time_to_kl.py` on {data['machine']}, {data['date']}: Figure-8 "
            f"(N = 1000, batch 100, one thread), target test KL <= {data['target']} nats (exact quadrature, "
            f"scored every {data['every']} epochs, scoring time excluded).\n\n")
    tail = (f"\n\nMAPA / IWAE time to target: **{ratio:.2f}**." if ratio is not None else
            "\n\nAt least one method did not reach the target: no ratio.")
    return head + "\n".join(rows) + tail


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--target", type=float, default=0.1)
    p.add_argument("--max-epochs", type=int, default=300)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--out", type=Path, default=ROOT / "docs" / "benchmarks" / "time_to_kl.json")
    args = p.parse_args()
    runs = [run(m, args) for m in ("iwae", "mapa")]
    by = {r["method"]: r for r in runs}
    ratio = (by["mapa"]["time_to_target_s"] / by["iwae"]["time_to_target_s"]
             if by["mapa"]["reached"] and by["iwae"]["reached"] else None)
    data = {"target": args.target, "max_epochs": args.max_epochs, "every": args.every, "runs": runs,
            "ratio_mapa_over_iwae": ratio, "machine": f"{platform.node()} ({torch.get_num_threads()} thread)",
            "date": time.strftime("%Y-%m-%d %H:%M")}
    atomic_write_json(args.out, data)
    write_markdown_section(ROOT / "docs" / "benchmarks.md", "Time to a test KL: MAPA vs IWAE (S = 50)", render(data))
    print(render(data))


if __name__ == "__main__":
    main()
