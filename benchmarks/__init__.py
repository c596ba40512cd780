"""Benchmarks: figures and ratios, not tests (run from the repository root)."""
