"""``python -m consilia.common.analysis.predict``: the same as the ``fl-predict`` command."""

from consilia.common.analysis.predict.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
