"""The run directory (``docs/run-directory.md``): its layout and typed readers, round records.

:mod:`~consilia.common.rundir.layout` (:class:`~consilia.common.rundir.layout.RunDir`) is the
one place that knows where each file of a run lives; :mod:`~consilia.common.rundir.round_records`
reads ``metrics/rounds.jsonl`` with late federated evaluations merged.
"""

__all__: list[str] = []
