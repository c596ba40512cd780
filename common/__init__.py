"""What the coordinator, the sites and the simulations share (imports nothing else of Consilia)."""
