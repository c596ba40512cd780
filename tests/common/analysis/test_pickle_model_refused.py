"""A crafted pickle ``.pt`` model never runs its payload through ``fl-predict`` or ``fl-report``.

The payload's ``__reduce__`` writes a marker file when the file is unpickled. The control test
proves the payload is live (an unsafe ``torch.load`` does write the marker); the tools, run as
real processes, must refuse the file with one clear line and exit code 2, marker absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

MARKER_ENV = "CONSILIA_TEST_PAYLOAD_MARKER"
REFUSAL = "is a pickle-based .pt file; Consilia model files are .safetensors"


class Payload:
    """Unpickling this object runs code: it writes the file named by ``$MARKER_ENV``."""

    def __reduce__(self):
        code = f"import os; open(os.environ['{MARKER_ENV}'], 'w').write('payload ran')"
        return (exec, (code,))


def _crafted(path: Path, legacy: bool = False) -> Path:
    """A ``torch.save`` file that looks like an old checkpoint and carries the payload."""
    payload = {"format": "consilia-checkpoint-v1", "round": 3, "state_dict": {},
               "run_config": Payload()}
    torch.save(payload, path, _use_new_zipfile_serialization=not legacy)
    return path


def _run(args: list[str], marker: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, MARKER_ENV: str(marker)}
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env,
                          timeout=300, check=False)


def test_control_the_payload_runs_when_unpickled_unsafely(tmp_path):
    model = _crafted(tmp_path / "global_model.pt")
    marker = tmp_path / "control-marker"
    result = _run(["-c", f"import torch; torch.load({str(model)!r}, weights_only=False)"],
                  marker)
    assert result.returncode == 0, result.stderr
    assert marker.read_text() == "payload ran"


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy-pickle"])
def test_fl_predict_refuses_a_crafted_pt_without_running_it(tmp_path, legacy):
    model = _crafted(tmp_path / "global_model.pt", legacy=legacy)
    scans = tmp_path / "scans"
    scans.mkdir()
    marker = tmp_path / "marker"
    result = _run(["-m", "consilia.common.analysis.predict", "--model", str(model), str(scans),
                   "--out", str(tmp_path / "out")], marker)
    assert not marker.exists()
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines == [f"fl-predict: {model} {REFUSAL} (it was not loaded: loading a pickle can "
                     "run code) — re-export it with a trusted Consilia version or retrain"]
    assert not (tmp_path / "out").exists()


def test_fl_report_refuses_a_run_directory_with_a_crafted_pt(tmp_path):
    run_dir = tmp_path / "old-run"
    run_dir.mkdir()
    model = _crafted(run_dir / "global_model.pt")
    marker = tmp_path / "marker"
    result = _run(["-m", "consilia.common.analysis.report", str(run_dir)], marker)
    assert not marker.exists()
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"fl-report: {model} {REFUSAL} (it was not loaded: loading a pickle can run code) — "
        "re-export it with a trusted Consilia version or retrain"]
    assert not (run_dir / "report.html").exists()
    result = _run(["-m", "consilia.common.analysis.report", str(model)], marker)
    assert not marker.exists()
    assert result.returncode == 2 and REFUSAL in result.stderr


def test_fl_report_refuses_a_crafted_pt_renamed_to_safetensors(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    np.savez_compressed(run_dir / "test_set.npz", images=np.zeros((4, 1, 16, 16), np.uint8),
                        labels=np.array([0, 1, 0, 1]))
    model = _crafted(run_dir / "global_model.safetensors")
    marker = tmp_path / "marker"
    result = _run(["-m", "consilia.common.analysis.report", str(run_dir)], marker)
    assert not marker.exists()
    assert result.returncode == 2
    assert f"fl-report: {model} {REFUSAL}" in result.stderr.strip().splitlines()[-1]
    assert not (run_dir / "report.html").exists()
