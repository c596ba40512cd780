"""Assemble the report: run every section, wrap the fragments in one self-contained HTML page."""

from __future__ import annotations

import logging
import time
from pathlib import Path

from consilia.common.analysis.report.context import ReportContext
from consilia.common.analysis.report.html import CSS, esc, note
from consilia.common.analysis.report.run_files import NOT_AVAILABLE, RunFiles, Unavailable
from consilia.common.analysis.report.sections import REPORT_SECTIONS, SECTION_BUILDERS
from consilia.common.model_files import ModelFileError, pickle_refusal, refuse_pickle_file
from consilia.common.rundir.layout import RunDir

__all__ = ["build_report"]

log = logging.getLogger("consilia.report")


def build_report(
    run_dir: Path,
    out: Path | None = None,
    n_boot: int = 1000,
    gallery: int = 6,
    seed: int = 0,
    batch_size: int = 256,
) -> Path:
    """Write the self-contained HTML report of a run.

    Parameters
    ----------
    run_dir : Path
        A run directory (``docs/run-directory.md``).
    out : Path, optional
        Output file; default ``run_dir / "report.html"``.
    n_boot : int
        Bootstrap resamples for the confidence intervals.
    gallery : int
        Grad-CAM cases per group (correct / incorrect).
    seed : int
        Seed of the bootstrap and of the gallery's choice of correct cases.
    batch_size : int
        Inference batch size (cross-site validation, gallery).

    Returns
    -------
    Path
        The written HTML file.

    Raises
    ------
    FileNotFoundError
        If ``run_dir`` is not a directory. Missing files inside it never raise: the
        affected sections say "not available for this run".
    consilia.common.model_files.ModelFileError
        If a model file of the run is refused: a pickle-based ``.pt`` file (never loaded),
        an altered ``.safetensors`` file or one with non-finite weights.

    """
    run_dir = Path(run_dir)
    if run_dir.is_file():
        refuse_pickle_file(run_dir)
    if not run_dir.is_dir():
        raise FileNotFoundError(f"{run_dir}: run directory not found")
    legacy = RunDir(run_dir).legacy_model_files()
    if legacy:
        raise pickle_refusal(legacy[0])
    out = Path(out) if out is not None else RunDir(run_dir).report_path
    run = RunFiles(RunDir(run_dir))
    ctx = ReportContext(n_boot=n_boot, gallery=gallery, seed=seed, batch_size=batch_size)
    body = []
    status: dict[str, str] = {}
    for section_id, title in REPORT_SECTIONS:
        started = time.perf_counter()
        try:
            content = SECTION_BUILDERS[section_id](run, ctx)
            status[section_id] = "ok"
        except ModelFileError:
            raise  # a refused model file stops the report: nothing of it is shown or run
        except Unavailable as exc:
            content = f'<p class="na">{NOT_AVAILABLE} ({esc(exc)})</p>'
            status[section_id] = "n/a"
        except Exception as exc:  # noqa: BLE001 - one broken part must not lose the report
            log.warning("report section %r failed", section_id, exc_info=True)
            content = (f'<p class="na">{NOT_AVAILABLE} (error while building it: '
                       f"{esc(type(exc).__name__)}: {esc(exc)})</p>")
            status[section_id] = "error"
        log.debug("section %s: %s in %.2f s", section_id, status[section_id],
                  time.perf_counter() - started)
        body.append(f'<section id="{section_id}"><h2>{esc(title)}</h2>{content}</section>')
    nav = "".join(
        f'<li><a href="#{sid}">{esc(title)}</a>'
        + ("" if status[sid] == "ok" else ' <span class="na">(n/a)</span>') + "</li>"
        for sid, title in REPORT_SECTIONS
    )
    name = _run_name(run)
    page = (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        f"<title>Consilia report: {esc(name)}</title><style>{CSS}</style></head><body>"
        f"<h1>Consilia run report: {esc(name)}</h1>"
        + note(f"Run directory: {run_dir.resolve()} — generated "
                f"{time.strftime('%Y-%m-%d %H:%M:%S')}")
        + f"<nav><ul>{nav}</ul></nav>" + "".join(body) + "</body></html>\n"
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page, encoding="utf-8")
    tmp.replace(out)
    return out


def _run_name(run: RunFiles) -> str:
    name = run.config_value("name")
    return str(name) if name else run.path.name
