"""Tests for ``fl-predict`` (consilia.common.analysis.predict)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from consilia.common.analysis.predict import collect_inputs, load_image, main, predict_files
from consilia.common.config import ModelConfig, PreprocessConfig, RunConfig, TaskSpec, TrainConfig
from consilia.common.data.transforms import build_eval_transform
from consilia.common.model_files import load_model_file, save_model_file
from consilia.common.serde import model_from_run_config

CLASSES = ["normal", "abnormal", "other"]


def _checkpoint(tmp_path: Path, in_channels: int = 1, normalize: str = "none") -> Path:
    torch.manual_seed(0)
    run = RunConfig(
        model=ModelConfig(name="cnn", kwargs={"width": 4}),
        task=TaskSpec(class_names=CLASSES, in_channels=in_channels, image_size=16),
        train=TrainConfig(preprocess=PreprocessConfig(normalize=normalize)),
    )
    path = tmp_path / f"model-{in_channels}-{normalize}.safetensors"
    return save_model_file(path, model_from_run_config(run), run, 3)


def _png_folder(root: Path) -> list[Path]:
    rng = np.random.default_rng(0)
    (root / "nested" / "deeper").mkdir(parents=True)
    (root / ".hidden").mkdir()
    files = []
    for i, (sub, size, mode) in enumerate([
        ("", (20, 20), "L"), ("", (32, 24), "RGB"), ("nested", (16, 16), "L"),
        ("nested/deeper", (40, 40), "RGB"),
    ]):
        shape = size[::-1] + ((3,) if mode == "RGB" else ())
        path = root / sub / f"img{i}.{'png' if i % 2 == 0 else 'jpg'}"
        Image.fromarray(rng.integers(0, 255, shape, dtype=np.uint8), mode).save(path)
        files.append(path)
    Image.fromarray(np.zeros((8, 8), np.uint8)).save(root / ".hidden" / "ignored.png")
    (root / "notes.txt").write_text("not an image")  # ignored inside folders
    (root / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    return files


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_png_folder_writes_csv_json_and_overlays(tmp_path):
    ckpt = _checkpoint(tmp_path)
    images = _png_folder(tmp_path / "in")
    out = tmp_path / "out"
    code = main(["--model", str(ckpt), str(tmp_path / "in"), "--out", str(out), "--gradcam",
                 "--occlusion", "--no-progress"])
    assert code == 0
    rows = _read_csv(out / "predictions.csv")
    assert [r["file"] for r in rows] == [str(p) for p in sorted(images)]  # recursive, sorted
    for row in rows:
        probs = [float(row[f"prob_{c}"]) for c in CLASSES]
        assert sum(probs) == pytest.approx(1.0, abs=1e-4)
        assert row["predicted"] == CLASSES[int(np.argmax(probs))]
    payload = json.loads((out / "predictions.json").read_text())
    assert payload["class_names"] == CLASSES
    assert len(payload["predictions"]) == len(images)
    assert [s["file"] for s in payload["skipped"]] == [str(tmp_path / "in" / "broken.png")]
    assert "not a readable image" in payload["skipped"][0]["reason"]
    skipped = _read_csv(out / "skipped.csv")
    assert len(skipped) == 1 and skipped[0]["file"].endswith("broken.png")
    for method in ("gradcam", "occlusion"):
        overlays = sorted((out / method).glob("*.png"))
        assert len(overlays) == len(images)
        with Image.open(overlays[0]) as picture:
            assert picture.size == (16, 16) and picture.mode == "RGB"


def test_format_csv_only_and_missing_inputs(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    image = _png_folder(tmp_path / "in")[0]
    out = tmp_path / "out"
    code = main(["--model", str(ckpt), str(image), str(tmp_path / "nope.png"), "--out", str(out),
                 "--format", "csv"])
    assert code == 0
    assert (out / "predictions.csv").is_file() and not (out / "predictions.json").exists()
    skipped = _read_csv(out / "skipped.csv")
    assert skipped == [{"file": str(tmp_path / "nope.png"), "reason": "no such file or folder"}]
    assert "skipped" in capsys.readouterr().err


def test_exit_codes_for_bad_checkpoint_and_nothing_classified(tmp_path, capsys):
    assert main(["--model", str(tmp_path / "missing.safetensors"), str(tmp_path)]) == 2
    assert "cannot load --model" in capsys.readouterr().err
    bad = tmp_path / "bad.txt"
    bad.write_text("hello")
    assert main(["--model", str(_checkpoint(tmp_path)), str(bad), "--out",
                 str(tmp_path / "o")]) == 1


def test_channels_are_converted_to_the_task(tmp_path):
    rgb = tmp_path / "rgb.png"
    Image.fromarray(np.full((10, 12, 3), [255, 0, 0], np.uint8), "RGB").save(rgb)
    grey, _ = load_image(rgb, in_channels=1)
    assert grey.shape == (1, 10, 12)
    assert grey.max() == pytest.approx(0.299, abs=1e-3)  # ITU-R 601 luma of pure red
    as_rgb, source = load_image(tmp_path / "rgb.png", in_channels=3)
    assert as_rgb.shape == (3, 10, 12) and source == "image"
    grey_png = tmp_path / "g.png"
    Image.fromarray(np.full((6, 6), 128, np.uint8)).save(grey_png)
    assert load_image(grey_png, in_channels=3)[0].shape == (3, 6, 6)


def test_eval_transform_of_the_checkpoint_is_applied(tmp_path):
    ckpt = _checkpoint(tmp_path, normalize="zscore")
    model, run, _ = load_model_file(ckpt)
    path = tmp_path / "x.png"
    pixels = np.random.default_rng(3).integers(0, 255, (24, 30), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    predictions, skipped = predict_files(model, run, [path])
    assert not skipped
    transform = build_eval_transform(run.train.preprocess, 16)
    x = transform(torch.from_numpy(pixels.astype(np.float32) / 255.0)[None])
    assert x.shape == (1, 16, 16) and abs(float(x.mean())) < 1e-5  # resized and z-scored
    with torch.no_grad():
        expected = torch.softmax(model(x[None]), dim=1)[0].numpy()
    got = [predictions[0].probabilities[c] for c in CLASSES]
    np.testing.assert_allclose(got, expected, atol=1e-6)


def test_progress_bar_for_many_files(tmp_path, capsys):
    ckpt = _checkpoint(tmp_path)
    model, run, _ = load_model_file(ckpt)
    folder = tmp_path / "many"
    folder.mkdir()
    for i in range(25):
        Image.fromarray(np.full((16, 16), i * 10, np.uint8)).save(folder / f"{i:02d}.png")
    files, missing = collect_inputs([folder])
    assert len(files) == 25 and not missing
    predictions, _ = predict_files(model, run, files, batch_size=8)
    assert len(predictions) == 25
    assert "fl-predict" in capsys.readouterr().err  # tqdm writes to stderr


def test_dicom_files_from_the_shared_data(tmp_path, dicom_dir):
    """Real DICOMs: grey CT, an extension-less CR (MONOCHROME1), RGB, and a broken file."""
    out = tmp_path / "out"
    inputs = [dicom_dir / "CT_small.dcm", dicom_dir / "dicomdirtests_77654033_CR1_6154",
              dicom_dir / "SC_rgb.dcm", dicom_dir / "rtplan_truncated.dcm"]
    for path in inputs:
        assert path.is_file(), f"{path} missing from the shared data"
    for in_channels in (1, 3):
        ckpt = _checkpoint(tmp_path, in_channels=in_channels)
        code = main(["--model", str(ckpt), *map(str, inputs), "--out", str(out / str(in_channels)),
                     "--gradcam", "--no-progress"])
        assert code == 0
        payload = json.loads((out / str(in_channels) / "predictions.json").read_text())
        predicted = {Path(p["file"]).name: p for p in payload["predictions"]}
        assert set(predicted) == {"CT_small.dcm", "dicomdirtests_77654033_CR1_6154",
                                  "SC_rgb.dcm"}
        assert all(p["source"] == "dicom" for p in predicted.values())
        assert all(sum(p["probabilities"].values()) == pytest.approx(1.0, abs=1e-4)
                   for p in predicted.values())
        assert [Path(s["file"]).name for s in payload["skipped"]] == ["rtplan_truncated.dcm"]
        assert payload["skipped"][0]["reason"].startswith("DICOM:")
        assert len(list((out / str(in_channels) / "gradcam").glob("*.png"))) == 3
