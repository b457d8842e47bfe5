"""Time to a target, MAPA vs IWAE, against the size of the decoder: where MAPA's fewer decoder passes become
less wall-clock time.

    python scripts/bench_time_to_kl.py                                   # the defaults below; JSON, figure, docs
    python scripts/bench_time_to_kl.py --datasets figure8 --decoders 2x50 3x512 --seeds 0 --max-epochs 100
    python scripts/bench_time_to_kl.py --device cuda                     # the same on a GPU (its own rows)
    python scripts/bench_time_to_kl.py --render-only                     # docs section + figure from the JSON

For each data set, decoder size (``net.decoder.hidden``; the encoder / g_phi stays the default 2 x 50) and
seed, six configurations train **interleaved in one process**: IWAE (DReG) and MAPA with K = ceil(0.1 S) and
K = ceil(0.5 S), at S = 10 and 50 -- each for ``--every`` epochs in turn, so load from elsewhere hits them
alike. After each turn a configuration is scored (the scoring time is excluded from its training time) and
it stops once it reaches the target:

* Figure-8: test KL(p_GT || p_model) <= ``--target-kl`` nats, exact (quadrature, J = 2000; MAPA after its
  prior recovery, method.md §6);
* digits (binary, 2-D latent): test log-likelihood >= ``--target-ll`` nats per image (quadrature on a 2-D grid,
  J = ``--digits-J`` per axis; the same estimator for every method).

The time is that of the bare training loop (``mapa_exp.benchmarking.bare_epoch``: the method's own step,
backward and optimizer step -- what ``train.py`` runs, without Lightning's per-epoch work, which
docs/benchmarks.md "Training epoch" measures separately), split into data (batches; for MAPA the tail
samples, the union of candidates and its gathers), forward, backward and optimizer. The ratio MAPA / IWAE of
the times to target is taken per seed at the same S (paired), then summarised by its geometric mean over
seeds. Writes docs/benchmarks/time_to_kl.json, docs/benchmarks/time_to_kl.png and the section
"Time to a target vs decoder size" of docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import statistics
import time
from pathlib import Path

from mapa_exp.cli import description

ROOT = Path(__file__).resolve().parents[1]
HEADING = "Time to a target vs decoder size: MAPA vs IWAE"


def decoder_hidden(label: str) -> list[int]:
    """"3x512" -> [512, 512, 512]."""
    depth, _, width = label.partition("x")
    if not (depth.isdigit() and width.isdigit() and int(depth) >= 1 and int(width) >= 1):
        raise SystemExit(f"error: --decoders {label!r}: must look like 3x512 (depth x width)")
    return [int(width)] * int(depth)


def compose(dataset: str, method: str, S: int, K: int | None, decoder: str, seed: int, extra: list[str]):
    from mapa_exp.config import compose as compose_config

    overrides = [f"dataset={dataset}", f"method={method}", f"method.S={S}", f"seed={seed}",
                 f"net.decoder.hidden=[{','.join(map(str, decoder_hidden(decoder)))}]", *extra]
    if K is not None:
        overrides.append(f"method.K={K}")
    return compose_config("train", overrides)


class Candidate:
    """One configuration in training: its module, data, optimizer, training time so far and score history."""

    def __init__(self, dataset, method, S, K, decoder, seed, args):
        import torch

        from mapa_exp.runs.training import build

        extra = [f"paths.cache_dir={args.cache_dir}"]
        if dataset != "digits":
            extra.append(f"dataset.draw={seed}")
        self.cfg = compose(dataset, method, S, K, decoder, seed, extra)
        self.dataset, self.method, self.S, self.K, self.decoder, self.seed = dataset, method, S, K, decoder, seed
        self.dm, self.module = build(self.cfg)
        self.dm.setup("fit")
        self.module.setup_data(self.dm)
        self.module.to(args.device)
        self.optimizer = self.module.configure_optimizers()
        self.train_s, self.epochs, self.history, self.split = 0.0, 0, [], {}
        self.steps = self.points = self.passes_decoder = self.passes_encoder = 0
        self.reached_at = None
        self.decoder_params = int(self.module.decoder.params.shape[1])
        self.sync = torch.cuda.synchronize if args.device.startswith("cuda") else None

    @property
    def name(self) -> str:
        return "IWAE" if self.method == "iwae" else f"MAPA K={self.K}"

    def train(self, epochs: int, timed_phases: bool) -> None:
        from mapa_exp.benchmarking import bare_epoch

        for _ in range(epochs):
            # on the CPU the phase clocks cost ~1 us a step and change nothing; on a GPU they need a sync at
            # every phase boundary, so there the phases come from a separate timing pass (split_pass)
            done = bare_epoch(self.module, self.optimizer, self.dm, split=self.split if timed_phases else None)
            if self.sync is not None:
                self.sync()
            self.train_s += done["seconds"]
            self.epochs += 1
            for k in ("steps", "points", "passes_decoder", "passes_encoder"):
                setattr(self, k, getattr(self, k) + done[k])

    def split_pass(self) -> dict:
        """Per-step seconds of each phase over one synchronised epoch (a GPU's; on the CPU see ``train``)."""
        from mapa_exp.benchmarking import bare_epoch

        split = {}
        done = bare_epoch(self.module, self.optimizer, self.dm, split=split, sync=self.sync)
        return {k: v / done["steps"] for k, v in split.items()}


class Scorer:
    """The target's measure for one data set and draw: test KL (Figure-8) or test log-likelihood (digits)."""

    def __init__(self, c: Candidate, args):
        from mapa_exp.evaluation.estimators import QuadratureEstimator, standard_model

        self.digits = c.dataset == "digits"
        self.target = args.target_ll if self.digits else args.target_kl
        self.est = QuadratureEstimator(J_1d=2000, J_2d=args.digits_J, check_convergence=False)
        self.x_test = c.dm.member_x("test", 0)
        self.gt_ll = None
        if not self.digits:
            gt = c.dm.truth(0)
            res, _ = self.est.evaluate(standard_model(gt.decoder, gt.likelihood, gt.latent_dim), None,
                                       {"test": self.x_test})
            self.gt_ll = res["test"][0].double()

    def __call__(self, c: Candidate) -> float:
        import torch

        from mapa_exp.evaluation.evaluate import model_of_module

        c.module.eval()  # (on the CPU: run_group moves it there for scoring)
        with torch.no_grad():
            x = {s: c.dm.member_x(s, 0) for s in ("train", "val")}  # the prior chosen on validation data
            model = model_of_module(c.module, x, 0, {"quadrature": self.est}, **dict(c.cfg.prior_recovery))
            res, _ = self.est.evaluate(model, None, {"test": self.x_test})
        ll = res["test"][0].double()
        return float(ll.mean()) if self.digits else float((self.gt_ll - ll).mean())

    def reached(self, value: float) -> bool:
        return value >= self.target if self.digits else value <= self.target


def run_group(dataset: str, decoder: str, seed: int, args) -> list[dict]:
    """The six configurations of one (data set, decoder, seed), trained interleaved until each reaches the
    target or ``--max-epochs``."""
    cands = [Candidate(dataset, m, S, K, decoder, seed, args)
             for S in args.S for m, K in (("iwae", None), ("mapa", max(1, math.ceil(0.1 * S))),
                                          ("mapa", max(1, math.ceil(0.5 * S))))]
    scorer = Scorer(cands[0], args)
    device = args.device
    for c in cands:  # one warm-up epoch, not counted (allocations, caches, lazy initialisation)
        c.train(1, timed_phases=False)
        c.train_s, c.epochs, c.steps, c.points, c.passes_decoder, c.passes_encoder = 0.0, 0, 0, 0, 0, 0
    active = list(cands)
    while active:
        for c in list(active):
            c.train(min(args.every, args.max_epochs - c.epochs), timed_phases=not device.startswith("cuda"))
            c.module.to("cpu")
            value = scorer(c)
            c.module.to(device)
            c.history.append({"epoch": c.epochs, "train_s": c.train_s, "value": value})
            if scorer.reached(value):
                c.reached_at = len(c.history) - 1
            if c.reached_at is not None or c.epochs >= args.max_epochs:
                active.remove(c)
        print(f"{dataset} {decoder} seed {seed}: " + ", ".join(
            f"{c.name} S={c.S} e{c.epochs} {c.history[-1]['value']:.3f}" for c in cands), flush=True)
    rows = []
    for c in cands:
        split = c.split_pass() if device.startswith("cuda") else {k: v / max(c.steps, 1) for k, v in c.split.items()}
        hit = c.history[c.reached_at] if c.reached_at is not None else None
        rows.append({
            "dataset": dataset, "decoder": decoder, "decoder_params": c.decoder_params, "seed": seed, "S": c.S,
            "method": c.method, "K": c.K, "name": c.name, "device": device, "target": scorer.target,
            "date": time.strftime("%Y-%m-%d"), "reached": hit is not None,
            "time_to_target_s": hit["train_s"] if hit else None, "epochs_to_target": hit["epoch"] if hit else None,
            "train_s": c.train_s, "epochs": c.epochs, "final_value": c.history[-1]["value"],
            "step_ms": 1000 * c.train_s / max(c.steps, 1), "split_ms": {k: 1000 * v for k, v in split.items()},
            "passes_per_point_decoder": c.passes_decoder / max(c.points, 1),
            "passes_per_point_encoder": c.passes_encoder / max(c.points, 1), "history": c.history,
        })
    return rows


# -- summary, table, figure ------------------------------------------------------------------------------
def k_rule(row: dict) -> str:
    return "IWAE" if row["method"] == "iwae" else ("K=ceil(0.1S)" if row["K"] == max(1, math.ceil(0.1 * row["S"]))
                                                 else "K=ceil(0.5S)")


def ratios(rows: list[dict]) -> list[dict]:
    """Per (device, data set, decoder, S, MAPA's K rule): MAPA / IWAE time to target, paired by seed.

    A seed where IWAE missed the target but MAPA reached it gives an upper bound (MAPA's time / IWAE's whole
    training time); where MAPA missed it, no ratio (counted in ``missed``)."""
    out = {}
    for r in rows:
        if r["method"] == "iwae":
            continue
        ref = next(x for x in rows if x["method"] == "iwae" and all(
            x[k] == r[k] for k in ("device", "dataset", "decoder", "S", "seed")))
        key = (r["device"], r["dataset"], r["decoder"], r["S"], k_rule(r))
        o = out.setdefault(key, {"device": key[0], "dataset": key[1], "decoder": key[2], "S": key[3], "rule": key[4],
                                 "decoder_params": r["decoder_params"], "ratios": [], "bounds": [], "missed": 0,
                                 "step_ratios": [], "epoch_ratios": []})
        o["step_ratios"].append(r["step_ms"] / ref["step_ms"])
        if not r["reached"]:
            o["missed"] += 1
        elif ref["reached"]:
            o["ratios"].append(r["time_to_target_s"] / ref["time_to_target_s"])
            o["epoch_ratios"].append(r["epochs_to_target"] / ref["epochs_to_target"])
        else:
            o["bounds"].append(r["time_to_target_s"] / ref["train_s"])
    for o in out.values():
        o["geo_mean"] = math.exp(statistics.fmean(map(math.log, o["ratios"]))) if o["ratios"] else None
        o["step_ratio"] = math.exp(statistics.fmean(map(math.log, o["step_ratios"])))
        o["epoch_ratio"] = math.exp(statistics.fmean(map(math.log, o["epoch_ratios"]))) if o["epoch_ratios"] else None
    return sorted(out.values(), key=lambda o: (o["device"], o["dataset"], o["S"], o["rule"], o["decoder_params"]))


def crossover(summary: list[dict]) -> list[str]:
    """Per (device, data set, S, rule): the smallest decoder whose time-to-target ratio is below 1."""
    lines, groups = [], {}
    for o in summary:
        groups.setdefault((o["device"], o["dataset"], o["S"], o["rule"]), []).append(o)
    for (device, dataset, S, rule), items in groups.items():
        items.sort(key=lambda o: o["decoder_params"])
        faster = [o for o in items if o["geo_mean"] is not None and o["geo_mean"] < 1]
        first = faster[0] if faster else None
        every_seed = [o["decoder"] for o in items if o["ratios"] and max(o["ratios"]) < 1]
        lines.append(f"{dataset}, S = {S}, MAPA {rule} ({device}): " + (
            (f"faster than IWAE on the geometric mean from decoder {first['decoder']} on"
             + (" (at every size measured)" if first is items[0] else " (slower below it)")
             + (f"; faster in every seed at {', '.join(every_seed)}" if every_seed else "; not faster in every seed at any size"))
            if first else "not faster than IWAE at any decoder size measured"))
    return lines


def fmt_ratio(o: dict) -> str:
    if o["geo_mean"] is None and not o["bounds"]:
        return "—"
    parts = []
    if o["geo_mean"] is not None:
        parts.append(f"**{o['geo_mean']:.2f}**" + (f" [{min(o['ratios']):.2f}, {max(o['ratios']):.2f}]"
                                                   if len(o["ratios"]) > 1 else ""))
    if o["bounds"]:
        parts.append(f"< {max(o['bounds']):.2f} ({len(o['bounds'])} seed(s) IWAE missed the target)")
    return "; ".join(parts)


def seeds_text(rows: list[dict]) -> str:
    """The seeds each data set ran with (runs appended with --append may differ)."""
    by = {}
    for r in rows:
        by.setdefault(r["dataset"], set()).add(r["seed"])
    return "; ".join(f"{d} {', '.join(map(str, sorted(s)))}" for d, s in sorted(by.items()))


def per_dataset(rows: list[dict], key: str) -> dict:
    """{data set: the one value of ``key`` its rows share} (an --append run may differ from the others)."""
    by = {}
    for r in rows:
        by.setdefault(r["dataset"], set()).add(r[key])
    bad = {d: v for d, v in by.items() if len(v) != 1}
    if bad:
        raise SystemExit(f"error: rows of one data set disagree on {key}: {bad}")
    return {d: v.pop() for d, v in sorted(by.items())}


def render(data: dict, figure: str | None) -> str:
    meta, rows = data["meta"], data["rows"]
    summary = ratios(rows)
    targets = per_dataset(rows, "target")
    dates = per_dataset(rows, "date")
    target_text = "; ".join(
        f"digits test log-likelihood >= {t} nats per image (quadrature, {meta['digits_J']}² nodes)" if d == "digits"
        else f"{d} test KL <= {t} nats (exact)" for d, t in targets.items())
    out = [f"Measured by `python scripts/bench_time_to_kl.py` on {meta['machine']} (torch {meta['torch']}, "
           f"{meta['threads']} thread(s); " + ", ".join(f"{d} on {t}" for d, t in dates.items())
           + f"): seeds {seeds_text(rows)}, at most {meta['max_epochs']} "
           f"epochs, scored every {meta['every']} (scoring excluded). Targets: {target_text}. "
           "Encoder / g_phi 2 x 50 throughout; batch 100.", "",
           "**Time to target, MAPA / IWAE at the same S** (geometric mean over seeds [min, max]; < 1: MAPA "
           "faster), split into its two factors: the per-step time ratio and the ratio of epochs to target (both "
           "geometric means; their product is the time ratio where every seed reached the target):", "",
           "| device | data | decoder | decoder params | S | MAPA K | time-to-target ratio | step-time ratio | epochs ratio | MAPA missed |",
           "|---|---|---|---:|---:|---|---|---:|---:|---:|"]
    for o in summary:
        out.append(f"| {o['device']} | {o['dataset']} | {o['decoder']} | {o['decoder_params']:,} | {o['S']} | "
                   f"{o['rule']} | {fmt_ratio(o)} | {o['step_ratio']:.2f} | "
                   f"{'—' if o['epoch_ratio'] is None else format(o['epoch_ratio'], '.2f')} | {o['missed']} |")
    out += ["", "Crossover:", ""] + [f"- {line}" for line in crossover(summary)]
    out += ["", "**Where a step's time goes** (ms per step, mean over seeds; epochs and seconds to target: median "
            "over the seeds that reached it):", "",
            "| device | data | decoder | S | method | data | forward | backward | optimizer | step | decoder passes / point | epochs to target | time to target (s) | reached |",
            "|---|---|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    groups = {}
    for r in rows:
        groups.setdefault((r["device"], r["dataset"], r["decoder_params"], r["decoder"], r["S"], r["name"]), []).append(r)
    for (device, dataset, _, decoder, S, name), rs in sorted(groups.items(), key=lambda kv: (kv[0][:3], kv[0][4], kv[0][5])):
        ms = {k: statistics.fmean(r["split_ms"].get(k, 0.0) for r in rs) for k in ("data", "forward", "backward", "optimizer")}
        hit = [r["time_to_target_s"] for r in rs if r["reached"]]
        epochs_hit = [r["epochs_to_target"] for r in rs if r["reached"]]
        out.append(f"| {device} | {dataset} | {decoder} | {S} | {name} | {ms['data']:.2f} | {ms['forward']:.2f} | "
                   f"{ms['backward']:.2f} | {ms['optimizer']:.2f} | {statistics.fmean(r['step_ms'] for r in rs):.2f} | "
                   f"{statistics.fmean(r['passes_per_point_decoder'] for r in rs):.2f} | "
                   f"{statistics.median(epochs_hit):g} | {statistics.median(hit):.1f} | {len(hit)}/{len(rs)} |" if hit else
                   f"| {device} | {dataset} | {decoder} | {S} | {name} | {ms['data']:.2f} | {ms['forward']:.2f} | "
                   f"{ms['backward']:.2f} | {ms['optimizer']:.2f} | {statistics.fmean(r['step_ms'] for r in rs):.2f} | "
                   f"{statistics.fmean(r['passes_per_point_decoder'] for r in rs):.2f} | — | — | 0/{len(rs)} |")
    if figure:
        out += ["", f"![time-to-target ratio against decoder size]({figure})"]
    return "\n".join(out)


def draw(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker

    from mapa_exp.io import atomic_write_bytes
    from mapa_exp.sweeps.plots import log_ticks

    summary = [o for o in ratios(data["rows"]) if o["geo_mean"] is not None]
    datasets = sorted({o["dataset"] for o in summary})
    fig, axes = plt.subplots(1, max(1, len(datasets)), figsize=(5.2 * max(1, len(datasets)), 4.0), squeeze=False)
    styles = {(10, "K=ceil(0.1S)"): ("tab:blue", "o", "-"), (10, "K=ceil(0.5S)"): ("tab:blue", "s", "--"),
              (50, "K=ceil(0.1S)"): ("tab:red", "o", "-"), (50, "K=ceil(0.5S)"): ("tab:red", "s", "--")}
    for ax, dataset in zip(axes[0], datasets):
        for (device, S, rule) in sorted({(o["device"], o["S"], o["rule"]) for o in summary if o["dataset"] == dataset}):
            pts = sorted((o["decoder_params"], o["geo_mean"], min(o["ratios"]), max(o["ratios"]), o["decoder"])
                         for o in summary if (o["dataset"], o["device"], o["S"], o["rule"]) == (dataset, device, S, rule))
            color, marker, ls = styles.get((S, rule), ("0.3", "^", ":"))
            x = [p[0] for p in pts]
            ax.errorbar(x, [p[1] for p in pts], yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                        color=color, marker=marker, ls=ls if device == "cpu" else "-.", capsize=3,
                        label=f"S = {S}, MAPA {rule.replace('ceil', '⌈').replace('S)', 'S⌉').replace('(', '')}"
                              + (f" ({device})" if device != "cpu" else ""))
        ax.axhline(1.0, color="0.4", lw=0.8)
        ax.axhline(0.3, color="0.4", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_yscale("log")
        sizes = sorted({(o["decoder_params"], o["decoder"]) for o in summary if o["dataset"] == dataset})
        ax.set_xticks([p for p, _ in sizes], [f"{d}\n{p:,}" for p, d in sizes], fontsize=7)
        ax.xaxis.set_minor_locator(ticker.NullLocator())
        ax.set_xlim(sizes[0][0] / 2, sizes[-1][0] * 2)
        log_ticks(ax.yaxis)
        ax.set_xlabel("decoder (depth x width) and its parameters, log scale")
        ax.set_ylabel("time to target, MAPA / IWAE (log scale)")
        ax.set_title(dataset)
    handles, labels = axes[0, 0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=8, frameon=False)
    fig.subplots_adjust(bottom=0.28)
    fig.suptitle("MAPA / IWAE training time to target (geometric mean over seeds, min-max bars); "
                 "below 1: MAPA faster; dotted: 0.3", fontsize=9)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    import io

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=130)
    plt.close(fig)
    atomic_write_bytes(path, buf.getvalue())


def main() -> None:
    p = argparse.ArgumentParser(description=description(__doc__))
    p.add_argument("--datasets", nargs="+", default=["figure8", "digits"], choices=["figure8", "digits"])
    p.add_argument("--decoders", nargs="+", default=["2x50", "3x128", "3x256", "3x512"])
    p.add_argument("--S", nargs="+", type=int, default=[10, 50])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    p.add_argument("--target-kl", type=float, default=0.1, help="Figure-8: test KL target (nats)")
    p.add_argument("--target-ll", type=float, default=-30.0, help="digits: test log-likelihood target (nats/image)")
    p.add_argument("--digits-J", type=int, default=100, help="digits: quadrature nodes per latent axis")
    p.add_argument("--max-epochs", type=int, default=300)
    p.add_argument("--every", type=int, default=5)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cache-dir", default=os.environ.get("MAPA_EXP_CACHE", str(ROOT / "outputs" / ".cache")))
    p.add_argument("--json", type=Path, default=ROOT / "docs" / "benchmarks" / "time_to_kl.json")
    p.add_argument("--figure", type=Path, default=ROOT / "docs" / "benchmarks" / "time_to_kl.png")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--append", action="store_true", help="keep the JSON's rows of other devices / data sets")
    p.add_argument("--render-only", action="store_true", help="rewrite the docs section and figure from --json")
    args = p.parse_args()
    from mapa_exp.benchmarking import write_markdown_section
    from mapa_exp.io import atomic_write_json

    if not args.render_only:
        import torch

        for d in args.decoders:
            decoder_hidden(d)
        if args.device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit(f"error: --device {args.device}: no CUDA device here")
        torch.set_num_threads(args.threads)
        rows = []
        if args.append and args.json.exists():
            old = json.loads(args.json.read_text())
            rows = [r for r in old.get("rows", []) if (r["device"], r["dataset"]) not in
                    {(args.device, d) for d in args.datasets}]
            for r in rows:  # rows from before targets and dates were kept per row: the old run's own
                r.setdefault("target", old["meta"]["target_ll" if r["dataset"] == "digits" else "target_kl"])
                r.setdefault("date", old["meta"]["date"])
        for dataset in args.datasets:
            for decoder in args.decoders:
                for seed in args.seeds:
                    rows += run_group(dataset, decoder, seed, args)
                    data = {"meta": {"machine": f"{platform.machine()}, {os.cpu_count()} cores"
                                     + (f", {torch.cuda.get_device_name()}" if args.device.startswith("cuda") else ""),
                                     "torch": torch.__version__,
                                     "threads": args.threads, "seeds": args.seeds, "max_epochs": args.max_epochs,
                                     "every": args.every,
                                     "digits_J": args.digits_J}, "rows": rows}
                    atomic_write_json(args.json, data)  # after every group: a long run keeps what it measured
    data = json.loads(args.json.read_text())
    draw(data, args.figure)
    figure = os.path.relpath(args.figure, args.docs.parent)
    write_markdown_section(args.docs, HEADING, render(data, figure))
    print(render(data, figure))


if __name__ == "__main__":
    main()
