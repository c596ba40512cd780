"""The DP benchmark's report: its docs section is replaced in place, others are kept."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from benchmarks.privacy.docs_section import SECTION, update_docs
from benchmarks.privacy.markdown import null_auc_sd, to_markdown
from benchmarks.privacy.step_cost import measure_step_cost


def test_update_docs_replaces_only_its_own_section(tmp_path: Path) -> None:
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n## Speed\n\nfast\n\n" + SECTION + "\n\nold\n\n## Later\n\nx\n")
    update_docs(docs, SECTION + "\n\nnew\n")
    text = docs.read_text()
    assert "old" not in text and "new" in text
    assert text.index("## Speed") < text.index(SECTION) < text.index("## Later")
    assert "fast" in text and text.rstrip().endswith("x")

    missing = tmp_path / "fresh.md"
    update_docs(missing, SECTION + "\n\nfirst\n")
    assert missing.read_text().startswith("# Benchmarks") and "first" in missing.read_text()


def test_markdown_states_whether_the_targets_are_met() -> None:
    mia = {"members": 100, "non_members": 100, "loss_auc": 0.6, "loss_tpr_at_1pct_fpr": 0.05,
           "lira_auc": 0.62, "lira_tpr_at_1pct_fpr": 0.08, "shadows": 4,
           "train_accuracy": 1.0, "test_accuracy": 0.8}
    rows = [
        {"dataset": "d", "epsilon": "inf", "auc": 0.95, "accuracy": 0.9, "seconds": 1,
         "max_epsilon_spent": None, "noise_multiplier": None, "mia": mia},
        {"dataset": "d", "epsilon": "8", "auc": 0.94, "accuracy": 0.9, "seconds": 1,
         "max_epsilon_spent": 7.99, "noise_multiplier": 0.9, "mia": mia},
        {"dataset": "d", "epsilon": "3", "auc": 0.85, "accuracy": 0.8, "seconds": 1,
         "max_epsilon_spent": 2.99, "noise_multiplier": 1.5},
    ]
    text = to_markdown({"environment": {"date": "today", "machine": "m", "threads": 1,
                                        "torch": "t", "opacus": "o", "flwr": "f"},
                        "commands": ["python -m benchmarks.privacy"],
                        "utility": rows})
    assert "d ε=8: AUC drop 0.0100 (target ≤ 0.02) — met" in text
    assert "d ε=3: AUC drop 0.1000 (target ≤ 0.05) — NOT met" in text
    assert f"{null_auc_sd(100, 100):.3f}" in text and "0.620 = chance + 2.9 sd" in text


def test_step_cost_measures_plain_and_private_steps() -> None:
    plain = measure_step_cost("lenet5", None, image_size=16, batch=8, steps=2)
    private = measure_step_cost("lenet5", "hooks", image_size=16, batch=8, steps=2)
    assert plain["ms"] > 0 and private["ms"] > 0
    assert "error" in measure_step_cost("lenet5", "no-such-mode", image_size=16, batch=8)


def test_module_cli_re_renders_saved_results_into_the_docs(tmp_path: Path) -> None:
    """``python -m benchmarks.privacy --parts none`` (the package's __main__) re-renders."""
    saved = {"commands": ["python -m benchmarks.privacy --parts utility"],
             "utility": [{"dataset": "d", "epsilon": "inf", "auc": 0.95, "accuracy": 0.9,
                          "seconds": 1, "max_epsilon_spent": None, "noise_multiplier": None,
                          "site_train_seconds": 0.5},
                         {"dataset": "d", "epsilon": "8", "auc": 0.94, "accuracy": 0.9,
                          "seconds": 1, "max_epsilon_spent": 7.99, "noise_multiplier": 0.9,
                          "site_train_seconds": 0.7}],
             "part_seconds": {"utility+mia": 12.0}}
    (tmp_path / "privacy_bench.json").write_text(json.dumps(saved))
    docs = tmp_path / "benchmarks.md"
    docs.write_text("# Benchmarks\n\n" + SECTION + "\n\nstale figures\n\n## Later\n\nx\n")
    repo_root = Path(__file__).resolve().parents[2]
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks.privacy", "--parts", "none", "--out", str(tmp_path),
         "--docs", str(docs)], cwd=repo_root, capture_output=True, text=True, timeout=300,
        check=False)
    assert done.returncode == 0, done.stderr
    section = (tmp_path / "privacy_bench.md").read_text()
    assert section.startswith(SECTION) and "d ε=8: AUC drop 0.0100 (target ≤ 0.02) — met" in section
    assert section.rstrip().endswith("Benchmark time: utility+mia 12 s.")
    assert section.strip() in done.stdout
    text = docs.read_text()
    assert "stale figures" not in text and section in text and text.rstrip().endswith("x")
    results = json.loads((tmp_path / "privacy_bench.json").read_text())
    assert results["commands"] == saved["commands"]  # "none" re-renders, records no command
