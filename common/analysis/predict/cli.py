"""The ``fl-predict`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from consilia.common.analysis.predict.classify import predict_files
from consilia.common.analysis.predict.inputs import collect_inputs
from consilia.common.analysis.predict.outputs import write_outputs
from consilia.common.logs import TOOL, setup_logging
from consilia.common.model_files import PickleModelFileError, load_model_file

__all__ = ["build_parser", "main"]

def build_parser() -> argparse.ArgumentParser:
    """Return the ``fl-predict`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="fl-predict",
        description="Classify DICOM/PNG/JPEG files (or folders, recursively) with a Consilia "
        "model file (.safetensors); write per-image class probabilities and optional saliency "
        "overlays.",
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", help="files or folders")
    parser.add_argument("--model", required=True, type=Path, metavar="MODEL_FILE",
                        help="a Consilia .safetensors model file "
                        "(e.g. RUN_DIR/global_model.safetensors)")
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
    setup_logging(args.verbose, fmt=TOOL, stream=sys.stderr)
    if args.batch_size < 1:
        print(f"fl-predict: --batch-size must be >= 1, got {args.batch_size}", file=sys.stderr)
        return 2
    try:
        model, run, _meta = load_model_file(args.model)
    except PickleModelFileError as exc:
        print(f"fl-predict: {exc}", file=sys.stderr)
        return 2
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

