"""``fl-predict``: classify DICOM/PNG/JPEG files with a trained checkpoint, optionally with maps.

Example::

    fl-predict --model runs/demo/global_model.pt scans/ extra.dcm --out preds --gradcam

Writes ``predictions.csv`` and/or ``predictions.json`` (file, predicted class, one probability
per class), ``skipped.csv`` (files that could not be read, with the reason) and, with
``--gradcam`` / ``--occlusion``, overlay PNGs under ``gradcam/`` / ``occlusion/``.

Each image goes through the same steps as the run's evaluation data: pixels in [0, 1],
channels converted to the task's ``in_channels`` (grey <-> RGB), then the run's eval transform
(resize to ``task.image_size`` + the configured preprocessing). Non-square images are resized
without keeping the aspect ratio, as in training.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import sys
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from tqdm import tqdm

from consilia.common.config import RunConfig
from consilia.common.data.dicom import DicomSkip, is_probably_dicom, read_dicom
from consilia.common.evaluation.clinical import eval_transform_for
from consilia.common.evaluation.explain import Explainer, overlay_png
from consilia.common.serde import load_checkpoint

__all__ = ["IMAGE_SUFFIXES", "DICOM_SUFFIXES", "Prediction", "collect_inputs", "load_image",
           "main", "predict_files"]

log = logging.getLogger("consilia.predict")

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff"})
DICOM_SUFFIXES = frozenset({".dcm", ".dicom", ".dic"})
#: Show a progress bar from this many files on.
PROGRESS_MIN_FILES = 20


class UnreadableFileError(Exception):
    """A file that cannot be classified; the message says why (listed in ``skipped.csv``)."""


@dataclass
class Prediction:
    """One classified file."""

    file: str
    predicted: str
    probabilities: dict[str, float]
    source: str  # "dicom" or "image"


def collect_inputs(inputs: Iterable[str | Path]) -> tuple[list[Path], list[tuple[str, str]]]:
    """Expand files and folders (recursively) into the list of files to classify.

    Explicitly named files are always tried. Inside folders, files with an image or DICOM
    suffix, extension-less files and files with the DICOM magic bytes are taken; hidden
    files and folders are ignored.

    Returns
    -------
    tuple
        ``(files in a stable order, [(input, reason)] for inputs that do not exist)``.

    """
    files: list[Path] = []
    missing: list[tuple[str, str]] = []
    for item in inputs:
        path = Path(item)
        if path.is_file():
            files.append(path)
        elif path.is_dir():
            for child in sorted(path.rglob("*")):
                rel = child.relative_to(path)
                if any(part.startswith(".") for part in rel.parts) or not child.is_file():
                    continue
                suffix = child.suffix.lower()
                if (suffix in IMAGE_SUFFIXES or suffix in DICOM_SUFFIXES or suffix == ""
                        or is_probably_dicom(child)):
                    files.append(child)
        else:
            missing.append((str(path), "no such file or folder"))
    unique = list(dict.fromkeys(files))
    return unique, missing


def _read_dicom(path: Path) -> np.ndarray:
    try:
        return np.asarray(read_dicom(path).pixels, dtype=np.float32)
    except DicomSkip as exc:
        raise UnreadableFileError(f"DICOM: {exc}") from None


def _read_picture(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as picture:
            picture.load()
            if picture.mode in {"I;16", "I;16B", "I;16L", "I", "F"}:
                # 16-bit/float grey (e.g. 12-bit exports): min-max scaled to [0, 1]
                arr = np.asarray(picture, dtype=np.float32)
                low, high = float(arr.min()), float(arr.max())
                arr = (arr - low) / (high - low) if high > low else np.zeros_like(arr)
                return arr[None]
            if picture.mode in {"1", "L", "LA"}:
                return np.asarray(picture.convert("L"), dtype=np.float32)[None] / 255.0
            rgb = np.asarray(picture.convert("RGB"), dtype=np.float32) / 255.0
            return np.moveaxis(rgb, -1, 0)
    except (UnidentifiedImageError, OSError, ValueError) as exc:
        raise UnreadableFileError(f"not a readable image ({exc})") from None


def load_image(path: Path, in_channels: int) -> tuple[np.ndarray, str]:
    """Read one file as float32 ``(in_channels, H, W)`` in [0, 1].

    PNG/JPEG/BMP/TIFF go through Pillow; everything else is read as DICOM
    (``consilia.common.data.dicom.read_dicom``). RGB is converted to grey with ITU-R 601 luma
    weights; grey is repeated to 3 channels.

    Raises
    ------
    UnreadableFileError
        With the reason, when the file is not a usable image.

    """
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES and not is_probably_dicom(path):
        pixels, source = _read_picture(path), "image"
    else:
        pixels, source = _read_dicom(path), "dicom"
    if pixels.ndim == 2:
        pixels = pixels[None]
    if pixels.ndim != 3 or pixels.shape[0] not in (1, 3) or min(pixels.shape[1:]) < 2:
        raise UnreadableFileError(
            f"unsupported pixel array shape {pixels.shape} (expected (1|3, H, W))"
        )
    if not np.all(np.isfinite(pixels)):
        raise UnreadableFileError("pixel data contains NaN/inf")
    if pixels.shape[0] == 3 and in_channels == 1:
        pixels = np.tensordot(np.array([0.299, 0.587, 0.114], np.float32), pixels, axes=1)[None]
    elif pixels.shape[0] == 1 and in_channels == 3:
        pixels = np.repeat(pixels, 3, axis=0)
    return np.clip(pixels, 0.0, 1.0).astype(np.float32), source


def _model_input(
    pixels: np.ndarray, transform: Callable[[torch.Tensor], torch.Tensor] | None
) -> torch.Tensor:
    x = torch.from_numpy(pixels)
    return transform(x) if transform is not None else x


def _overlay_name(index: int, path: Path) -> str:
    stem = "".join(c if c.isalnum() or c in "-_." else "_" for c in path.stem) or "image"
    return f"{index:05d}_{stem}.png"


def predict_files(
    model: torch.nn.Module,
    run: RunConfig,
    files: Sequence[Path],
    out_dir: Path | None = None,
    batch_size: int = 64,
    explain: Sequence[str] = (),
    progress: bool | None = None,
) -> tuple[list[Prediction], list[tuple[str, str]]]:
    """Classify files with a loaded checkpoint model.

    Parameters
    ----------
    model : nn.Module
        The checkpoint's model (eval mode).
    run : RunConfig
        The checkpoint's run configuration (task + preprocessing).
    files : sequence of Path
        Files to classify (see :func:`collect_inputs`).
    out_dir : Path, optional
        Where overlay PNGs go (``<out_dir>/<method>/``); required when ``explain`` is set.
    batch_size : int
        Images per forward pass.
    explain : sequence of {"gradcam", "occlusion"}
        Saliency maps to write for the predicted class.
    progress : bool, optional
        Show a tqdm bar (default: when there are at least 20 files).

    Returns
    -------
    tuple
        ``(predictions, [(file, reason) for skipped files])``.

    """
    if run.task is None:
        raise ValueError("checkpoint run config has no task (class_names, in_channels, ...)")
    if explain and out_dir is None:
        raise ValueError("out_dir is required to write saliency overlays")
    class_names = list(run.task.class_names)
    transform = eval_transform_for(run)
    explainers = {
        method: Explainer(model, method="auto" if method == "gradcam" else "occlusion")
        for method in explain
    }
    for method, explainer in explainers.items():
        if method == "gradcam" and explainer.method != "gradcam":
            log.warning("Grad-CAM is not meaningful for %s; --gradcam writes occlusion maps",
                        type(model).__name__)
    show = progress if progress is not None else len(files) >= PROGRESS_MIN_FILES
    predictions: list[Prediction] = []
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[int, Path, str, np.ndarray, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        with torch.no_grad():
            logits = model(torch.stack([item[4] for item in pending]))
            if isinstance(logits, tuple | list):
                logits = logits[0]
            probs = torch.softmax(logits.float(), dim=1).cpu().numpy()
        for (index, path, source, pixels, x), row in zip(pending, probs, strict=True):
            best = int(row.argmax())
            predictions.append(Prediction(
                file=str(path),
                predicted=class_names[best],
                probabilities={name: float(p) for name, p in zip(class_names, row, strict=True)},
                source=source,
            ))
            for method, explainer in explainers.items():
                heat = explainer(x, best)
                display = _resize_to(torch.from_numpy(pixels), x.shape[-2:])
                overlay_png(display, heat, out_dir / method / _overlay_name(index, path))
        pending.clear()

    model.eval()
    for index, path in enumerate(tqdm(files, desc="fl-predict", unit="file", disable=not show)):
        try:
            pixels, source = load_image(path, run.task.in_channels)
            x = _model_input(pixels, transform)
        except UnreadableFileError as exc:
            skipped.append((str(path), str(exc)))
            continue
        except Exception as exc:  # noqa: BLE001 - one bad file must not stop the batch
            log.debug("failed on %s", path, exc_info=True)
            skipped.append((str(path), f"{type(exc).__name__}: {exc}"))
            continue
        pending.append((index, path, source, pixels, x))
        if len(pending) >= batch_size:
            flush()
    flush()
    return predictions, skipped


def _resize_to(x: torch.Tensor, size: Sequence[int]) -> torch.Tensor:
    """Resize the raw [0, 1] image to the model input size (the overlay's background)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return torch.nn.functional.interpolate(
        x[None], size=tuple(size), mode="bilinear", antialias=True, align_corners=False
    )[0]


