"""Simulation benchmark (not a test): accuracy of FL vs baselines, and scaling with sites.

Run ``python -m benchmarks.simulation`` (or ``make bench``). It prints

1. PneumoniaMNIST (``medmnist-derived/pneumoniamnist_trainsubset.npz``, official test split),
   5 sites, Dirichlet alpha=0.5: test AUC/ACC of FedAvg, FedProx, centralized and local-only at
   equal sample-epochs, and the wall-time ratio FL / centralized;
2. how a simulated round's time grows with 10, 50 and 100 virtual sites (per-site per-round
   overhead, peak memory of the whole process tree: driver + Ray workers);

and writes the figures to ``docs/benchmarks.md`` (section "Simulation") with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import threading
import time
from pathlib import Path

from consilia.common.config import load_experiment_config
from consilia.common.logs import setup_logging
from consilia.common.rundir.round_records import read_round_records
from consilia.simulations.run import run_experiment

__all__ = ["main", "tree_rss_mb"]

SCENARIOS = Path(__file__).resolve().parent.parent / "simulations" / "scenarios"
REPO = Path(__file__).resolve().parent.parent
PAPER_AUC = 0.944  # MedMNIST v2, ResNet-18 (28), PneumoniaMNIST test AUC


def tree_rss_mb(root_pid: int) -> float:
    """Resident memory (MiB) of ``root_pid`` and all its descendants, read from /proc."""
    children: dict[int, list[int]] = {}
    rss: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            status = (entry / "status").read_text()
        except OSError:
            continue
        pid, ppid = int(entry.name), int(stat[1])
        children.setdefault(ppid, []).append(pid)
        for line in status.splitlines():
            if line.startswith("VmRSS:"):
                rss[pid] = int(line.split()[1])
    total, stack = 0, [root_pid]
    while stack:
        pid = stack.pop()
        total += rss.get(pid, 0)
        stack.extend(children.get(pid, []))
    return total / 1024


class PeakMemory:
    """Sample the process tree's RSS in a background thread; ``peak_mb`` after ``stop``."""

    def __init__(self, interval_s: float = 0.5) -> None:
        self.interval_s = interval_s
        self.peak_mb = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_mb = max(self.peak_mb, tree_rss_mb(os.getpid()))
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _rounds(run_dir: Path) -> list[dict]:
    return read_round_records(run_dir)


def accuracy_benchmark(out: Path, rounds: int) -> dict:
    """FedAvg vs FedProx vs centralized vs local-only on PneumoniaMNIST."""
    results: dict = {}
    for strategy in ("fedavg", "fedprox"):
        cfg = load_experiment_config(
            SCENARIOS / "pneumonia_fl.yaml",
            [f"strategy.name={strategy}", f"strategy.rounds={rounds}",
             f"baselines.centralized={strategy == 'fedprox'}",
             f"baselines.local_only={strategy == 'fedprox'}"],
        )
        res = run_experiment(cfg, out / f"pneumonia-{strategy}")
        results[strategy] = res.final["federated"]
        results[f"{strategy}_seconds"] = res.seconds["federated"]
        if "federated_before_calibration" in res.final:
            results[f"{strategy}_uncalibrated"] = res.final["federated_before_calibration"]
        if strategy == "fedprox":
            results["centralized"] = res.final["centralized"]
            results["centralized_seconds"] = res.seconds["centralized"]
            results["local_only"] = res.final["local_only"]["mean"]
            results["local_only_sites"] = {
                k: v for k, v in res.final["local_only"].items() if k != "mean"
            }
    return results


def scaling_benchmark(out: Path, site_counts: list[int], rounds: int) -> list[dict]:
    """Round time, per-site overhead and peak memory with many small virtual sites."""
    rows = []
    for n in site_counts:
        cfg = load_experiment_config(
            SCENARIOS / "pneumonia_fl.yaml",
            [f"partition.num_sites={n}", "partition.scheme=iid", f"strategy.rounds={rounds}",
             "strategy.name=fedavg", "baselines.centralized=false", "baselines.local_only=false",
             "partition.min_samples_per_site=5"],
        )
        with PeakMemory() as mem:
            t0 = time.perf_counter()
            res = run_experiment(cfg, out / f"scale-{n}")
            total = time.perf_counter() - t0
        rec = _rounds(res.run_dir)
        times = [b["elapsed_s"] - a["elapsed_s"] for a, b in zip(rec, rec[1:], strict=False)]
        later = times[1:] or times  # round 1 includes worker start-up
        per_round = sum(later) / len(later)
        rows.append({
            "sites": n, "first_round_s": times[0], "round_s": per_round,
            "per_site_s": per_round / n, "peak_mem_mb": mem.peak_mb, "total_s": total,
            "train_seconds_per_site": _mean_site_train_seconds(rec),
        })
    return rows


