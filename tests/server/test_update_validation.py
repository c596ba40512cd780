"""Update validation before aggregation: each attack is dropped, named and recorded."""

from __future__ import annotations

import json
from collections import OrderedDict
from typing import Any

import numpy as np
import pytest
import torch
from fake_run import tiny_run_config
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from consilia.common.config import DPConfig, StrategyConfig, UpdateValidationConfig
from consilia.common.constants import MessageKey
from consilia.common.serde import pack_state
from consilia.server.progress import format_round
from consilia.server.site_names import site_name
from consilia.server.strategy import STRATEGIES, build_strategy
from consilia.server.update_validation import UpdateValidator, example_count_problem

HONEST = {"site-00": (11, 100), "site-01": (12, 300), "site-02": (13, 50)}
ATTACKER = ("site-03", 14)


class FakeGrid:
    """Four connected nodes (the strategy only samples them)."""

    def get_node_ids(self) -> list[int]:
        return [11, 12, 13, 14]


class NotingHooks:
    """Round hooks that keep what they are told (see consilia.server.round_hooks.RoundHooks)."""

    def __init__(self) -> None:
        self.rejected: list[tuple[int, dict[str, Any]]] = []
        self.excluded: list[tuple[int, dict[str, Any]]] = []
        self.incomplete: list[tuple[int, int, int]] = []

    def on_rejected_replies(self, server_round, rejected, excluded):
        self.rejected += [(server_round, r.to_dict()) for r in rejected]
        self.excluded += [(server_round, e.to_dict()) for e in excluded]

    def on_train_incomplete(self, server_round, replies, answered, required):
        self.incomplete.append((server_round, answered, required))

    def __getattr__(self, name: str):  # every other hook: note nothing
        return lambda *args, **kwargs: None


def _global_state() -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    return OrderedDict(
        w=torch.randn(4, 3, generator=gen), b=torch.randn(3, generator=gen),
        steps=torch.tensor(7, dtype=torch.int64),
    )


def _site_state(seed: int) -> OrderedDict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    state = _global_state()
    for key in ("w", "b"):
        state[key] = state[key] + 0.01 * torch.randn(state[key].shape, generator=gen)
    state["steps"] = state["steps"] + 3
    return state


def _instruction(node: int) -> Message:
    return Message(content=RecordDict({MessageKey.CONFIG.value: ConfigRecord({})}),
                   dst_node_id=node, message_type="train")


def _reply(site: str, node: int, arrays: ArrayRecord, num_examples: Any = 100,
           **extra_metrics: Any) -> Message:
    content = RecordDict({
        MessageKey.ARRAYS.value: arrays,
        MessageKey.METRICS.value: MetricRecord(
            {"train-loss": 0.5, "num-examples": num_examples, **extra_metrics}),
        MessageKey.SITE.value: ConfigRecord({"name": site}),
    })
    return Message(content=content, reply_to=_instruction(node))


def _honest_replies(seed: int = 1) -> list[Message]:
    return [_reply(site, node, pack_state(_site_state(seed * 10 + node)), count)
            for site, (node, count) in HONEST.items()]


def _strategy(hooks: Any = None, dp: DPConfig | None = None, name: str = "fedavg",
              **validation: Any):
    cfg = StrategyConfig(name=name, rounds=10, min_train_sites=2, min_evaluate_sites=2,
                         min_available_sites=2, site_evaluation="separate",
                         validation=UpdateValidationConfig(**validation))
    strategy = build_strategy(cfg, dp or DPConfig(), hooks)
    return strategy


def _floats_only(arrays: ArrayRecord) -> ArrayRecord:
    """``arrays`` without the int64 record (Flower's DP clipping scales every array in place)."""
    return ArrayRecord(OrderedDict((k, v) for k, v in arrays.items() if "-int64-" not in k))


def _train(strategy: Any, server_round: int, replies: list[Message],
           global_arrays: ArrayRecord | None = None):
    global_arrays = global_arrays or pack_state(_global_state())
    list(strategy.configure_train(server_round, global_arrays, ConfigRecord({}), FakeGrid()))
    return strategy.aggregate_train(server_round, replies)


def _honest_aggregate(seed: int = 1, name: str = "fedavg") -> ArrayRecord:
    arrays, _ = _train(_strategy(name=name), 1, _honest_replies(seed))
    assert arrays is not None
    return arrays


def _assert_same(got: ArrayRecord | None, expected: ArrayRecord) -> None:
    assert got is not None and list(got.keys()) == list(expected.keys())
    for key in expected.keys():
        np.testing.assert_array_equal(got[key].numpy(), expected[key].numpy())


