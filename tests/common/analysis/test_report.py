"""Tests for ``fl-report`` (consilia.common.analysis.report) on a tiny fake run directory."""

from __future__ import annotations

import base64
import json
import re
from html.parser import HTMLParser
from pathlib import Path

import pytest
from fake_run import make_run_dir

from consilia.common.analysis.report import NOT_AVAILABLE, REPORT_SECTIONS, build_report, main


class _Collector(HTMLParser):
    """Collect section contents, img/a/link/script attributes."""

    def __init__(self) -> None:
        super().__init__()
        self.sections: dict[str, list[str]] = {}
        self.images: list[dict[str, str]] = []
        self.urls: list[str] = []
        self.tags: set[str] = set()
        self._current: str | None = None

    def handle_starttag(self, tag, attrs):
        attrs = {k: v or "" for k, v in attrs}
        self.tags.add(tag)
        if tag == "section":
            self._current = attrs.get("id")
            self.sections[self._current] = []
        if tag == "img":
            self.images.append(attrs)
            if self._current:
                self.sections[self._current].append("<img>")
        for key in ("src", "href"):
            if key in attrs:
                self.urls.append(attrs[key])

    def handle_endtag(self, tag):
        if tag == "section":
            self._current = None

    def handle_data(self, data):
        if self._current:
            self.sections[self._current].append(data)


def _parse(path: Path) -> _Collector:
    parser = _Collector()
    parser.feed(path.read_text(encoding="utf-8"))
    return parser


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    return make_run_dir(tmp_path_factory.mktemp("run") / "run")


@pytest.fixture(scope="module")
def report(run_dir) -> Path:
    return build_report(run_dir, n_boot=100, gallery=3)


def test_report_has_every_section_with_content(report, run_dir):
    assert report == run_dir / "report.html"
    parsed = _parse(report)
    assert list(parsed.sections) == [sid for sid, _ in REPORT_SECTIONS]
    for section_id, _title in REPORT_SECTIONS:
        text = " ".join(parsed.sections[section_id])
        assert NOT_AVAILABLE not in text, f"section {section_id} unavailable: {text[:300]}"
    with_figures = ("learning-curves", "comparison", "roc", "confusion", "calibration",
                    "cross-site", "privacy", "gradcam")
    for section_id in with_figures:
        assert "<img>" in parsed.sections[section_id], section_id


def test_report_is_self_contained(report):
    html = report.read_text(encoding="utf-8")
    parsed = _parse(report)
    assert not {"script", "link", "iframe", "object", "embed"} & parsed.tags
    assert "url(" not in html  # no CSS-loaded resources
    assert parsed.images, "no figures embedded"
    for image in parsed.images:
        src = image["src"]
        assert src.startswith("data:image/png;base64,"), src[:60]
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG\r\n\x1a\n")
        assert image.get("alt")
    for url in parsed.urls:  # only data: URIs and in-page anchors
        assert url.startswith(("data:", "#")), url


def test_report_numbers_come_from_the_run(report, run_dir):
    html = report.read_text(encoding="utf-8")
    final = json.loads((run_dir / "final_metrics.json").read_text())
    assert f"{final['federated']['accuracy']:.3f}" in html
    assert "2.500" in html  # site-01's last epsilon in rounds.jsonl (0.8 * 3 + 0.1)
    for site in ("site-00", "site-01"):
        assert site in html
    assert re.search(r"\d\.\d{3} \[\d\.\d{3}, \d\.\d{3}\]", html)  # value [low, high]
    gallery = _parse(report).sections["gradcam"]
    assert sum(1 for item in gallery if item == "<img>") == 6  # 3 correct + 3 incorrect


def test_binary_run_shows_operating_points(tmp_path):
    run_dir = make_run_dir(tmp_path / "binary", class_names=["benign", "malignant"], dp=False)
    html = build_report(run_dir, n_boot=50, gallery=1).read_text(encoding="utf-8")
    assert "sensitivity @ 90% spec." in html and "sensitivity @ 95% spec." in html
    privacy = " ".join(_parse(run_dir / "report.html").sections["privacy"])
    assert NOT_AVAILABLE in privacy and "epsilon" in privacy


def test_missing_parts_say_not_available(tmp_path):
    run_dir = tmp_path / "bare"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text("name: bare-run\n")
    (run_dir / "metrics").mkdir()
    (run_dir / "metrics" / "rounds.jsonl").write_text(
        '{"round": 0, "server_eval": {"loss": 1.0, "accuracy": 0.3}}\nnot json\n'
        '{"round": 1, "server_eval": {"loss": 0.8, "accuracy": 0.5}}\n'
    )
    out = build_report(run_dir, out=tmp_path / "elsewhere" / "r.html", n_boot=10)
    assert out == tmp_path / "elsewhere" / "r.html"
    parsed = _parse(out)
    available = {sid for sid, content in parsed.sections.items()
                 if NOT_AVAILABLE not in " ".join(content)}
    assert available == {"config", "learning-curves"}
    assert "bare-run" in out.read_text(encoding="utf-8")


def test_cli(tmp_path, run_dir, capsys):
    out = tmp_path / "cli.html"
    assert main([str(run_dir), "--out", str(out), "--n-boot", "20", "--gallery", "1"]) == 0
    assert out.is_file() and str(out) in capsys.readouterr().out
    assert main([str(tmp_path / "no-such-run")]) == 2
    assert "run directory not found" in capsys.readouterr().err


def test_comparison_shows_the_model_before_calibration_and_who_declined(tmp_path):
    run_dir = make_run_dir(tmp_path / "calibrated", dp=False)
    final_path = run_dir / "final_metrics.json"
    final = json.loads(final_path.read_text())
    final["federated_before_calibration"] = {**final["federated"], "accuracy": 0.4321}
    final["calibration"] = {"applied": True, "sites": ["site-00"], "images": 80,
                            "virtual_per_class": 2000,
                            "declined": {"site-01": "this site trains with local DP"}}
    final_path.write_text(json.dumps(final))
    build_report(run_dir, n_boot=20, gallery=1)
    comparison = " ".join(_parse(run_dir / "report.html").sections["comparison"])
    assert "last round before classifier calibration" in comparison and "0.432" in comparison
    assert "2000 virtual features per class" in comparison
    assert "site-01: this site trains with local DP" in comparison


def test_comparison_says_which_sites_sent_dp_noised_statistics(tmp_path):
    run_dir = make_run_dir(tmp_path / "noised", dp=True)
    final_path = run_dir / "final_metrics.json"
    final = json.loads(final_path.read_text())
    final["calibration"] = {"applied": True, "sites": ["site-00", "site-01"], "images": 80,
                            "virtual_per_class": 500, "declined": {},
                            "noised_sites": {"site-00": 5.0, "site-01": 5.0},
                            "feature_clip_norm": 6.0554}
    final_path.write_text(json.dumps(final))
    build_report(run_dir, n_boot=20, gallery=1)
    comparison = " ".join(_parse(run_dir / "report.html").sections["comparison"])
    assert "2 of them trained with local DP and sent Gaussian-noised statistics" in comparison
    assert "(noise multiplier 5; features clipped to 6.06)" in comparison
