"""The Consilia ServerApp on Flower's plain deployment Grid (the benchmark's baseline).

``consilia.server.app:app`` wraps its Grid with
:class:`~consilia.common.flower.fast_grid.FastPollGrid`; this ServerApp runs the same
federation without the wrapper (Flower's own 3 s reply polling), so
``benchmarks/deployment.py`` can compare both.
"""

from __future__ import annotations

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp

from consilia.server.app import load_run, run_federation

__all__ = ["app"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Run the Consilia federation on Flower's plain Grid (benchmark baseline)."""
    run, run_dir = load_run(context)
    run_federation(grid, run, run_dir)
