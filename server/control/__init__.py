"""server/control."""
