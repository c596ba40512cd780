"""Consilia package."""
