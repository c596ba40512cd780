"""The one train / evaluate / predict engine: training loop, inference, losses, optimizers."""
