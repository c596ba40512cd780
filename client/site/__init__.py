"""client/site."""
