"""Site evaluation with the next round's training (``strategy.site_evaluation``)."""

from __future__ import annotations

import csv
import json
from collections import OrderedDict
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from fake_run import synthetic_images, tiny_run_config
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict

from consilia.common.config import DPConfig, StrategyConfig
from consilia.common.constants import ConfigKey, MessageKey
from consilia.common.rundir.round_records import (
    LATE_KEY,
    is_late_record,
    merge_round_records,
    read_round_records,
)
from consilia.server.progress import format_round
from consilia.simulations.audits.message_audit import audit_reply


class FakeGrid:
    """Three connected nodes; records nothing (the strategy only samples and builds)."""

    def get_node_ids(self):
        return [11, 12, 13]


def _strategy(recorder, **cfg):
    from consilia.server.strategy import build_strategy

    config = StrategyConfig(name="fedavg", rounds=3, min_train_sites=2, min_evaluate_sites=2,
                            min_available_sites=2, **cfg)
    return build_strategy(config, DPConfig(), recorder)


def _arrays():
    return ArrayRecord(OrderedDict(w=torch.zeros(3)))


def _train_flags(strategy, server_round):
    messages = list(strategy.configure_train(server_round, _arrays(), ConfigRecord({}),
                                             FakeGrid()))
    assert len(messages) == 3
    return {bool(m.content["config"].get(ConfigKey.EVALUATE_RECEIVED.value, False))
            for m in messages}


def test_train_messages_ask_for_the_received_model_from_round_two_and_evaluate_only_last():
    strategy = _strategy(recorder=None)
    assert _train_flags(strategy, 1) == {False}  # round 1 receives the untrained model
    assert _train_flags(strategy, 2) == {True}
    assert _train_flags(strategy, 3) == {True}
    assert list(strategy.configure_evaluate(1, _arrays(), ConfigRecord({}), FakeGrid())) == []
    assert list(strategy.configure_evaluate(2, _arrays(), ConfigRecord({}), FakeGrid())) == []
    final = list(strategy.configure_evaluate(3, _arrays(), ConfigRecord({}), FakeGrid()))
    assert len(final) == 3  # the final model gets its own evaluate messages


@pytest.mark.parametrize("cfg", [{"site_evaluation": "separate"}, {"fraction_evaluate": 0.0}])
def test_separate_evaluation_or_none_leaves_train_messages_alone(cfg):
    strategy = _strategy(recorder=None, **cfg)
    assert _train_flags(strategy, 2) == {False}
    evaluate = list(strategy.configure_evaluate(1, _arrays(), ConfigRecord({}), FakeGrid()))
    assert len(evaluate) == (3 if cfg.get("site_evaluation") == "separate" else 0)


def _train_reply(node: int, site: str, evaluation: dict | None) -> Message:
    content = RecordDict({
        MessageKey.ARRAYS.value: _arrays(),
        MessageKey.METRICS.value: MetricRecord({"train-loss": 0.5, "num-examples": 100}),
        MessageKey.SITE.value: ConfigRecord({"name": site}),
    })
    if evaluation is not None:
        content[MessageKey.EVALUATION.value] = ConfigRecord(evaluation)
    msg = Message(content=content, dst_node_id=node, message_type="train")
    return SimpleNamespace(content=content, metadata=SimpleNamespace(src_node_id=node),
                           has_error=lambda: False, has_content=lambda: True, message=msg)


def test_recorder_merges_the_late_evaluation_into_its_round(tmp_path):
    from consilia.common.data.images import ImageData
    from consilia.server.recorder import RunRecorder

    run = tiny_run_config(["a", "b", "c"])
    images, labels = synthetic_images(24, 3, np.random.default_rng(0))
    recorder = RunRecorder(tmp_path, run, ImageData(images, labels))
    strategy = _strategy(recorder)
    recorder.on_global_evaluation(0, _arrays_of(run))
    recorder.close_round(0)
    replies = [_train_reply(11, "site-00", None), _train_reply(12, "site-01", None)]
    strategy.aggregate_train(1, replies)
    recorder.on_global_evaluation(1, _arrays_of(run))
    recorder.close_round(1)
    replies = [
        _train_reply(11, "site-00", {"accuracy": 0.5, "auc": 0.6, "num-examples": 10}),
        _train_reply(12, "site-01", {"accuracy": 1.0, "auc": 0.9, "num-examples": 30}),
        _train_reply(13, "site-02", None),  # no validation split: trained, did not evaluate
    ]
    strategy.aggregate_train(2, replies)

    raw = read_round_records(tmp_path, merge=False)
    assert [r["round"] for r in raw] == [0, 1, 1]
    late = raw[-1]
    assert is_late_record(late) and late[LATE_KEY] == 2
    assert late["federated_eval"]["accuracy"] == pytest.approx((0.5 * 10 + 1.0 * 30) / 40)
    assert set(late["sites"]) == {"site-00", "site-01"}

    merged = read_round_records(tmp_path)
    assert [r["round"] for r in merged] == [0, 1]
    round1 = merged[1]
    assert round1["federated_eval"]["auc"] == pytest.approx((0.6 * 10 + 0.9 * 30) / 40)
    assert round1["sites"]["site-00"]["train-loss"] == 0.5  # train metrics kept
    assert round1["sites"]["site-01"]["accuracy"] == 1.0  # evaluation merged in
    assert "elapsed_s" in round1 and "server_eval" in round1
    assert recorder.rounds[1]["federated_eval"] == round1["federated_eval"]
    with (tmp_path / "metrics" / "rounds.csv").open() as fh:
        rows = list(csv.DictReader(fh))
    assert float(rows[1]["federated_eval.accuracy"]) == pytest.approx(0.875)
    assert float(rows[1]["train.train-loss"]) == pytest.approx(0.5)