def _key(dtype: str) -> str:
    return next(k for k in pack_state(_global_state()).keys() if f"-{dtype}-" in k)


def _with(key: str, value: np.ndarray) -> ArrayRecord:
    arrays = pack_state(_site_state(99))
    return ArrayRecord(OrderedDict(
        (k, Array(value) if k == key else v) for k, v in arrays.items()))


def _float_values() -> np.ndarray:
    return pack_state(_site_state(99))[_key("float32")].numpy().copy()


def _nan() -> Message:
    values = _float_values()
    values[3] = np.nan
    return _reply(*ATTACKER, _with(_key("float32"), values))


def _inf() -> Message:
    values = _float_values()
    values[-1] = -np.inf
    return _reply(*ATTACKER, _with(_key("float32"), values))


def _scaled() -> Message:
    glob = pack_state(_global_state())[_key("float32")].numpy()
    values = glob + 1e6 * (_float_values() - glob)
    return _reply(*ATTACKER, _with(_key("float32"), values.astype(np.float32)))


def _wrong_shape() -> Message:
    return _reply(*ATTACKER, _with(_key("float32"), _float_values()[:-1]))


def _wrong_dtype() -> Message:
    return _reply(*ATTACKER, _with(_key("float32"), _float_values().astype(np.float64)))


def _missing_array() -> Message:
    arrays = pack_state(_site_state(99))
    return _reply(*ATTACKER, ArrayRecord(OrderedDict(
        (k, v) for k, v in arrays.items() if k != _key("int64"))))


def _count(value: Any):
    return lambda: _reply(*ATTACKER, pack_state(_site_state(99)), value)


ATTACKS = {
    "nan": (_nan, "NaN or infinite"),
    "inf": (_inf, "NaN or infinite"),
    "scaled-1e6": (_scaled, "the round's median"),
    "wrong-shape": (_wrong_shape, "the global model's is float32[15]"),
    "wrong-dtype": (_wrong_dtype, "float64"),
    "missing-array": (_missing_array, "missing ['packed-int64"),
    "num-examples-1e12": (_count(10**12), "exceeds strategy.validation.max_num_examples"),
    "num-examples-negative": (_count(-500), "is not positive"),
    "num-examples-zero": (_count(0), "is not positive"),
    "num-examples-fraction": (_count(12.5), "is not a whole number"),
    "num-examples-list": (_count([1.0, 2.0]), "is a list"),
}


@pytest.mark.parametrize("name", STRATEGIES.names())
@pytest.mark.parametrize("attack", sorted(ATTACKS))
def test_a_bad_update_is_dropped_named_and_the_honest_aggregate_kept(attack: str,
                                                                     name: str) -> None:
    make_bad, reason = ATTACKS[attack]
    hooks = NotingHooks()
    replies = [*_honest_replies(), make_bad()]
    arrays, metrics = _train(_strategy(hooks, name=name), 1, replies)
    _assert_same(arrays, _honest_aggregate(name=name))
    assert metrics is not None and np.isfinite(float(metrics["train-loss"]))
    assert len(hooks.rejected) == 1
    server_round, rejection = hooks.rejected[0]
    assert server_round == 1 and rejection["site"] == "site-03" and rejection["node"] == 14
    assert reason in rejection["reason"], rejection["reason"]


def test_the_honest_aggregate_is_the_weighted_average() -> None:
    arrays = _honest_aggregate()
    key = _key("float32")
    counts = np.array([count for _node, count in HONEST.values()], dtype=np.float64)
    updates = [r.content["arrays"][key].numpy() for r in _honest_replies()]
    expected = sum(u * (c / counts.sum()) for u, c in zip(updates, counts, strict=True))
    np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)


def test_honest_replies_pass_untouched_and_nothing_is_recorded() -> None:
    hooks = NotingHooks()
    _train(_strategy(hooks), 1, _honest_replies())
    assert hooks.rejected == [] and hooks.excluded == []


def test_the_norm_check_needs_three_replies() -> None:
    hooks = NotingHooks()
    replies = [*_honest_replies()[:1], _scaled()]  # two replies: no median to speak of
    arrays, _ = _train(_strategy(hooks), 1, replies)
    assert hooks.rejected == [] and arrays is not None


