"""``fl-report RUN_DIR``: one self-contained HTML report of a run (figures embedded as PNG).

Reads the run directory described in ``docs/run-directory.md`` (through
:class:`consilia.common.rundir.layout.RunDir`) and writes ``RUN_DIR/report.html``:
configuration, per-site data, learning curves, ROC curves, confusion matrix, metrics with
bootstrap 95 % CIs, calibration, cross-site validation, per-site fairness, privacy spend, a
Grad-CAM gallery and federated vs centralized vs local-only. Every section whose inputs are
missing says "not available for this run" (with the reason) instead of failing. The file has
no external resources (no scripts, styles or images from elsewhere): it can be e-mailed or
archived as is.

Modules: :mod:`~.run_files` (cached access to the run), :mod:`~.html` (fragments),
:mod:`~.sections` (one module per group of sections), :mod:`~.document` (the page),
:mod:`~.cli` (``main``, the ``fl-report`` entry point).
"""

from consilia.common.analysis.report.cli import main
from consilia.common.analysis.report.document import build_report
from consilia.common.analysis.report.run_files import NOT_AVAILABLE
from consilia.common.analysis.report.sections import REPORT_SECTIONS

__all__ = ["NOT_AVAILABLE", "REPORT_SECTIONS", "build_report", "main"]
