"""common/flower."""
