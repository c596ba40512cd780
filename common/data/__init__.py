"""common/data."""
