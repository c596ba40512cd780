"""common/rundir."""