def test_a_site_may_not_claim_far_more_examples_than_it_first_reported() -> None:
    hooks = NotingHooks()
    strategy = _strategy(hooks)
    _train(strategy, 1, _honest_replies(1))
    site, (node, count) = "site-01", HONEST["site-01"]
    grown = _reply(site, node, pack_state(_site_state(7)), count * 10 + 1)
    replies = [r for r in _honest_replies(2) if r.metadata.src_node_id != node] + [grown]
    _train(strategy, 2, replies)
    assert [(rnd, r["site"]) for rnd, r in hooks.rejected] == [(2, "site-01")]
    assert "max_num_examples_growth" in hooks.rejected[0][1]["reason"]
    within = _reply(site, node, pack_state(_site_state(8)), count * 10)
    _train(strategy, 3, [*replies[:-1], within])
    assert len(hooks.rejected) == 1  # ten times its first count is still allowed


def test_a_site_rejected_in_exclude_after_rounds_is_excluded_once_and_then_ignored() -> None:
    hooks = NotingHooks()
    strategy = _strategy(hooks, exclude_after=2)
    for rnd in (1, 2):
        _train(strategy, rnd, [*_honest_replies(rnd), _nan()])
    assert [rnd for rnd, _ in hooks.rejected] == [1, 2]
    assert hooks.excluded == [(2, {"site": "site-03", "node": 14, "rejected_rounds": [1, 2]})]
    # round 3: its reply is well-formed, but ignored; nothing more is said
    honest_reply = _reply(*ATTACKER, pack_state(_site_state(3)), 100)
    arrays, _ = _train(strategy, 3, [*_honest_replies(3), honest_reply])
    _assert_same(arrays, _honest_aggregate(3))
    assert len(hooks.rejected) == 2 and len(hooks.excluded) == 1


def test_too_few_good_replies_keep_the_global_model() -> None:
    hooks = NotingHooks()
    arrays, metrics = _train(_strategy(hooks), 1, [_honest_replies()[0], _nan()])
    assert (arrays, metrics) == (None, None)
    assert hooks.incomplete == [(1, 1, 2)] and len(hooks.rejected) == 1


def test_differing_metric_keys_do_not_stop_aggregation() -> None:
    # a site whose own policy demands DP also reports delta; Flower would refuse the round
    replies = _honest_replies()
    node, count = HONEST["site-02"]
    replies[2] = _reply("site-02", node, replies[2].content["arrays"], count, delta=1e-5)
    arrays, metrics = _train(_strategy(), 1, replies)
    _assert_same(arrays, _honest_aggregate())
    assert metrics is not None and "delta" not in metrics


def test_central_dp_screens_replies_before_clipping() -> None:
    hooks = NotingHooks()
    dp = DPConfig(enabled=True, mode="central", central_noise_multiplier=0.0)
    for bad in (_wrong_shape(), _nan()):
        strategy = _strategy(hooks, dp=dp)
        replies = [_reply(site_name(r), int(r.metadata.src_node_id),
                          _floats_only(r.content["arrays"]),
                          r.content["metrics"]["num-examples"])
                   for r in [*_honest_replies(), bad]]
        arrays, _ = _train(strategy, 1, replies, _floats_only(pack_state(_global_state())))
        assert arrays is not None and all(np.isfinite(a.numpy()).all() for a in arrays.values())
    assert [r["site"] for _, r in hooks.rejected] == ["site-03", "site-03"]


def _evaluate_reply(site: str, node: int, num_examples: Any) -> Message:
    content = RecordDict({
        MessageKey.METRICS.value: MetricRecord({"accuracy": 0.5, "num-examples": num_examples}),
        MessageKey.SITE.value: ConfigRecord({"name": site}),
    })
    return Message(content=content, reply_to=_instruction(node))


def test_a_bad_evaluate_reply_is_dropped_and_the_others_aggregated() -> None:
    hooks = NotingHooks()
    replies = [_evaluate_reply("site-00", 11, 10), _evaluate_reply("site-01", 12, 30),
               _evaluate_reply("site-03", 14, 0)]
    metrics = _strategy(hooks).aggregate_evaluate(1, replies)
    assert metrics is not None and float(metrics["accuracy"]) == pytest.approx(0.5)
    assert [(r["site"], r["phase"]) for _, r in hooks.rejected] == [("site-03", "evaluate")]


@pytest.mark.parametrize(("value", "ok"), [
    (1, True), (100.0, True), (0, False), (-1, False), (2.5, False), (float("nan"), False),
    (float("inf"), False), (True, False), (None, False), (10**9, False),
])
def test_example_count_problem(value: Any, ok: bool) -> None:
    assert (example_count_problem(value, cap=10**8) is None) is ok


