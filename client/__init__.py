"""The hospital site: ClientApp, trainer and ``fl-client`` (imports only consilia.common)."""
