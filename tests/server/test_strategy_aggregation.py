"""Each registered strategy's aggregate of hand-built replies against a hand computation.

The replies pass the real recording strategy (update validation, round hooks) and reach
Flower 1.42's own aggregation; the expected values are computed here independently.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from consilia.common.config import DPConfig, StrategyConfig, UpdateValidationConfig
from consilia.common.constants import MessageKey
from consilia.common.serde import pack_state
from consilia.server.strategy import build_strategy

GLOBAL = np.zeros(4, dtype=np.float32)


class FakeGrid:
    """Connected nodes 1..n (the strategy only samples them)."""

    def __init__(self, n: int) -> None:
        self.n = n

    def get_node_ids(self) -> list[int]:
        return list(range(1, self.n + 1))


class NotingHooks:
    """Round hooks that keep incomplete rounds and the aggregated train metrics."""

    def __init__(self) -> None:
        self.incomplete: list[tuple[int, int, int]] = []
        self.train_metrics: list[MetricRecord | None] = []

    def on_train_incomplete(self, server_round, replies, answered, required):
        self.incomplete.append((server_round, answered, required))

    def on_train_aggregated(self, server_round, replies, metrics):
        self.train_metrics.append(metrics)

    def __getattr__(self, name: str):  # every other hook: note nothing
        return lambda *args, **kwargs: None


def _arrays(values: np.ndarray) -> ArrayRecord:
    return pack_state(OrderedDict(w=torch.tensor(np.asarray(values, dtype=np.float32))))


def _reply(node: int, values: list[float], num_examples: int, loss: float) -> Message:
    instruction = Message(content=RecordDict({MessageKey.CONFIG.value: ConfigRecord({})}),
                          dst_node_id=node, message_type="train")
    content = RecordDict({
        MessageKey.ARRAYS.value: _arrays(np.array(values)),
        MessageKey.METRICS.value: MetricRecord({"train-loss": loss,
                                                "num-examples": num_examples}),
        MessageKey.SITE.value: ConfigRecord({"name": f"site-{node:02d}"}),
    })
    return Message(content=content, reply_to=instruction)


def _strategy(name: str, hooks: Any = None, **params: Any):
    cfg = StrategyConfig(name=name, rounds=5, min_train_sites=2, min_evaluate_sites=0,
                         min_available_sites=2, site_evaluation="separate",
                         fraction_evaluate=0.0,
                         # the aggregators themselves, not the norm screen, face the outliers
                         validation=UpdateValidationConfig(max_update_norm_ratio=None),
                         **params)
    return build_strategy(cfg, DPConfig(), hooks)


def _aggregate(strategy: Any, rows: list[list[float]], counts: list[int],
               global_values: np.ndarray = GLOBAL, server_round: int = 1,
               losses: list[float] | None = None):
    losses = losses or [0.1 * (i + 1) for i in range(len(rows))]
    list(strategy.configure_train(server_round, _arrays(global_values), ConfigRecord({}),
                                  FakeGrid(len(rows))))
    replies = [_reply(i + 1, row, count, loss)
               for i, (row, count, loss) in enumerate(zip(rows, counts, losses, strict=True))]
    arrays, metrics = strategy.aggregate_train(server_round, replies)
    values = None if arrays is None else next(iter(arrays.values())).numpy()
    return values, metrics


def _krum_scores(rows: np.ndarray, f: int) -> list[float]:
    """Krum's score: the sum of squared distances to the n−f−2 nearest other replies."""
    n = len(rows)
    scores = []
    for i in range(n):
        dists = sorted(float(np.sum((rows[i] - rows[j]) ** 2)) for j in range(n) if j != i)
        scores.append(sum(dists[:max(1, n - f - 2)]))
    return scores


ROWS = [[1.0, 2.0, 3.0, 4.0], [3.0, 0.0, 5.0, 4.0], [2.0, 7.0, 1.0, 10.0]]
COUNTS = [100, 300, 50]


