"""The report's sections, in order: each builds an HTML fragment or raises ``Unavailable``."""

from __future__ import annotations

from collections.abc import Callable

from consilia.common.analysis.report.context import ReportContext
from consilia.common.analysis.report.run_files import RunFiles
from consilia.common.analysis.report.sections.comparison import section_comparison
from consilia.common.analysis.report.sections.cross_site import (
    section_cross_site,
    section_fairness,
)
from consilia.common.analysis.report.sections.gradcam import section_gradcam
from consilia.common.analysis.report.sections.performance import (
    section_calibration,
    section_confusion,
    section_metrics_ci,
    section_roc,
)
from consilia.common.analysis.report.sections.privacy import section_privacy
from consilia.common.analysis.report.sections.run_info import (
    section_config,
    section_learning_curves,
    section_sites,
)

__all__ = ["REPORT_SECTIONS", "SECTION_BUILDERS", "SectionBuilder"]

#: A section builder: the run's files and the report's context -> an HTML fragment.
SectionBuilder = Callable[[RunFiles, ReportContext], str]

#: (id, title) of every section, in report order.
REPORT_SECTIONS: tuple[tuple[str, str], ...] = (
    ("config", "Run configuration"),
    ("sites", "Per-site data"),
    ("learning-curves", "Learning curves"),
    ("comparison", "Federated vs centralized vs local-only"),
    ("metrics-ci", "Test metrics with bootstrap 95% confidence intervals"),
    ("roc", "ROC curves"),
    ("confusion", "Confusion matrix"),
    ("calibration", "Calibration"),
    ("cross-site", "Cross-site validation"),
    ("fairness", "Per-site fairness"),
    ("privacy", "Privacy spend"),
    ("gradcam", "Grad-CAM gallery"),
)

#: The builder of each section id.
SECTION_BUILDERS: dict[str, SectionBuilder] = {
    "config": section_config,
    "sites": section_sites,
    "learning-curves": section_learning_curves,
    "comparison": section_comparison,
    "metrics-ci": section_metrics_ci,
    "roc": section_roc,
    "confusion": section_confusion,
    "calibration": section_calibration,
    "cross-site": section_cross_site,
    "fairness": section_fairness,
    "privacy": section_privacy,
    "gradcam": section_gradcam,
}
