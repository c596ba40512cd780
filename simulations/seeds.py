"""Derived seeds: independent random streams of one experiment seed (partitions, scanner shifts)."""

from __future__ import annotations

import numpy as np

__all__ = ["derive_seed"]


def derive_seed(seed: int, *keys: int) -> int:
    """Return a 32-bit seed derived from ``seed`` and ``keys`` (independent streams).

    Parameters
    ----------
    seed : int
        The experiment seed.
    *keys : int
        What the stream is for (e.g. the site index and a purpose code).

    Returns
    -------
    int
        ``np.random.SeedSequence([seed, *keys]).generate_state(1)[0]`` (each term mod 2**63).

    """
    entropy = [seed % 2**63, *(k % 2**63 for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0])