def test_median_is_the_element_wise_median_whatever_num_examples_say() -> None:
    hooks = NotingHooks()
    values, metrics = _aggregate(_strategy("median", hooks), ROWS, COUNTS)
    np.testing.assert_array_equal(values, [2.0, 2.0, 3.0, 4.0])
    # the train metrics stay the num-examples-weighted mean over the accepted replies
    expected_loss = (0.1 * 100 + 0.2 * 300 + 0.3 * 50) / 450
    assert float(metrics["train-loss"]) == pytest.approx(expected_loss)
    assert hooks.train_metrics == [metrics]


def test_trimmed_mean_cuts_floor_beta_n_replies_at_each_end_of_every_coordinate() -> None:
    rows = [[0.0, 10.0], [1.0, 11.0], [2.0, -50.0], [3.0, 12.0], [100.0, 13.0]]
    values, _ = _aggregate(_strategy("trimmed-mean", trimmed_mean={"beta": 0.2}),
                           [r + [0.0, 0.0] for r in rows], [10, 20, 30, 40, 50])
    # 5 replies, beta 0.2: drop the lowest and the highest of each coordinate
    expected = [np.mean(sorted(col)[1:-1]) for col in zip(*rows, strict=True)]
    np.testing.assert_allclose(values[:2], expected, rtol=1e-6)
    np.testing.assert_allclose(values[:2], [2.0, 11.0], rtol=1e-6)


KRUM_ROWS = [[1.0, 1.0, 1.0, 1.0], [1.1, 1.0, 1.0, 1.0], [0.85, 1.0, 1.0, 1.0],
             [1.0, 1.3, 1.0, 1.0], [5.0, 5.0, 5.0, 5.0]]


def test_krum_returns_the_reply_closest_to_its_nearest_others() -> None:
    scores = _krum_scores(np.array(KRUM_ROWS), f=1)
    assert int(np.argmin(scores)) == 0  # the hand-picked centre of the honest cluster
    values, _ = _aggregate(_strategy("krum", krum={"num_malicious_nodes": 1}),
                           KRUM_ROWS, [10, 20, 30, 40, 1000])
    np.testing.assert_allclose(values, KRUM_ROWS[0], rtol=1e-6)


def test_multi_krum_averages_the_m_best_scored_replies_weighted_by_num_examples() -> None:
    scores = _krum_scores(np.array(KRUM_ROWS), f=1)
    best = sorted(np.argsort(scores)[:2].tolist())
    assert best == [0, 1]
    counts = [10, 30, 30, 40, 1000]
    values, _ = _aggregate(
        _strategy("multi-krum", multi_krum={"num_malicious_nodes": 1, "num_nodes_to_select": 2}),
        KRUM_ROWS, counts)
    expected = (10 * np.array(KRUM_ROWS[0]) + 30 * np.array(KRUM_ROWS[1])) / 40
    np.testing.assert_allclose(values, expected, rtol=1e-6)


def _bulyan(rows: np.ndarray, f: int) -> np.ndarray:
    """Bulyan by hand: Multi-Krum keeps n−2f, then per coordinate the mean of the n−4f
    values nearest the coordinate-wise median of the kept ones."""
    theta, beta = len(rows) - 2 * f, len(rows) - 4 * f
    kept = rows[np.argsort(_krum_scores(rows, f))[:theta]]
    median = np.median(kept, axis=0)
    out = []
    for j in range(rows.shape[1]):
        nearest = sorted(kept[:, j], key=lambda v, m=median[j]: abs(v - m))[:beta]
        out.append(np.mean(nearest))
    return np.array(out)


def test_bulyan_matches_the_hand_computation_and_ignores_the_outlier() -> None:
    honest = 1.0 + 0.1 * np.random.default_rng(0).standard_normal((6, 4))  # no ties
    rows = np.vstack([honest, [[90.0, -80.0, 70.0, 60.0]]]).astype(np.float32)
    values, _ = _aggregate(_strategy("bulyan", bulyan={"num_malicious_nodes": 1}),
                           rows.tolist(), [5, 6, 7, 8, 9, 10, 10_000])
    np.testing.assert_allclose(values, _bulyan(rows.astype(np.float64), f=1), rtol=1e-5)
    honest = rows[:-1]
    assert np.all(values >= honest.min(axis=0)) and np.all(values <= honest.max(axis=0))


