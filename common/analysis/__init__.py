"""common/analysis."""