def write_outputs(
    out_dir: Path,
    predictions: Sequence[Prediction],
    skipped: Sequence[tuple[str, str]],
    class_names: Sequence[str],
    fmt: str,
) -> list[Path]:
    """Write ``predictions.csv``/``predictions.json`` and ``skipped.csv``; return the paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    if fmt in {"csv", "both"}:
        path = out_dir / "predictions.csv"
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.writer(handle)
            writer.writerow(["file", "predicted", *[f"prob_{c}" for c in class_names]])
            for p in predictions:
                writer.writerow([p.file, p.predicted,
                                 *[f"{p.probabilities[c]:.6f}" for c in class_names]])
        written.append(path)
    if fmt in {"json", "both"}:
        path = out_dir / "predictions.json"
        payload = {
            "class_names": list(class_names),
            "predictions": [
                {"file": p.file, "predicted": p.predicted, "probabilities": p.probabilities,
                 "source": p.source}
                for p in predictions
            ],
            "skipped": [{"file": f, "reason": r} for f, r in skipped],
        }
        path.write_text(json.dumps(payload, indent=2), encoding="utf-8")
        written.append(path)
    path = out_dir / "skipped.csv"
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["file", "reason"])
        writer.writerows(skipped)
    written.append(path)
    return written


def build_parser() -> argparse.ArgumentParser:
    """Return the ``fl-predict`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fl-predict",
        description="Classify DICOM/PNG/JPEG files (or folders, recursively) with a Consilia "
        "checkpoint; write per-image class probabilities and optional saliency overlays.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    parser.add_argument("--model", required=True, type=Path, metavar="CHECKPOINT",
                        help="checkpoint file (e.g. RUN_DIR/global_model.pt)")
    parser.add_argument("--out", type=Path, default=Path("predictions"), metavar="DIR",
                        help="output folder (default: ./predictions)")
    parser.add_argument("--format", choices=("csv", "json", "both"), default="both",
                        help="prediction file format (default: both)")
    parser.add_argument("--gradcam", action="store_true",
                        help="write Grad-CAM overlays (occlusion for transformer models)")
    parser.add_argument("--occlusion", action="store_true",
                        help="write occlusion-sensitivity overlays (slower)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--no-progress", action="store_true", help="never show a progress bar")
    parser.add_argument("-v", "--verbose", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fl-predict``; return the exit code (0 ok, 1 nothing classified, 2 bad input)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(levelname)s %(message)s")
    if args.batch_size < 1:
        print(f"fl-predict: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        model, run, _meta = load_checkpoint(args.model)
    except (FileNotFoundError, ValueError) as exc:
        print(f"fl-predict: cannot load --model: {exc}", file=sys.stderr)
        return 2
    files, missing = collect_inputs(args.inputs)
    explain = [m for m, on in (("gradcam", args.gradcam), ("occlusion", args.occlusion)) if on]
    predictions, skipped = predict_files(
        model, run, files, out_dir=args.out, batch_size=args.batch_size, explain=explain,
        progress=False if args.no_progress else None,
    )
    skipped = [*missing, *skipped]
    assert run.task is not None
    written = write_outputs(args.out, predictions, skipped, run.task.class_names, args.format)
    print(f"classified {len(predictions)} file(s), skipped {len(skipped)}; wrote "
          + ", ".join(str(p) for p in written))
    for name, reason in skipped:
        print(f"  skipped {name}: {reason}", file=sys.stderr)
    return 0 if predictions else 1


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
