"""Render the benchmark results as the ``## Differential privacy`` Markdown section."""

from __future__ import annotations

import math
from typing import Any

from benchmarks.privacy.docs_section import SECTION
from benchmarks.privacy.recipe import COMMON, DATASETS
from benchmarks.privacy.step_cost import format_cost

__all__ = ["null_auc_sd", "to_markdown"]


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
        cells = [format_cost(r["modes"][m]) for m in modes]
        out.append(f"| {r['model']} | {format_cost(r['plain'])} | " + " | ".join(cells)
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
