"""One hospital's installation: config, policy, data sources, assembly, supervisor, worker."""
