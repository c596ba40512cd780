"""The ``fl-report RUN_DIR`` command line."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from consilia.common.analysis.report.document import build_report
from consilia.common.logs import TOOL, setup_logging
from consilia.common.model_files import ModelFileError

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``fl-report``; return the exit code (0 ok, 2 bad arguments or a refused model file)."""
    parser = argparse.ArgumentParser(
        prog="fl-report",
        description="Write RUN_DIR/report.html: one self-contained HTML report of a run.",
    )
    parser.add_argument("run_dir", type=Path, metavar="RUN_DIR")
    parser.add_argument("--out", type=Path, default=None, help="default: RUN_DIR/report.html")
    parser.add_argument("--n-boot", type=int, default=1000,
                        help="bootstrap resamples for the CIs (default 1000)")
    parser.add_argument("--gallery", type=int, default=6,
                        help="Grad-CAM cases per group, correct/incorrect (default 6)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    setup_logging(args.verbose, fmt=TOOL, stream=sys.stderr)
    if args.n_boot < 1 or args.gallery < 0:
        print("fl-report: --n-boot must be >= 1 and --gallery >= 0", file=sys.stderr)
        return 2
    try:
        path = build_report(args.run_dir, args.out, n_boot=args.n_boot, gallery=args.gallery,
                            seed=args.seed)
    except (FileNotFoundError, ModelFileError) as exc:
        print(f"fl-report: {exc}", file=sys.stderr)
        return 2
    print(f"wrote {path}")
    return 0
