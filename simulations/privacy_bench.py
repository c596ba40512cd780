"""Differential-privacy benchmark: privacy-utility, DP-SGD step cost, membership inference.

``python -m consilia.simulations.privacy_bench [--out DIR] [--parts utility,cost]
[--docs docs/benchmarks.md]`` runs, on this machine's CPUs:

1. **Privacy-utility** — the same federation (5 IID sites, FedAvg, local DP-SGD with Opacus at
   each site) at ε ∈ {∞, 8, 3, 1} on MedNIST and PneumoniaMNIST; test AUC/accuracy of the
   final global model and the ε each site spent. Each federation is an ``fl-sim`` run
   (:func:`consilia.simulations.run.run_experiment`) whose Flower transport is the in-process
   grid (:mod:`consilia.simulations.inprocess`: same ServerApp, ClientApp and wire format,
   no Ray start-up per run).
2. **Membership inference** (:mod:`consilia.simulations.mia`) against the final global model
   of the ε ∈ {∞, 8, 3} runs: loss-threshold and LiRA attack AUCs (``privacy_audit.json`` in
   each run directory, shown by ``fl-report``).
3. **Step cost** — time and peak memory of one DP-SGD step vs a plain step, per registered
   model and grad-sample mode (1 thread, fixed batch, noise 1.0, clip 1.0).

Results: ``DIR/privacy_bench.json`` and ``DIR/privacy_bench.md``; ``--docs`` replaces the
``## Differential privacy`` section of that Markdown file with the new figures.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import gc
import json
import logging
import math
import re
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any
from unittest import mock

import torch

__all__ = ["DATASETS", "EPSILONS", "main", "measure_step_cost", "run_utility"]

log = logging.getLogger("consilia.privacy_bench")

EPSILONS: tuple[float, ...] = (math.inf, 8.0, 3.0, 1.0)
MIA_EPSILONS: tuple[float, ...] = (math.inf, 8.0, 3.0)

#: Per-dataset overrides (on top of :data:`COMMON`).
DATASETS: dict[str, list[str]] = {
    "mednist": ["data.dataset=mednist", "data.image_size=32", "data.max_samples=4000"],
    "pneumoniamnist": ["data.dataset=pneumoniamnist"],
}

#: The federation every ε shares (only ``dp.*`` changes between runs).
COMMON: list[str] = [
    "partition.num_sites=5", "partition.scheme=iid", "partition.site_val_fraction=0.2",
    "model.name=cnn", "model.kwargs={width: 16}",
    "strategy.name=fedavg", "strategy.rounds=10", "strategy.min_train_sites=5",
    "strategy.min_evaluate_sites=5", "strategy.min_available_sites=5",
    "train.local_epochs=2", "train.batch_size=64", "train.lr=0.005", "train.optimizer=adam",
    "baselines.centralized=false", "baselines.local_only=false",
    "dp.max_grad_norm=1.0", "dp.accountant=rdp",
]

SECTION = "## Differential privacy"


def _eps_name(eps: float) -> str:
    return "inf" if math.isinf(eps) else f"{eps:g}"


def _dp_overrides(eps: float) -> list[str]:
    if math.isinf(eps):
        return ["dp.enabled=false"]
    return ["dp.enabled=true", "dp.mode=local", f"dp.target_epsilon={eps}"]


# ---------------------------------------------------------------------------------------
# 1 + 2: privacy-utility and membership inference
# ---------------------------------------------------------------------------------------


def run_utility(
    out: Path, datasets: Sequence[str], epsilons: Sequence[float], mia_epsilons: Sequence[float],
    shadows: int, per_group: int, extra: Sequence[str] = (),
) -> list[dict[str, Any]]:
    """Run one federation per (dataset, ε); audit the ``mia_epsilons`` ones. Return rows."""
    from consilia.common.config import load_experiment_config
    from consilia.simulations import run as run_module
    from consilia.simulations.inprocess import run_inprocess_simulation
    from consilia.simulations.mia import audit_run

    rows = []
    for dataset in datasets:
        for eps in epsilons:
            overrides = [*COMMON, *DATASETS[dataset], *_dp_overrides(eps), *extra,
                         f"name=dp-{dataset}-eps-{_eps_name(eps)}"]
            cfg = load_experiment_config(None, overrides)
            run_dir = out / "runs" / f"{dataset}-eps-{_eps_name(eps)}"
            start = time.perf_counter()
            with mock.patch.object(run_module, "run_flower_simulation",
                                   run_inprocess_simulation):
                result = run_module.run_experiment(cfg, run_dir)
            seconds = time.perf_counter() - start
            rounds = [json.loads(line) for line in
                      (run_dir / "metrics" / "rounds.jsonl").read_text().splitlines() if line]
            spent = [v.get("epsilon") for r in rounds for v in (r.get("sites") or {}).values()
                     if isinstance(v, dict) and v.get("epsilon") is not None]
            fed = result.final["federated"]
            row: dict[str, Any] = {
                "dataset": dataset, "epsilon": _eps_name(eps),
                "auc": fed.get("auc"), "accuracy": fed.get("accuracy"),
                "balanced_accuracy": fed.get("balanced_accuracy"),
                "max_epsilon_spent": max(spent) if spent else None,
                "noise_multiplier": _noise_multiplier(run_dir),
                "seconds": round(seconds, 1), "run_dir": str(run_dir),
                "n_train_per_site": _site_sizes(run_dir),
                "n_test": fed.get("num_samples"),
            }
            if eps in mia_epsilons:
                audit = audit_run(run_dir, shadows=shadows, per_group=per_group, seed=0)
                row["mia"] = audit.to_dict()
            log.info("%s ε=%s: AUC %.4f acc %.4f (ε spent %s) in %.0f s%s", dataset,
                     _eps_name(eps), row["auc"], row["accuracy"], row["max_epsilon_spent"],
                     seconds, f"; MIA loss AUC {row['mia']['loss_auc']:.3f}, LiRA AUC "
                     f"{row['mia']['lira_auc']:.3f}" if "mia" in row else "")
            rows.append(row)
    return rows


def _noise_multiplier(run_dir: Path) -> float | None:
    ledgers = sorted((run_dir / "site-state").glob("*/privacy-ledger.json"))
    for path in ledgers:
        data = json.loads(path.read_text())
        for entry in data.get("entries", {}).values():
            for cal in entry.get("calibrations", {}).values():
                return float(cal["noise_multiplier"])
    return None


def _site_sizes(run_dir: Path) -> list[int]:
    import numpy as np

    sizes = []
    for path in sorted((run_dir / "sites").glob("site-*.npz")):
        with np.load(path) as z:
            sizes.append(int(z["train_labels"].shape[0]))
    return sizes


# ---------------------------------------------------------------------------------------
# 3: per-step cost
# ---------------------------------------------------------------------------------------


def _status_kib(field: str) -> int | None:
    try:
        text = Path("/proc/self/status").read_text()
    except OSError:
        return None
    match = re.search(rf"^{field}:\s+(\d+)\s+kB", text, re.M)
    return int(match.group(1)) if match else None


def _peak_rss_mib(fn: Callable[[], None]) -> float | None:
    """Run ``fn``; return the peak resident-memory increase in MiB (Linux ``VmHWM``)."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kib("VmRSS")
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    except OSError:
        base = None
    fn()
    peak = _status_kib("VmHWM")
    if base is None or peak is None:
        return None
    return max(peak - base, 0) / 1024


