"""Differential-privacy benchmark: privacy-utility, DP-SGD step cost, membership inference.

``python -m benchmarks.privacy [--out DIR] [--parts utility,cost]
[--docs docs/benchmarks.md]`` runs, on this machine's CPUs:

1. **Privacy-utility** — the same federation (5 IID sites, FedAvg, local DP-SGD with Opacus at
   each site) at ε ∈ {∞, 8, 3, 1} on MedNIST and PneumoniaMNIST; test AUC/accuracy of the
   final global model and the ε each site spent. Each federation is an ``fl-sim`` run
   (:func:`consilia.simulations.run.run_experiment`) whose Flower transport is the in-process
   grid (:mod:`consilia.simulations.inprocess`: same ServerApp, ClientApp and wire format,
   no Ray start-up per run).
2. **Membership inference** (:mod:`consilia.simulations.audits.membership_inference`) against
   the final global model of the ε ∈ {∞, 8, 3} runs: loss-threshold and LiRA attack AUCs
   (``privacy_audit.json`` in each run directory, shown by ``fl-report``).
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

from consilia.common.rundir.layout import RunDir
from consilia.common.rundir.round_records import read_round_records

__all__ = [
    "DATASETS", "EPSILONS", "main", "measure_default_overhead", "measure_step_cost",
    "null_auc_sd", "run_central",
    "run_utility", "to_markdown", "update_docs",
]

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
    from consilia.simulations.audits.membership_inference import audit_run
    from consilia.simulations.inprocess import run_inprocess_simulation

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
            rounds = read_round_records(run_dir)
            spent = [v.get("epsilon") for r in rounds for v in (r.get("sites") or {}).values()
                     if isinstance(v, dict) and v.get("epsilon") is not None]
            fed = result.final["federated"]
            row: dict[str, Any] = {
                "dataset": dataset, "epsilon": _eps_name(eps),
                "auc": fed.get("auc"), "accuracy": fed.get("accuracy"),
                "balanced_accuracy": fed.get("balanced_accuracy"),
                "max_epsilon_spent": max(spent) if spent else None,
                "noise_multiplier": _noise_multiplier(run_dir),
                "site_train_seconds": site_train_seconds(run_dir),
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


def run_central(out: Path, datasets: Sequence[str], noise: float, clip: float,
                extra: Sequence[str] = ()) -> list[dict[str, Any]]:
    """One central-DP (client-level) federation per dataset, same recipe as the ε = ∞ run."""
    from consilia.common.config import load_experiment_config
    from consilia.simulations import run as run_module
    from consilia.simulations.inprocess import run_inprocess_simulation

    rows = []
    for dataset in datasets:
        overrides = [*COMMON, *DATASETS[dataset], "dp.enabled=true", "dp.mode=central",
                     f"dp.central_noise_multiplier={noise}", f"dp.central_clipping_norm={clip}",
                     *extra, f"name=dp-{dataset}-central"]
        cfg = load_experiment_config(None, overrides)
        run_dir = out / "runs" / f"{dataset}-central"
        start = time.perf_counter()
        with mock.patch.object(run_module, "run_flower_simulation", run_inprocess_simulation):
            result = run_module.run_experiment(cfg, run_dir)
        rounds = read_round_records(run_dir)
        last = next((r["central_dp"] for r in reversed(rounds) if "central_dp" in r), {})
        fed = result.final["federated"]
        rows.append({"dataset": dataset, "noise_multiplier": noise, "clipping_norm": clip,
                     "client_level_epsilon": last.get("client-level-epsilon"),
                     "delta": last.get("delta"), "auc": fed.get("auc"),
                     "accuracy": fed.get("accuracy"),
                     "seconds": round(time.perf_counter() - start, 1), "run_dir": str(run_dir)})
        log.info("%s central DP σ=%g C=%g: AUC %.4f acc %.4f, client-level ε %s", dataset,
                 noise, clip, fed.get("auc"), fed.get("accuracy"),
                 last.get("client-level-epsilon"))
    return rows


def site_train_seconds(run_dir: Path) -> float | None:
    """Median local-training time of one site in one round (``train-seconds``) of a run."""
    values = [v["train-seconds"] for record in read_round_records(Path(run_dir))
              for v in (record.get("sites") or {}).values()
              if isinstance(v, dict) and v.get("train-seconds") is not None]
    return statistics.median(values) if values else None


def _noise_multiplier(run_dir: Path) -> float | None:
    ledgers = RunDir(run_dir).privacy_ledger_paths()
    for path in ledgers:
        data = json.loads(path.read_text())
        for entry in data.get("entries", {}).values():
            for cal in entry.get("calibrations", {}).values():
                return float(cal["noise_multiplier"])
    return None


def _site_sizes(run_dir: Path) -> list[int]:
    run = RunDir(run_dir)
    return [int(run.read_site(path.stem)[0].labels.shape[0]) for path in run.site_files()]


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

    from consilia.client.privacy.dpsgd import enable_fast_dp_step
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
            enable_fast_dp_step(model, mode)  # as PrivacyController.make_private does
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


def measure_default_overhead(
    mode: str, image_size: int, batch: int, steps: int,
    model_kwargs: dict[str, Any] | None = None, model_name: str = "cnn",
) -> dict[str, Any]:
    """Interleaved A/B timing of plain vs DP-SGD steps of one model (robust to load drift).

    The plain and the private model step alternately on the same batch, so a busy shared
    machine slows both alike; returns both medians (ms) and their ratio. The private path
    is the project's (:func:`consilia.client.privacy.dpsgd.enable_fast_dp_step`, as in
    ``PrivacyController.make_private``).
    """
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from consilia.client.privacy.dpsgd import enable_fast_dp_step
    from consilia.common.models import build_model

    torch.manual_seed(0)
    kwargs = dict(model_kwargs or {})
    images = torch.rand(batch, 1, image_size, image_size)
    labels = torch.randint(0, 6, (batch,))
    plain = build_model(model_name, 1, 6, image_size, **kwargs).train()
    plain_opt = torch.optim.SGD(plain.parameters(), lr=0.01)
    inner = build_model(model_name, 1, 6, image_size, **kwargs)
    private, private_opt, _ = PrivacyEngine(accountant="rdp").make_private(
        module=inner, optimizer=torch.optim.SGD(inner.parameters(), lr=0.01),
        data_loader=DataLoader(TensorDataset(images, labels), batch_size=batch),
        noise_multiplier=1.0, max_grad_norm=1.0, poisson_sampling=False, grad_sample_mode=mode)
    enable_fast_dp_step(private, mode)
    private.train()
    loss = torch.nn.CrossEntropyLoss()
    times: dict[str, list[float]] = {"plain": [], "private": []}
    pairs = (("plain", plain, plain_opt), ("private", private, private_opt))
    for i in range(steps + 1):
        for name, model, opt in pairs if i % 2 else pairs[::-1]:
            t0 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            loss(model(images), labels).backward()
            opt.step()
            if i:  # the first round is a warm-up
                times[name].append(time.perf_counter() - t0)
    plain_ms = 1000 * statistics.median(times["plain"])
    private_ms = 1000 * statistics.median(times["private"])
    return {"model": model_name, "kwargs": kwargs, "mode": mode, "image_size": image_size,
            "batch": batch, "steps": steps, "plain_ms": plain_ms, "private_ms": private_ms,
            "ratio": private_ms / plain_ms}


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
              f"flwr {env['flwr']}. Commands:", "", "```", *results["commands"], "```", ""]
    lines += _summary(results)
    utility = results.get("utility") or []
    if utility:
        lines += _utility_markdown(utility, results)
    if results.get("central"):
        lines += _central_markdown(results["central"])
    cost = results.get("cost") or []
    if cost:
        lines += _cost_markdown(cost, results)
    return "\n".join(lines).rstrip() + "\n"


def _summary(results: dict[str, Any]) -> list[str]:
    """Headline bullets: each target met or not, and the audit's outcome."""
    out = []
    rows = results.get("utility") or []
    base = {r["dataset"]: r["auc"] for r in rows if r["epsilon"] == "inf"}
    for r in rows:
        limit = {"8": 0.02, "3": 0.05}.get(r["epsilon"])
        if limit is not None and r["dataset"] in base:
            drop = base[r["dataset"]] - r["auc"]
            verdict = "met" if drop <= limit else "not met"
            out.append(f"- Utility, {r['dataset']} ε={r['epsilon']}: test AUC "
                       f"{r['auc']:.4f} vs {base[r['dataset']]:.4f} without DP (drop "
                       f"{drop:.4f}, target ≤ {limit}): **{verdict}**.")
    for r in (x for x in rows if "mia" in x):
        m = r["mia"]
        best = max(a for a in (m["loss_auc"], m["lira_auc"]) if a is not None)
        z = (best - 0.5) / null_auc_sd(m["members"], m["non_members"])
        out.append(f"- Membership inference, {r['dataset']} ε={r['epsilon'].replace('inf', '∞')}"
                   f": best attack AUC {best:.3f} ({z:+.1f} sd from chance"
                   + ("; measurable leakage)." if z >= 2 else "; chance level)."))
    for r in results.get("default_overhead") or []:
        verdict = "met" if r["ratio"] <= 1.5 else "not met"
        out.append(f"- Cost, default model (cnn {r['kwargs'] or 'defaults'}, "
                   f"{r['image_size']} px, batch {r['batch']}, {r['mode']}): DP-SGD step "
                   f"{r['ratio']:.2f}× the non-private one (target ≤ 1.5×): **{verdict}**.")
    return ["### Summary", "", *out, ""] if out else []


