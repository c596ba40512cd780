"""Every use of Flower internals and every patch of Flower, behind one version check.

Outside this package Consilia uses only Flower's public app API (``flwr.app``,
``flwr.clientapp``, ``flwr.serverapp``, ``flwr.serverapp.strategy``, ``flwr.simulation``);
``tests/common/flower/test_flower_boundary.py`` enforces it. Each module here that reaches
past that API calls :func:`consilia.common.flower.compat.require_supported_flower` on import.

- ``app_project``: the Flower app project (``pyproject.toml``) of a run;
- ``compat``: the Flower version check;
- ``task_identity``: Flower's process-wide task identity;
- ``object_pulls``: quicker retries of Flower's object pulls (a patch);
- ``supernode_launch``: the SuperNode with adaptive polling (a patch);
- ``fast_grid``: a deployment Grid that collects replies without 3 s steps;
- ``clientapp_process``: the runtime calls of the site's long-lived ClientApp process;
- ``simulation_engine``: Flower's simulation engine with a run configuration;
- ``inprocess_grid``: a Grid whose nodes are ClientApp calls in this process;
- ``wire_format``: messages in Flower's wire format;
- ``exit_codes``: Flower's explanations of its exit codes.
"""

__all__: list[str] = []
