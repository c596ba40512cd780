"""Render the HTML report in headless Chromium: every image must load; save a screenshot.

Needs the Debian ``chromium`` package (``apt-get install -y chromium``). Outside CI the test
is skipped when no Chromium is found; with ``CI=true`` it fails instead. Set
``CONSILIA_ARTIFACTS_DIR`` to keep the screenshot (``report.png``) after the run.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from fake_run import make_run_dir
from PIL import Image

from consilia.common.analysis.report import build_report

pytestmark = pytest.mark.slow

_PROBE = (
    '<script>window.addEventListener("load", function () {'
    "var all = Array.from(document.images);"
    "var ok = all.filter(function (i) { return i.complete && i.naturalWidth > 0; }).length;"
    'document.body.setAttribute("data-images-loaded", ok + "/" + all.length);'
    "});</script>"
)


def _chromium() -> str:
    for candidate in ("/usr/bin/chromium", shutil.which("chromium"),
                      shutil.which("chromium-browser")):
        if candidate and Path(candidate).is_file():
            return candidate
    message = "Chromium not found (install the Debian package: apt-get install -y chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(message)
    pytest.skip(message)


def _run(browser: str, profile: Path, *args: str) -> str:
    command = [browser, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
               "--hide-scrollbars", f"--user-data-dir={profile}", *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"chromium failed ({done.returncode}): {done.stderr[-2000:]}"
    return done.stdout


def _images_loaded(browser: str, page: Path, profile: Path) -> tuple[int, int]:
    probe = page.with_name(page.stem + ".probe.html")
    probe.write_text(page.read_text(encoding="utf-8").replace("</body>", _PROBE + "</body>"),
                     encoding="utf-8")
    dom = _run(browser, profile, "--virtual-time-budget=5000", "--dump-dom", probe.as_uri())
    match = re.search(r'data-images-loaded="(\d+)/(\d+)"', dom)
    assert match, "the probe script did not run (no data-images-loaded marker in the DOM)"
    return int(match.group(1)), int(match.group(2))


def test_report_renders_with_all_images(tmp_path):
    browser = _chromium()
    run_dir = make_run_dir(tmp_path / "run")
    report = build_report(run_dir, n_boot=50, gallery=2)
    expected = report.read_text(encoding="utf-8").count("<img ")
    assert expected >= 10

    # The probe can fail: a broken embedded image is detected.
    broken = tmp_path / "broken.html"
    broken.write_text('<html><body><img src="data:image/png;base64,AAAA" alt="x"></body></html>')
    assert _images_loaded(browser, broken, tmp_path / "profile") == (0, 1)

    assert _images_loaded(browser, report, tmp_path / "profile") == (expected, expected)

    shot = tmp_path / "report.png"
    _run(browser, tmp_path / "profile", f"--screenshot={shot}", "--window-size=1200,2400",
         report.as_uri())
    with Image.open(shot) as picture:
        assert picture.size == (1200, 2400)
        pixels = np.asarray(picture.convert("L"), dtype=np.float64)
    assert pixels.std() > 5, "screenshot is blank"
    artifacts = os.environ.get("CONSILIA_ARTIFACTS_DIR")
    if artifacts:
        Path(artifacts).mkdir(parents=True, exist_ok=True)
        shutil.copy(shot, Path(artifacts) / "report.png")