def _utility_markdown(rows: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    out = ["### Privacy-utility (local DP-SGD at every site)", "",
           "Same federation for every ε: " + ", ".join(f"`{o}`" for o in COMMON) + ". "
           "MedNIST: `" + "`, `".join(DATASETS["mednist"]) + "` (the shared 1-in-5 subset, "
           "resized to 32 px, a 4000-image training pool; random 70/10/20 split). "
           "PneumoniaMNIST: the derived file `medmnist-derived/pneumoniamnist_trainsubset.npz` "
           "(3882 training images, 10 % normal; official 624-image test split). IID "
           "partitions isolate the effect of DP from non-IID drift. Each federation is an "
           "`fl-sim` run whose Flower transport is the in-process grid "
           "(`consilia.simulations.inprocess`: the same ServerApp, ClientApp and wire format "
           "without Ray's start-up; it gave the same metrics as the Ray engine to the last "
           "digit on a 2-round check). Budget per site = the "
           "run's ε over all rounds (RDP accountant, δ = min(1e-5, 1/(10 n))); ε = ∞ is "
           "training without DP. Test metrics: the final global model on the common test "
           "split.", "",
           "| dataset | ε target | ε spent (max site) | noise σ | test AUC | ΔAUC vs ∞ "
           "| test accuracy | site training s/round (median) | run time |",
           "|---|---|---|---|---|---|---|---|---|"]
    base = {r["dataset"]: r["auc"] for r in rows if r["epsilon"] == "inf"}
    verdicts = []
    for r in rows:
        drop = None if r["dataset"] not in base else base[r["dataset"]] - r["auc"]
        out.append(f"| {r['dataset']} | {r['epsilon'].replace('inf', '∞')} | "
                   f"{_f(r['max_epsilon_spent'], 2)} | {_f(r['noise_multiplier'], 3)} | "
                   f"{_f(r['auc'])} | {'' if drop is None or r['epsilon'] == 'inf' else _f(drop)}"
                   f" | {_f(r['accuracy'])} | {_f(r.get('site_train_seconds'), 2)} s | "
                   f"{r['seconds']:.0f} s |")
        limit = {"8": 0.02, "3": 0.05}.get(r["epsilon"])
        if limit is not None and drop is not None:
            verdicts.append(f"{r['dataset']} ε={r['epsilon']}: AUC drop {drop:.4f} "
                            f"(target ≤ {limit}) — {'met' if drop <= limit else 'NOT met'}")
    out += ["", "Targets (AUC drop at ε=8 ≤ 0.02, at ε=3 ≤ 0.05): " + "; ".join(verdicts)
            + ".", "",
            "Reading the numbers: AUC is threshold-free; accuracy is at the argmax. "
            "PneumoniaMNIST's test split is 62.5 % pneumonia, so an accuracy of 0.6250 means "
            "the model answers 'pneumonia' for every image (its training split is 90 % "
            "pneumonia); DP noise pushes it there first while the ranking (AUC) survives. "
            "'Site training s/round' is one site's local training in one round "
            "(`train-seconds`: DP-SGD plus the per-round calibration, ledger and Opacus set-up);"
            " the machine was shared with other jobs (load 3-7 on 2 cores), so times vary by "
            "up to 2× between runs.", ""]
    audited = [r for r in rows if "mia" in r]
    if audited:
        shadows = audited[0]["mia"]["shadows"]
        out += ["### Privacy audit: membership inference against the final global model", "",
                "Members: the sites' training images; non-members: the test split (never "
                "trained on); class-matched, equal numbers. Loss threshold: score = −loss "
                "(same ranking as the confidence p(y|x)). LiRA: online, global variance, "
                f"{shadows} shadow models trained centrally with the run's recipe (same model,"
                " optimizer, batch, rounds × local epochs, and DP-SGD at the same ε) on "
                "random halves of the audit pool "
                "(`consilia.simulations.audits.membership_inference`). AUC 0.5 = "
                "chance. Caveat: a shadow model sees about 500 images, the target about 3000 "
                "(all sites), so shadows overfit more than the target; this makes LiRA "
                "weaker here than against a model trained on the pool size it was "
                "calibrated for.", "",
                "| dataset | ε | members / non-members | loss-attack AUC | loss TPR@1%FPR "
                "| LiRA AUC | LiRA TPR@1%FPR | train acc / test acc (audit pool) |",
                "|---|---|---|---|---|---|---|---|"]
        findings = []
        for r in audited:
            m = r["mia"]
            out.append(f"| {r['dataset']} | {r['epsilon'].replace('inf', '∞')} | "
                       f"{m['members']} / {m['non_members']} | {_f(m['loss_auc'], 3)} | "
                       f"{_f(m['loss_tpr_at_1pct_fpr'], 3)} | {_f(m['lira_auc'], 3)} | "
                       f"{_f(m['lira_tpr_at_1pct_fpr'], 3)} | {_f(m['train_accuracy'], 3)} / "
                       f"{_f(m['test_accuracy'], 3)} |")
            sd = null_auc_sd(m["members"], m["non_members"])
            best = max(a for a in (m["loss_auc"], m["lira_auc"]) if a is not None)
            findings.append(f"{r['dataset']} ε={r['epsilon'].replace('inf', '∞')}: best "
                            f"attack AUC {best:.3f} = chance {'+' if best >= 0.5 else '−'} "
                            f"{abs(best - 0.5) / sd:.1f} sd")
        if any(r["dataset"] == "mednist" for r in audited):
            out += ["", "MedNIST has no patient ids and its random split puts neighbouring "
                    "slices of one scan on both sides (shared-data README), and the model "
                    "generalises (train ≈ test accuracy on the audit pool): there is little "
                    "membership signal to find there even without DP."]
        out += ["", "Chance-level spread of an attack AUC with these group sizes: sd ≈ "
                f"{null_auc_sd(audited[0]['mia']['members'], audited[0]['mia']['non_members']):.3f}"
                " (Mann-Whitney null); above ~+2 sd is measurable leakage. " + "; ".join(findings)
                + ".", ""]
    return out


def _central_markdown(rows: list[dict[str, Any]]) -> list[str]:
    out = ["### Central DP (client level) for comparison", "",
           "`dp.mode=central`: the coordinator clips each site's whole update and adds Gaussian "
           "noise to the aggregate (Flower's server-side fixed clipping); the ε is "
           "**client-level** (it hides whether a whole site took part; the coordinator still "
           "sees each site's clipped update) and is not comparable with the sample-level ε "
           "above. Same recipe as the ε = ∞ runs; RDP accounting, one release per round, no "
           "subsampling amplification (`consilia.server.central_dp`).", "",
           "| dataset | noise σ | clip C | client-level ε (δ) after all rounds | test AUC "
           "| test accuracy |", "|---|---|---|---|---|---|"]
    for r in rows:
        out.append(f"| {r['dataset']} | {r['noise_multiplier']:g} | {r['clipping_norm']:g} | "
                   f"{_f(r['client_level_epsilon'], 2)} ({r['delta']:g}) | {_f(r['auc'])} | "
                   f"{_f(r['accuracy'])} |")
    return [*out, ""]


def null_auc_sd(n_pos: int, n_neg: int) -> float:
    """Return the standard deviation of a ROC AUC without signal (Mann-Whitney null)."""
    return math.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))


