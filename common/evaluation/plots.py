"""Quick-look PNG figures for a run (matplotlib, headless)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

__all__ = ["plot_confusion_matrix", "plot_learning_curves"]


def plot_learning_curves(
    rounds: Sequence[dict], out: Path, baselines: dict[str, float] | None = None
) -> Path:
    """Plot per-round training loss and test accuracy/AUC of the global model.

    Parameters
    ----------
    rounds : sequence of dict
        Records of ``metrics/rounds.jsonl``.
    out : Path
        PNG to write.
    baselines : dict, optional
        Horizontal reference lines (e.g. centralized/local-only test accuracy).
    """
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(10, 4))
    r_train = [r["round"] for r in rounds if r.get("train")]
    ax_loss.plot(r_train, [r["train"].get("train-loss") for r in rounds if r.get("train")],
                 "o-", label="train loss (weighted mean)")
    r_eval = [r["round"] for r in rounds if r.get("federated_eval")]
    if r_eval:
        ax_loss.plot(r_eval, [r["federated_eval"].get("eval-loss") for r in rounds
                              if r.get("federated_eval")], "s--", label="site val loss")
    ax_loss.set_xlabel("round")
    ax_loss.set_ylabel("loss")
    ax_loss.legend()
    ax_loss.grid(alpha=0.3)
    r_srv = [r for r in rounds if r.get("server_eval")]
    if r_srv:
        ax_acc.plot([r["round"] for r in r_srv], [r["server_eval"]["accuracy"] for r in r_srv],
                    "o-", label="global model: test accuracy")
        aucs = [r["server_eval"].get("auc") for r in r_srv]
        if all(a is not None for a in aucs):
            ax_acc.plot([r["round"] for r in r_srv], aucs, "s-", label="global model: test AUC")
    elif r_eval:
        ax_acc.plot(r_eval, [r["federated_eval"].get("accuracy") for r in rounds
                             if r.get("federated_eval")], "o-", label="site val accuracy")
    for i, (name, value) in enumerate((baselines or {}).items()):
        ax_acc.axhline(value, linestyle=":", color=f"C{i + 2}", label=f"{name} test accuracy")
    ax_acc.set_xlabel("round")
    ax_acc.set_ylim(0, 1.02)
    ax_acc.legend(loc="lower right", fontsize=8)
    ax_acc.grid(alpha=0.3)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out


def plot_confusion_matrix(
    matrix: Sequence[Sequence[int]], class_names: Sequence[str], out: Path, title: str = ""
) -> Path:
    """Plot a confusion matrix (rows = true class, columns = predicted class)."""
    cm = np.asarray(matrix)
    fig, ax = plt.subplots(figsize=(1.0 + 0.8 * len(class_names), 0.6 + 0.8 * len(class_names)))
    ax.imshow(cm, cmap="Blues")
    ax.set_xticks(range(len(class_names)), class_names, rotation=45, ha="right")
    ax.set_yticks(range(len(class_names)), class_names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    threshold = cm.max() / 2 if cm.size else 0
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, str(cm[i, j]), ha="center", va="center",
                    color="white" if cm[i, j] > threshold else "black", fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
