"""``fl-predict``: classify DICOM/PNG/JPEG files with a trained checkpoint, optionally with maps.

Example::

    fl-predict --model runs/demo/global_model.safetensors scans/ extra.dcm --out preds --gradcam

Writes ``predictions.csv`` and/or ``predictions.json`` (file, predicted class, one probability
per class), ``skipped.csv`` (files that could not be read, with the reason) and, with
``--gradcam`` / ``--occlusion``, overlay PNGs under ``gradcam/`` / ``occlusion/``.

Each image goes through the same steps as the run's evaluation data: pixels in [0, 1],
channels converted to the task's ``in_channels`` (grey <-> RGB), then the run's eval transform
(resize to ``task.image_size`` + the configured preprocessing). Non-square images are resized
without keeping the aspect ratio, as in training.
"""

from consilia.common.analysis.predict.classify import Prediction, predict_files
from consilia.common.analysis.predict.cli import main
from consilia.common.analysis.predict.inputs import (
    DICOM_SUFFIXES,
    IMAGE_SUFFIXES,
    collect_inputs,
    load_image,
)

__all__ = ["DICOM_SUFFIXES", "IMAGE_SUFFIXES", "Prediction", "collect_inputs", "load_image",
           "main", "predict_files"]
