"""Local differential privacy at a site: planning, budget, DP-SGD, releases, ledger."""