def test_validator_without_a_global_model_still_refuses_nan() -> None:
    validator = UpdateValidator(UpdateValidationConfig())
    screening = validator.screen(1, [*_honest_replies(), _nan()])
    assert [r.site for r in screening.rejected] == ["site-03"]
    assert len(screening.kept) == 3


def test_the_recorder_writes_rejections_and_the_progress_line_names_the_site(tmp_path) -> None:
    from consilia.server.recorder import RunRecorder

    run = tiny_run_config(["a", "b", "c"])
    recorder = RunRecorder(tmp_path, run)
    strategy = _strategy(recorder, exclude_after=1)
    _train(strategy, 1, [*_honest_replies(), _nan()])
    recorder.close_round(1)
    record = json.loads((tmp_path / "metrics" / "rounds.jsonl").read_text().splitlines()[-1])
    assert [r["site"] for r in record["rejected"]] == ["site-03"]
    assert record["excluded"] == [{"site": "site-03", "node": 14, "rejected_rounds": [1]}]
    assert set(record["sites"]) == set(HONEST)
    lines = format_round(record, 10)
    assert any(line.strip().startswith("! site-03 train reply rejected: array") for line in lines)
    assert any("site-03 excluded for the rest of the run" in line for line in lines)
    header = (tmp_path / "metrics" / "rounds.csv").read_text().splitlines()[0]
    assert "rejected" not in header and "excluded" not in header


def _nan_sending_app(partition: int):
    """Consilia's ClientApp, except that partition ``partition`` sends NaN weights."""
    from flwr.app import Context
    from flwr.clientapp import ClientApp

    from consilia.client.app import app as consilia_app

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = consilia_app(msg, context)
        if int(context.node_config["partition-id"]) == partition:
            arrays = reply.content[MessageKey.ARRAYS.value]
            reply.content[MessageKey.ARRAYS.value] = ArrayRecord(OrderedDict(
                (k, Array(np.full_like(v.numpy(), np.nan))) for k, v in arrays.items()))
        return reply

    @app.evaluate()
    def evaluate(msg: Message, context: Context) -> Message:
        return consilia_app(msg, context)

    return app


@pytest.mark.slow
def test_a_federation_with_a_nan_sending_site_completes_with_a_finite_model(tmp_path) -> None:
    from inprocess_testkit import run_inprocess_experiment

    from consilia.common.config import load_experiment_config
    from consilia.common.rundir.layout import RunDir

    cfg = load_experiment_config(None, [
        "data.dataset=synthetic", "data.max_samples=240", "data.image_size=16",
        "model.name=cnn", "model.kwargs={width: 4}", "strategy.name=fedavg",
        "strategy.rounds=3", "partition.num_sites=3", "partition.scheme=iid",
        "strategy.min_train_sites=2", "strategy.min_evaluate_sites=2",
        "strategy.min_available_sites=3", "baselines.centralized=false",
        "baselines.local_only=false", "train.batch_size=16",
    ])
    result, _replies, rounds = run_inprocess_experiment(cfg, tmp_path / "run",
                                                        client_app=_nan_sending_app(1))
    trained = [r for r in rounds if r["round"] > 0]
    assert len(trained) == 3
    for record in trained:
        assert [(r["site"], r["phase"]) for r in record["rejected"]] == [("site-01", "train")]
        assert "NaN" in record["rejected"][0]["reason"]
        assert sorted(record["sites"]) == ["site-00", "site-02"]
        assert np.isfinite(record["server_eval"]["loss"])
    assert trained[-1]["excluded"] == [
        {"site": "site-01", "node": trained[-1]["rejected"][0]["node"],
         "rejected_rounds": [1, 2, 3]}]
    model, _run, _meta = RunDir(result.run_dir).load_global_model()
    assert all(torch.isfinite(t).all() for t in model.state_dict().values())
    assert np.isfinite(result.final["federated"]["accuracy"])


def test_an_integer_array_keeps_its_dtype_so_the_next_round_accepts_honest_replies() -> None:
    hooks = NotingHooks()
    strategy = _strategy(hooks)
    first, _ = _train(strategy, 1, _honest_replies(seed=1))
    assert first is not None
    key = _key("int64")
    assert first[key].numpy().dtype == np.int64
    assert first[key].numpy().tolist() == [10]  # every site counted 7 + 3 steps
    second, _ = _train(strategy, 2, _honest_replies(seed=2), global_arrays=first)
    assert second is not None and hooks.rejected == []
