"""The operator's tools: ``fl-server``, SuperLink, site registry, run launcher, proxy."""