def measure_step_cost(
    model_name: str, mode: str | None, image_size: int = 32, batch: int = 32,
    steps: int = 3, num_classes: int = 6,
) -> dict[str, Any]:
    """Median time and peak memory of one (DP-)SGD step; ``mode=None`` is non-private.

    Parameters
    ----------
    model_name : str
        A registered model.
    mode : str or None
        Opacus grad-sample mode, or None for a plain step.
    image_size, batch, steps, num_classes
        Input geometry, batch size, timed steps (after one warm-up step).

    Returns
    -------
    dict
        ``ms`` (median), ``peak_mib`` (RSS increase over the timed steps) or ``error``.

    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from consilia.common.models import build_model

    torch.manual_seed(0)
    model = build_model(model_name, 1, num_classes, image_size)
    data = TensorDataset(torch.rand(batch * (steps + 1), 1, image_size, image_size),
                         torch.randint(0, num_classes, (batch * (steps + 1),)))
    loader = DataLoader(data, batch_size=batch)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    criterion: Any = torch.nn.CrossEntropyLoss()
    try:
        if mode is not None:
            engine = PrivacyEngine(accountant="rdp")
            kwargs = {"criterion": criterion} if mode == "ghost" else {}
            out = engine.make_private(module=model, optimizer=optimizer, data_loader=loader,
                                      noise_multiplier=1.0, max_grad_norm=1.0,
                                      poisson_sampling=False, grad_sample_mode=mode, **kwargs)
            if mode == "ghost":
                model, optimizer, criterion, loader = out
            else:
                model, optimizer, loader = out
        model.train()
        batches = list(loader)
        times: list[float] = []

        def step(images: torch.Tensor, labels: torch.Tensor) -> None:
            t0 = time.perf_counter()
            optimizer.zero_grad(set_to_none=True)
            criterion(model(images), labels).backward()
            optimizer.step()
            times.append(time.perf_counter() - t0)

        step(*batches[0])  # warm-up
        times.clear()
        peak = _peak_rss_mib(lambda: [step(*b) for b in batches[1:steps + 1]])
        return {"ms": 1000 * statistics.median(times), "peak_mib": peak}
    except Exception as exc:  # noqa: BLE001 - an unsupported mode is a result, not a crash
        return {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"}


def run_cost(models: Sequence[str], modes: Sequence[str], image_size: int, batch: int,
             steps: int) -> list[dict[str, Any]]:
    """Measure every model non-private and in every mode; return one row per model."""
    rows = []
    for name in models:
        plain = measure_step_cost(name, None, image_size, batch, steps)
        row: dict[str, Any] = {"model": name, "plain": plain, "modes": {}}
        for mode in modes:
            res = measure_step_cost(name, mode, image_size, batch, steps)
            if "ms" in res and "ms" in plain:
                res["time_ratio"] = res["ms"] / plain["ms"]
            row["modes"][mode] = res
        log.info("cost %s: plain %s; %s", name, _fmt_cost(plain), "; ".join(
            f"{m} {_fmt_cost(r)}" for m, r in row["modes"].items()))
        rows.append(row)
    return rows


def _fmt_cost(res: dict[str, Any]) -> str:
    if "error" in res:
        return "fails"
    ratio = f" ({res['time_ratio']:.1f}×)" if "time_ratio" in res else ""
    mem = f", {res['peak_mib']:.0f} MiB" if res.get("peak_mib") is not None else ""
    return f"{res['ms']:.0f} ms{ratio}{mem}"


# ---------------------------------------------------------------------------------------
# Report
# ---------------------------------------------------------------------------------------


def _f(value: Any, digits: int = 4) -> str:
    return "n/a" if value is None else f"{value:.{digits}f}"


def to_markdown(results: dict[str, Any]) -> str:
    """Render the ``## Differential privacy`` section of docs/benchmarks.md."""
    lines = [SECTION, ""]
    env = results["environment"]
    lines += [f"Measured {env['date']} on {env['machine']} (CPU only, torch threads: "
              f"{env['threads']}), torch {env['torch']}, opacus {env['opacus']}, "
              f"flwr {env['flwr']}. Command:", "", "```", results["command"], "```", ""]
    utility = results.get("utility") or []
    if utility:
        lines += _utility_markdown(utility, results)
    cost = results.get("cost") or []
    if cost:
        lines += _cost_markdown(cost, results)
    return "\n".join(lines).rstrip() + "\n"


