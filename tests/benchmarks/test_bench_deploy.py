"""The deployment benchmark's bookkeeping (the benchmark itself runs outside the test suite)."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.deployment import report, site_compute_seconds


def _log(path: Path, entries: list[dict]) -> Path:
    path.write_text("".join(json.dumps(e) + "\n" for e in entries))
    return path


def test_site_compute_is_the_slowest_site_per_message_type_summed_per_round(tmp_path) -> None:
    def entry(run, rnd, kind, app):
        return {"run_id": str(run), "round": str(rnd), "type": kind, "timing": {"app": app}}

    a = _log(tmp_path / "a.jsonl", [entry(7, 1, "train", 4.0), entry(7, 1, "evaluate", 0.5),
                                    entry(7, 2, "train", 3.0), entry(9, 1, "train", 99.0)])
    b = _log(tmp_path / "b.jsonl", [entry(7, 1, "train", 5.0), entry(7, 1, "evaluate", 0.2),
                                    {"run_id": "7", "round": "", "type": "query",
                                     "timing": {"app": 50.0}}])
    assert site_compute_seconds([a, b, tmp_path / "missing.jsonl"], 7) == {1: 5.5, 2: 3.0}


def test_report_shows_overhead_against_the_simulation_and_bytes_per_round() -> None:
    results = {
        "per_site_images": 100, "rounds": 3, "local_epochs": 1, "model": "cnn",
        "cpu_count": 2, "model_bytes": 1_000_000,
        "modes": {
            "deploy: as shipped": {"round_s": [9.0, 5.5, 5.5], "outside_sites_s": [3, 0.4, 0.6],
                                   "traffic": {"outbound-bytes": 18_000_000,
                                               "inbound-bytes": 9_000_000},
                                   "cpu_s_per_round": {"SuperLink": 0.456, "other": 0.001}},
            "simulation (Ray)": {"round_s": [9.0, 5.0, 5.0],
                                 "cpu_s_per_round": {"Ray services": 0.08}},
        },
    }
    text = report(results)
    shipped = next(line for line in text.splitlines() if line.startswith("deploy: as shipped")
                   and "s/round" not in line and "received" not in line and "CPU" not in line)
    assert "5.50" in shipped and "+10.0%" in shipped and shipped.rstrip().endswith("0.50")
    assert "received 2.000 MB (2.00x model), sent 1.000 MB (1.00x)" in text
    assert "CPU s per round (2..R): SuperLink 0.46" in text and "other" not in text
    assert "CPU s per round (2..R): Ray services 0.08" in text
