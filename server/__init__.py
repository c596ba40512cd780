"""The coordinator: ServerApp, strategies, recorder, CCVR, central DP (imports only common)."""
