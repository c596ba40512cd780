"""simulations/audits."""
