"""Report section: privacy spend (local DP-SGD, central DP) and the membership-inference audit."""

from __future__ import annotations

from typing import Any

from matplotlib.figure import Figure

from consilia.common.analysis.report.context import ReportContext
from consilia.common.analysis.report.html import embed_figure, fmt, note, table
from consilia.common.analysis.report.run_files import RunFiles, Unavailable

__all__ = ["section_privacy"]


def section_privacy(run: RunFiles, ctx: ReportContext) -> str:
    """Show local DP-SGD epsilon per site, central DP per round, membership-inference audit."""
    parts = [fragment for fragment in (_privacy_local(run), _privacy_central(run),
                                       _privacy_audit(run)) if fragment]
    if not parts:
        raise Unavailable("no site reported an epsilon, no central DP record and no "
                          "privacy_audit.json (differential privacy was off, no audit run)")
    return "".join(parts)


def _privacy_local(run: RunFiles) -> str:
    """Local DP-SGD: each site's cumulative (sample-level) epsilon per round."""
    try:
        rounds = run.rounds()
    except Unavailable:
        return ""
    sites = sorted({s for r in rounds for s, v in (r.get("sites") or {}).items()
                    if isinstance(v, dict) and v.get("epsilon") is not None})
    if not sites:
        return ""
    fig = Figure(figsize=(6.5, 3.8))
    ax = fig.subplots()
    final_rows = []
    for site in sites:
        xs: list[Any] = []
        ys: list[float] = []
        delta = None
        for record in rounds:
            values = (record.get("sites") or {}).get(site) or {}
            if values.get("epsilon") is not None:
                xs.append(record.get("round"))
                ys.append(float(values["epsilon"]))
                delta = values.get("delta", delta)
        ax.plot(xs, ys, "o-", ms=3, label=site)
        final_rows.append([site, ys[-1], delta, xs[-1]])
    ax.set_xlabel("round")
    ax.set_ylabel("cumulative epsilon")
    ax.set_title("privacy spend per site")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    out = ("<h3>Local DP-SGD (sample level: each patient's images, per site)</h3>"
           + table(("site", "epsilon (total so far)", "delta", "last round"), final_rows))
    accountant = run.config_value("dp", "accountant")
    if accountant:
        out += note(f"Accountant: {accountant} (the same history gives different epsilon "
                     "values under different accountants).")
    return out + embed_figure(fig, "privacy spend per site")


def _privacy_central(run: RunFiles) -> str:
    """Central DP: the coordinator's client-level epsilon per round (``central_dp`` records)."""
    try:
        rounds = run.rounds()
    except Unavailable:
        return ""
    rows = [[r.get("round"), c.get("client-level-epsilon"), c.get("delta"),
             c.get("effective-noise-multiplier"), c.get("clipping-norm"),
             c.get("sites-aggregated")]
            for r in rounds if isinstance(c := r.get("central_dp"), dict)]
    if not rows:
        return ""
    return ("<h3>Central DP (client level: a whole site's contribution)</h3>"
            + table(("round", "client-level epsilon", "delta", "effective noise multiplier",
                      "clipping norm", "sites aggregated"), rows)
            + note("Central DP clips each site's update and adds noise to the aggregate: it "
                    "hides whether a site took part, not individual patients from the "
                    "coordinator, which sees each site's clipped update. Epsilon: RDP, one "
                    "Gaussian release per round, no subsampling amplification; n/a = no "
                    "noise."))


def _privacy_audit(run: RunFiles) -> str:
    """Membership-inference audit of the final model (``privacy_audit.json``)."""
    try:
        audit = run.json("privacy_audit.json")
    except Unavailable:
        return ""
    if not isinstance(audit, dict):
        return ""
    rows = [["loss threshold", audit.get("loss_auc"), audit.get("loss_tpr_at_1pct_fpr")]]
    if audit.get("lira_auc") is not None:
        rows.append([f"LiRA ({audit.get('shadows')} shadow models)", audit.get("lira_auc"),
                     audit.get("lira_tpr_at_1pct_fpr")])
    notes = "; ".join(str(n) for n in audit.get("notes") or [])
    return ("<h3>Membership-inference audit of the final global model</h3>"
            + table(("attack", "attack AUC (0.5 = chance)", "TPR at 1% FPR"), rows)
            + note(f"DP: {audit.get('dp')}; epsilon spent: {fmt(audit.get('spent_epsilon'))}; "
                    f"{audit.get('members')} members vs {audit.get('non_members')} "
                    f"non-members. {notes}"))
