"""Tests for consilia.common.training.inference (the one inference path)."""

from __future__ import annotations

import numpy as np
import pytest
from evaluation_testkit import FixedThresholdModel

from consilia.common.training.inference import predict_proba


def test_predict_proba_uint8_and_restores_mode(rng):
    model = FixedThresholdModel(0.5).train()
    images = np.array([np.full((1, 4, 4), 10), np.full((1, 4, 4), 250)], np.uint8)
    prob = predict_proba(model, images, batch_size=1)
    assert prob.shape == (2, 2) and np.allclose(prob.sum(axis=1), 1)
    assert prob[0, 0] > 0.99 and prob[1, 1] > 0.99
    assert model.training  # restored
    with pytest.raises(ValueError, match=r"\(N, C, H, W\)"):
        predict_proba(model, np.zeros((4, 4), np.uint8))