def _utility_markdown(rows: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    out = ["### Privacy-utility (local DP-SGD at every site)", "",
           "Same federation for every ε: " + ", ".join(f"`{o}`" for o in COMMON) + ". "
           "MedNIST: `" + "`, `".join(DATASETS["mednist"]) + "` (the shared 1-in-5 subset, "
           "resized to 32 px, a 4000-image training pool; random 70/10/20 split). "
           "PneumoniaMNIST: the derived file `medmnist-derived/pneumoniamnist_trainsubset.npz` "
           "(3882 training images, 10 % normal; official 624-image test split). IID "
           "partitions isolate the effect of DP from non-IID drift. Budget per site = the "
           "run's ε over all rounds (RDP accountant, δ = min(1e-5, 1/(10 n))); ε = ∞ is "
           "training without DP. Test metrics: the final global model on the common test "
           "split.", "",
           "| dataset | ε target | ε spent (max site) | noise σ | test AUC | ΔAUC vs ∞ "
           "| test accuracy | run time |",
           "|---|---|---|---|---|---|---|---|"]
    base = {r["dataset"]: r["auc"] for r in rows if r["epsilon"] == "inf"}
    verdicts = []
    for r in rows:
        drop = None if r["dataset"] not in base else base[r["dataset"]] - r["auc"]
        out.append(f"| {r['dataset']} | {r['epsilon'].replace('inf', '∞')} | "
                   f"{_f(r['max_epsilon_spent'], 2)} | {_f(r['noise_multiplier'], 3)} | "
                   f"{_f(r['auc'])} | {'' if drop is None or r['epsilon'] == 'inf' else _f(drop)}"
                   f" | {_f(r['accuracy'])} | {r['seconds']:.0f} s |")
        limit = {"8": 0.02, "3": 0.05}.get(r["epsilon"])
        if limit is not None and drop is not None:
            verdicts.append(f"{r['dataset']} ε={r['epsilon']}: AUC drop {drop:.4f} "
                            f"(target ≤ {limit}) — {'met' if drop <= limit else 'NOT met'}")
    out += ["", "Targets (AUC drop at ε=8 ≤ 0.02, at ε=3 ≤ 0.05): " + "; ".join(verdicts)
            + ".", ""]
    audited = [r for r in rows if "mia" in r]
    if audited:
        shadows = audited[0]["mia"]["shadows"]
        out += ["### Privacy audit: membership inference against the final global model", "",
                "Members: the sites' training images; non-members: the test split (never "
                "trained on); class-matched, equal numbers. Loss threshold: score = −loss "
                "(same ranking as the confidence p(y|x)). LiRA: online, global variance, "
                f"{shadows} shadow models trained centrally with the run's recipe (same model,"
                " optimizer, batch, rounds × local epochs, and DP-SGD at the same ε) on "
                "random halves of the audit pool (`consilia.simulations.mia`). AUC 0.5 = "
                "chance.", "",
                "| dataset | ε | members / non-members | loss-attack AUC | loss TPR@1%FPR "
                "| LiRA AUC | LiRA TPR@1%FPR | train acc / test acc (audit pool) |",
                "|---|---|---|---|---|---|---|---|"]
        for r in audited:
            m = r["mia"]
            out.append(f"| {r['dataset']} | {r['epsilon'].replace('inf', '∞')} | "
                       f"{m['members']} / {m['non_members']} | {_f(m['loss_auc'], 3)} | "
                       f"{_f(m['loss_tpr_at_1pct_fpr'], 3)} | {_f(m['lira_auc'], 3)} | "
                       f"{_f(m['lira_tpr_at_1pct_fpr'], 3)} | {_f(m['train_accuracy'], 3)} / "
                       f"{_f(m['test_accuracy'], 3)} |")
        out.append("")
    return out


def _cost_markdown(rows: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    cfg = results["cost_config"]
    modes = list(rows[0]["modes"])
    out = ["### Cost of a DP-SGD step vs a non-private step", "",
           f"One optimizer step (forward, backward, per-sample clipping, noise, update), batch "
           f"{cfg['batch']}, {cfg['image_size']} px, 1 channel, 6 classes, SGD, 1 torch "
           f"thread; median of {cfg['steps']} steps after a warm-up. Memory: peak increase of "
           "the process's resident memory over those steps (Linux VmHWM after "
           "`clear_refs`). Cells: time (× non-private), peak MiB; *fails* = the mode cannot "
           "handle the model.", "",
           "| model | non-private | " + " | ".join(modes) + " | auto picks |",
           "|---|---|" + "---|" * len(modes) + "---|"]
    from consilia.client.privacy import choose_grad_sample_mode

    for r in rows:
        cells = [_fmt_cost(r["modes"][m]) for m in modes]
        out.append(f"| {r['model']} | {_fmt_cost(r['plain'])} | " + " | ".join(cells)
                   + f" | {choose_grad_sample_mode(r['model'])} |")
    default = next((r for r in rows if r["model"] == "cnn"), None)
    if default is not None:
        auto = choose_grad_sample_mode("cnn")
        ratio = default["modes"].get(auto, {}).get("time_ratio")
        if ratio is not None:
            out += ["", f"Default model (cnn, auto → {auto}): {ratio:.2f}× the non-private "
                    f"step (target ≤ 1.5×: {'met' if ratio <= 1.5 else 'NOT met'})."]
    return [*out, ""]


def update_docs(path: Path, section: str) -> None:
    """Replace (or append) the ``## Differential privacy`` section of ``path``."""
    text = path.read_text(encoding="utf-8") if path.is_file() else "# Benchmarks\n\n"
    start = text.find(SECTION + "\n")
    if start < 0:
        text = text.rstrip() + "\n\n" + section
    else:
        nxt = re.search(r"^## ", text[start + len(SECTION):], re.M)
        end = start + len(SECTION) + nxt.start() if nxt else len(text)
        text = text[:start] + section + ("\n" if nxt else "") + text[end:]
    path.write_text(text, encoding="utf-8")


# ---------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------


def _environment() -> dict[str, Any]:
    import platform
    from importlib import metadata

    return {"date": time.strftime("%Y-%m-%d"), "machine": f"{platform.machine()}, "
            f"{__import__('os').cpu_count()} cores", "threads": torch.get_num_threads(),
            "torch": torch.__version__, "opacus": metadata.version("opacus"),
            "flwr": metadata.version("flwr")}


def main(argv: Sequence[str] | None = None) -> int:
    """Run the benchmark; return the exit code."""
    from consilia.common.models import MODELS

    parser = argparse.ArgumentParser(prog="python -m consilia.simulations.privacy_bench",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/privacy-bench"))
    parser.add_argument("--parts", default="utility,cost", help="utility (with the MIA "
                        "audit), cost; comma-separated")
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--epsilons", default="inf,8,3,1")
    parser.add_argument("--shadows", type=int, default=8, help="LiRA shadow models (even)")
    parser.add_argument("--per-group", type=int, default=500,
                        help="members (and non-members) in the MIA audit")
    parser.add_argument("--models", default=",".join(MODELS.names()))
    parser.add_argument("--modes", default="hooks,functorch,ew,ghost")
    parser.add_argument("--cost-size", type=int, default=32)
    parser.add_argument("--cost-batch", type=int, default=32)
    parser.add_argument("--cost-steps", type=int, default=5)
    parser.add_argument("--docs", type=Path, default=None,
                        help="update this Markdown file's '## Differential privacy' section")
    parser.add_argument("overrides", nargs="*", help="extra section.field=value overrides")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    warnings.filterwarnings("ignore", category=UserWarning)
    warnings.filterwarnings("ignore", category=FutureWarning)
    torch.set_num_threads(1)
    parts = set(args.parts.split(","))
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, Any] = {
        "command": "python -m consilia.simulations.privacy_bench " + " ".join(
            sys.argv[1:] if argv is None else list(argv)),
        "environment": _environment(),
    }
    started = time.perf_counter()
    if "utility" in parts:
        epsilons = [math.inf if e == "inf" else float(e) for e in args.epsilons.split(",")]
        results["utility"] = run_utility(
            args.out, args.datasets.split(","), epsilons,
            [e for e in epsilons if e in MIA_EPSILONS], args.shadows, args.per_group,
            args.overrides)
    if "cost" in parts:
        results["cost_config"] = {"image_size": args.cost_size, "batch": args.cost_batch,
                                  "steps": args.cost_steps}
        results["cost"] = run_cost(args.models.split(","), args.modes.split(","),
                                   args.cost_size, args.cost_batch, args.cost_steps)
    results["seconds"] = round(time.perf_counter() - started, 1)
    (args.out / "privacy_bench.json").write_text(json.dumps(results, indent=2, default=str))
    section = to_markdown(results) + f"\nTotal benchmark time: {results['seconds']:.0f} s.\n"
    (args.out / "privacy_bench.md").write_text(section)
    if args.docs is not None:
        update_docs(args.docs, section)
    print(section)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