def _mean_site_train_seconds(records: list[dict]) -> float:
    values = [s.get("train-seconds") for r in records[2:] for s in (r.get("sites") or {}).values()
              if s.get("train-seconds") is not None]
    return sum(values) / len(values) if values else float("nan")


def render_markdown(acc: dict | None, scale: list[dict] | None, command: str) -> str:
    """Render the benchmark section for docs/benchmarks.md."""
    lines = ["## Simulation (`fl-sim`)", "", f"Command: `{command}`", "",
             "Machine: 2 CPU cores, no GPU (the CI machine).", ""]
    if acc:
        lines += ["### PneumoniaMNIST, 5 sites, Dirichlet alpha = 0.5, equal sample-epochs", "",
                  "Data: `medmnist-derived/pneumoniamnist_trainsubset.npz` — a MedMNIST v2 copy "
                  "with 826 of the 1,214 *normal* training images removed by its uploader; the "
                  "official validation and test splits are intact (624 test images).", "",
                  "| model | test AUC | test accuracy | wall time (s) |", "|---|---|---|---|"]
        for name, key in (("FedAvg", "fedavg"), ("FedProx", "fedprox"),
                          ("centralized (pooled)", "centralized"),
                          ("local-only (mean of 5 sites)", "local_only")):
            m = acc[key]
            secs = acc.get(f"{key}_seconds")
            lines.append(f"| {name} | {m['auc']:.4f} | {m['accuracy']:.4f} | "
                         f"{secs:.1f} |" if secs else
                         f"| {name} | {m['auc']:.4f} | {m['accuracy']:.4f} | — |")
            raw = acc.get(f"{key}_uncalibrated")
            if raw:
                lines.append(f"| {name}, before classifier calibration | {raw['auc']:.4f} | "
                             f"{raw['accuracy']:.4f} | — |")
        ratio = acc["fedprox_seconds"] / acc["centralized_seconds"]
        gap = acc["centralized"]["auc"] - acc["fedprox"]["auc"]
        lines += ["", "- FL rows: the scenario's recipe including classifier calibration after the "
                  "last round (`strategy.calibration`); wall time includes it.",
                  f"- Wall-time ratio FL (FedProx, incl. Ray start-up) / centralized: "
                  f"**{ratio:.2f}x**.",
                  f"- FedProx vs centralized AUC gap: **{gap:+.4f}** (target: within 0.01).",
                  f"- Paper anchor (MedMNIST v2 ResNet-18 at 28 px): AUC {PAPER_AUC}; FedProx "
                  f"{'beats' if acc['fedprox']['auc'] > PAPER_AUC else 'does not beat'} it "
                  "(note: our training set lacks 826 normal images, so this is not a like-for-like "
                  "comparison).", ""]
    if scale:
        lines += ["### Scaling with the number of virtual sites (IID PneumoniaMNIST, FedAvg)", "",
                  "| sites | first round (s) | later rounds (s) | per site per round (s) | "
                  "site train time (s) | peak memory, all processes (MiB) |",
                  "|---|---|---|---|---|---|"]
        for r in scale:
            lines.append(f"| {r['sites']} | {r['first_round_s']:.1f} | {r['round_s']:.2f} | "
                         f"{r['per_site_s']:.3f} | {r['train_seconds_per_site']:.3f} | "
                         f"{r['peak_mem_mb']:.0f} |")
        lines.append("")
    return "\n".join(lines)


def write_section(path: Path, section: str, title: str) -> None:
    """Replace (or append) the section starting with ``title`` in ``path``."""
    text = path.read_text() if path.exists() else "# Benchmarks\n\n"
    start = text.find(title)
    if start >= 0:
        end = text.find("\n## ", start + len(title))
        text = text[:start] + section.rstrip() + "\n" + (text[end:] if end >= 0 else "")
    else:
        text = text.rstrip() + "\n\n" + section.rstrip() + "\n"
    path.write_text(text)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark and update docs/benchmarks.md."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.simulation")
    parser.add_argument("--out", type=Path, default=Path("runs/bench"))
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--sites", default="10,50,100")
    parser.add_argument("--scale-rounds", type=int, default=3)
    parser.add_argument("--skip-accuracy", action="store_true")
    parser.add_argument("--skip-scaling", action="store_true")
    parser.add_argument("--doc", type=Path, default=REPO / "docs" / "benchmarks.md")
    argv = sys.argv[1:] if argv is None else argv
    args = parser.parse_args(argv)
    setup_logging()
    acc = None if args.skip_accuracy else accuracy_benchmark(args.out, args.rounds)
    scale = None if args.skip_scaling else scaling_benchmark(
        args.out, [int(s) for s in args.sites.split(",")], args.scale_rounds)
    command = "python -m benchmarks.simulation " + " ".join(argv)
    section = render_markdown(acc, scale, command.strip())
    print(section)
    (args.out / "bench.json").write_text(json.dumps({"accuracy": acc, "scaling": scale},
                                                     indent=2, default=str))
    write_section(args.doc, section, "## Simulation (`fl-sim`)")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
