"""common/evaluation."""
