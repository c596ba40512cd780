"""``python -m consilia.common.analysis.report``: the same as the ``fl-report`` command."""

from consilia.common.analysis.report.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