def _cost_markdown(rows: list[dict[str, Any]], results: dict[str, Any]) -> list[str]:
    cfg = results["cost_config"]
    modes = list(rows[0]["modes"])
    out = ["### Cost of a DP-SGD step vs a non-private step", "",
           f"One optimizer step (forward, backward, per-sample clipping, noise, update), batch "
           f"{cfg['batch']}, {cfg['image_size']} px, 1 channel, 6 classes, SGD, 1 torch "
           f"thread; median of {cfg['steps']} steps after a warm-up. Memory: peak increase of "
           "the process's resident memory over those steps (Linux VmHWM after "
           "`clear_refs`). Cells: time (× non-private), peak MiB; *fails* = the mode cannot "
           "handle the model. Models with their registry defaults (cnn: width 32). Single "
           "short measurements on a shared machine: ratios are ±30 %; the A/B table below is "
           "the careful one for the default model.", "",
           "| model | non-private | " + " | ".join(modes) + " | auto picks |",
           "|---|---|" + "---|" * len(modes) + "---|"]
    from consilia.client.privacy.dpsgd import choose_grad_sample_mode

    for r in rows:
        cells = [_fmt_cost(r["modes"][m]) for m in modes]
        out.append(f"| {r['model']} | {_fmt_cost(r['plain'])} | " + " | ".join(cells)
                   + f" | {choose_grad_sample_mode(r['model'])} |")
    default = next((r for r in rows if r["model"] == "cnn"), None)
    if default is not None:
        auto = choose_grad_sample_mode("cnn")
        ratio = default["modes"].get(auto, {}).get("time_ratio")
        if ratio is not None:
            out += ["", f"Default model (cnn, auto → {auto}) in this table: {ratio:.2f}× the "
                    "non-private step."]
    ab = results.get("default_overhead") or []
    if ab:
        out += ["", "Default model, interleaved A/B timing (plain and DP-SGD steps alternate "
                "on the same batch, so machine load hits both alike; DP-SGD as "
                "`PrivacyController.make_private` sets it up, with `enable_fast_dp_step`; "
                "median of "
                f"{ab[0]['steps']} steps each; the geometries the benchmark runs use):", "",
                "| model | mode | px | batch | non-private | DP-SGD | ratio | target ≤ 1.5× |",
                "|---|---|---|---|---|---|---|---|"]
        for r in ab:
            name = r["model"] + (f" {r['kwargs']}" if r["kwargs"] else "")
            out.append(f"| {name} | {r['mode']} | {r['image_size']} | {r['batch']} | "
                       f"{r['plain_ms']:.1f} ms | {r['private_ms']:.1f} ms | "
                       f"{r['ratio']:.2f}× | {'met' if r['ratio'] <= 1.5 else 'NOT met'} |")
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

    parser = argparse.ArgumentParser(prog="python -m benchmarks.privacy",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("runs/privacy-bench"))
    parser.add_argument("--parts", default="utility,central,cost,overhead", help="utility "
                        "(with the MIA audit), central, cost, overhead (default-model A/B "
                        "timing); comma-separated. Results of parts not run are kept from "
                        "DIR/privacy_bench.json; none = re-render them")
    parser.add_argument("--ab-steps", type=int, default=30)
    parser.add_argument("--central-noise", type=float, default=1.0)
    parser.add_argument("--central-clip", type=float, default=1.0)
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
    saved = args.out / "privacy_bench.json"
    results: dict[str, Any] = json.loads(saved.read_text()) if saved.is_file() else {}
    command = "python -m benchmarks.privacy " + " ".join(
        sys.argv[1:] if argv is None else list(argv))
    earlier = results.pop("command", None)  # files written before "commands" existed
    results["commands"] = [*results.get("commands", [earlier] if earlier else [])]
    if args.parts != "none":  # "none": re-render the saved results only
        results["commands"].append(command)
    results["environment"] = _environment()
    seconds = results.setdefault("part_seconds", {})
    if "seconds" in results:
        seconds.setdefault("earlier parts", results.pop("seconds"))
    started = time.perf_counter()
    if "utility" in parts:
        epsilons = [math.inf if e == "inf" else float(e) for e in args.epsilons.split(",")]
        results["utility"] = run_utility(
            args.out, args.datasets.split(","), epsilons,
            [e for e in epsilons if e in MIA_EPSILONS], args.shadows, args.per_group,
            args.overrides)
        seconds["utility+mia"] = round(time.perf_counter() - started, 1)
    if "central" in parts:
        t0 = time.perf_counter()
        results["central"] = run_central(args.out, args.datasets.split(","), args.central_noise,
                                         args.central_clip, args.overrides)
        seconds["central"] = round(time.perf_counter() - t0, 1)
    if "cost" in parts:
        results["cost_config"] = {"image_size": args.cost_size, "batch": args.cost_batch,
                                  "steps": args.cost_steps}
        t0 = time.perf_counter()
        results["cost"] = run_cost(args.models.split(","), args.modes.split(","),
                                   args.cost_size, args.cost_batch, args.cost_steps)
        seconds["cost"] = round(time.perf_counter() - t0, 1)
    if "overhead" in parts:
        t0 = time.perf_counter()
        from consilia.client.privacy.dpsgd import choose_grad_sample_mode

        mode = choose_grad_sample_mode("cnn")
        results["default_overhead"] = [
            measure_default_overhead(mode, size, batch, args.ab_steps, kwargs)
            for size, batch, kwargs in ((32, 64, {"width": 16}), (28, 64, {"width": 16}),
                                        (64, 32, {"width": 16}), (64, 32, {}))]
        for r in results["default_overhead"]:
            log.info("default model A/B %s %s %d px batch %d: %.1f vs %.1f ms (%.2f×)",
                     r["model"], r["kwargs"], r["image_size"], r["batch"], r["plain_ms"],
                     r["private_ms"], r["ratio"])
        seconds["overhead"] = round(time.perf_counter() - t0, 1)
    for row in results.get("utility") or []:  # rows from before the column existed
        if row.get("site_train_seconds") is None and row.get("run_dir"):
            row["site_train_seconds"] = site_train_seconds(Path(row["run_dir"]))
    saved.write_text(json.dumps(results, indent=2, default=str))
    section = to_markdown(results) + "\nBenchmark time: " + ", ".join(
        f"{k} {v:.0f} s" for k, v in seconds.items()) + ".\n"
    (args.out / "privacy_bench.md").write_text(section)
    if args.docs is not None:
        update_docs(args.docs, section)
    print(section)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