def _arrays_of(run):
    from consilia.common.serde import arrays_from_model, model_from_run_config

    return arrays_from_model(model_from_run_config(run))


def test_merge_keeps_file_order_and_tolerates_a_late_record_without_its_round():
    records = [
        {"round": 1, "elapsed_s": 1.0, "sites": {"a": {"train-loss": 1.0}}},
        {"round": 1, LATE_KEY: 2, "federated_eval": {"accuracy": 0.7},
         "sites": {"a": {"accuracy": 0.7}}},
        {"round": 5, LATE_KEY: 6, "federated_eval": {"accuracy": 0.9}, "sites": {}},
    ]
    merged = merge_round_records(records)
    assert merged[0] == {"round": 1, "elapsed_s": 1.0, "federated_eval": {"accuracy": 0.7},
                         "sites": {"a": {"train-loss": 1.0, "accuracy": 0.7}}}
    assert merged[1]["round"] == 5  # kept as its round's record
    assert "accuracy" not in records[0]["sites"]["a"]  # inputs untouched


def test_read_round_records_skips_a_torn_line_and_missing_files(tmp_path, caplog):
    assert read_round_records(tmp_path / "nowhere") == []
    path = tmp_path / "metrics" / "rounds.jsonl"
    path.parent.mkdir()
    path.write_text(json.dumps({"round": 0}) + "\n" + '{"round": 1, "elap')
    assert read_round_records(tmp_path) == [{"round": 0}]
    assert "line 2 is not JSON" in caplog.text


def test_progress_line_of_a_late_record_says_which_round_carried_it():
    lines = format_round({"round": 3, LATE_KEY: 4, "federated_eval": {"accuracy": 0.91,
                                                                       "auc": 0.98},
                          "sites": {"a": {}, "b": {}}}, total_rounds=5)
    assert lines == ["[round 3/5] site-val acc 0.9100 AUC 0.9800 (2 site(s), evaluated "
                     "with round 4's training)"]


def test_message_audit_allows_only_scalar_scores_in_the_evaluation_record():
    shapes = {"w": (3,)}
    ok = _train_reply(1, "a", {"accuracy": 0.5, "num-examples": 10}).message
    assert audit_reply(ok, shapes, "train") == []
    leaky = _train_reply(1, "a", {"accuracy": 0.5, "patient-id": "12345"}).message
    problems = audit_reply(leaky, shapes, "train")
    assert any("patient-id" in p for p in problems)
    assert any("not a scalar" in p for p in problems)
    evaluate = Message(content=RecordDict({
        MessageKey.METRICS.value: MetricRecord({"accuracy": 0.5}),
        MessageKey.EVALUATION.value: ConfigRecord({"accuracy": 0.5})}),
        dst_node_id=1, message_type="evaluate")
    assert any("received-model-evaluation" in p for p in audit_reply(evaluate, shapes,
                                                                       "evaluate"))


def test_site_log_line_keeps_the_received_models_scores_apart_from_training():
    from consilia.client.site.worker import TaskOutcome, _metrics_of

    reply = _train_reply(1, "a", {"accuracy": 0.75, "num-examples": 8}).message
    outcome = TaskOutcome(7, "2", "train", "ok", 1.5, metrics=_metrics_of(reply),
                          evaluation=_metrics_of(reply, MessageKey.EVALUATION.value))
    line = json.loads(outcome.to_json())
    assert line["metrics"] == {"train-loss": 0.5, "num-examples": 100}
    assert line["evaluation"] == {"accuracy": 0.75, "num-examples": 8}
    plain = json.loads(TaskOutcome(7, "1", "train", "ok", 1.0).to_json())
    assert "evaluation" not in plain
