"""Audits of what a run leaks: membership inference, the content of the sites' messages."""
