"""Classify image files with a checkpoint's model (optionally with saliency overlays)."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from consilia.common.analysis.predict.inputs import UnreadableFileError, load_image
from consilia.common.config import RunConfig
from consilia.common.evaluation.explain import Explainer, overlay_png
from consilia.common.training.inference import eval_transform_for, predict_proba

__all__ = ["PROGRESS_MIN_FILES", "Prediction", "predict_files"]

log = logging.getLogger("consilia.predict")

#: Show a progress bar from this many files on.
PROGRESS_MIN_FILES = 20


@dataclass
class Prediction:
    """One classified file."""

    file: str
    predicted: str
    probabilities: dict[str, float]
    source: str  # "dicom" or "image"


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
    overlay_dir = out_dir if out_dir is not None else Path()  # used only with explainers
    show = progress if progress is not None else len(files) >= PROGRESS_MIN_FILES
    predictions: list[Prediction] = []
    skipped: list[tuple[str, str]] = []
    pending: list[tuple[int, Path, str, np.ndarray, torch.Tensor]] = []

    def flush() -> None:
        if not pending:
            return
        batch = torch.stack([item[4] for item in pending])
        probs = predict_proba(model, batch, batch_size=len(pending))
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
                overlay_png(display, heat, overlay_dir / method / _overlay_name(index, path))
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
