"""The federation every privacy-benchmark run shares; only ``dp.*`` changes between runs."""

from __future__ import annotations

import math

__all__ = ["COMMON", "DATASETS", "EPSILONS", "MIA_EPSILONS"]

EPSILONS: tuple[float, ...] = (math.inf, 8.0, 3.0, 1.0)
MIA_EPSILONS: tuple[float, ...] = (math.inf, 8.0, 3.0)

#: Per-dataset overrides (on top of :data:`COMMON`).
DATASETS: dict[str, list[str]] = {
    "mednist": ["data.dataset=mednist", "data.image_size=32", "data.max_samples=4000"],
    "pneumoniamnist": ["data.dataset=pneumoniamnist"],
}

#: The federation every ε shares (only ``dp.*`` changes between runs).
COMMON: list[str] = [
    "partition.num_sites=5", "partition.scheme=iid", "partition.site_val_fraction=0.2",
    "model.name=cnn", "model.kwargs={width: 16}",
    "strategy.name=fedavg", "strategy.rounds=10", "strategy.min_train_sites=5",
    "strategy.min_evaluate_sites=5", "strategy.min_available_sites=5",
    "train.local_epochs=2", "train.batch_size=64", "train.lr=0.005", "train.optimizer=adam",
    "baselines.centralized=false", "baselines.local_only=false",
    "dp.max_grad_norm=1.0", "dp.accountant=rdp",
]