def test_bulyan_with_fewer_than_4f_plus_3_replies_keeps_the_global_model() -> None:
    hooks = NotingHooks()
    values, metrics = _aggregate(_strategy("bulyan", hooks, bulyan={"num_malicious_nodes": 1}),
                                 KRUM_ROWS, [1] * 5)
    assert values is None and metrics is None
    assert hooks.incomplete == [(1, 5, 7)]


def test_fedyogi_takes_one_yogi_step_on_the_weighted_mean() -> None:
    params = {"eta": 0.05, "eta_l": 0.01, "beta_1": 0.8, "beta_2": 0.9, "tau": 1e-2}
    x = np.array([0.5, -0.5, 0.0, 1.0], dtype=np.float32)
    values, _ = _aggregate(_strategy("fedyogi", fedyogi=params), ROWS, COUNTS, x)
    mean = (np.array(ROWS) * np.array(COUNTS)[:, None]).sum(axis=0) / sum(COUNTS)
    delta = mean - x
    m = (1 - 0.8) * delta  # m_0 = 0
    v = (1 - 0.9) * delta ** 2  # v_0 = 0: v_1 = v_0 - (1 - b2)·Δ²·sign(v_0 - Δ²)
    np.testing.assert_allclose(values, x + 0.05 * m / (np.sqrt(v) + 1e-2), rtol=1e-5)


def test_fedadagrad_takes_one_adagrad_step_on_the_weighted_mean() -> None:
    x = np.array([0.5, -0.5, 0.0, 1.0], dtype=np.float32)
    values, _ = _aggregate(_strategy("fedadagrad", fedadagrad={"eta": 0.3, "tau": 0.1}),
                           ROWS, COUNTS, x)
    mean = (np.array(ROWS) * np.array(COUNTS)[:, None]).sum(axis=0) / sum(COUNTS)
    delta = mean - x
    np.testing.assert_allclose(values, x + 0.3 * delta / (np.abs(delta) + 0.1), rtol=1e-5)


def test_fedavgm_applies_server_momentum_across_rounds() -> None:
    strategy = _strategy("fedavgm", fedavgm={"server_learning_rate": 0.5,
                                             "server_momentum": 0.9})
    counts = [1, 3]
    x1 = np.zeros(4, dtype=np.float32)
    rows1, rows2 = [[1.0, 1.0, 1.0, 1.0], [3.0, 3.0, 3.0, 3.0]], [[0.0, 2.0, 0.0, 2.0]] * 2
    got1, _ = _aggregate(strategy, rows1, counts, x1, server_round=1)
    pseudo1 = x1 - (1 * np.array(rows1[0]) + 3 * np.array(rows1[1])) / 4
    x2 = x1 - 0.5 * pseudo1
    np.testing.assert_allclose(got1, x2, rtol=1e-6)
    got2, _ = _aggregate(strategy, rows2, counts, x2.astype(np.float32), server_round=2)
    momentum = 0.9 * pseudo1 + (x2 - np.array(rows2[0]))
    np.testing.assert_allclose(got2, x2 - 0.5 * momentum, rtol=1e-5)


@pytest.mark.parametrize("name", ["trimmed-mean", "median", "krum", "multi-krum", "fedyogi"])
def test_the_proximal_term_is_sent_only_by_fedprox(name: str) -> None:
    strategy = _strategy(name, proximal_mu=0.5)
    messages = list(strategy.configure_train(1, _arrays(GLOBAL), ConfigRecord({}),
                                             FakeGrid(3)))
    assert messages and all("proximal-mu" not in m.content["config"] for m in messages)
