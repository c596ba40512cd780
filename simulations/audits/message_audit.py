"""Message audit: record every reply a site sends and check it carries no data, only weights.

:func:`recording_client_app` wraps a ClientApp so that each reply it returns is written, in
Flower's wire format (``message_to_proto``, through
:mod:`consilia.common.flower.wire_format`), to a folder — it works in Flower's Ray
simulation too, because the wrapper travels to the Ray workers with the app.
:func:`audit_reply` then checks one reply against what a site is allowed to send:

- an ``ArrayRecord`` ``"arrays"`` (training replies only) whose keys, shapes and floating
  dtypes are exactly the model's packed weights (one flat vector per dtype,
  :func:`consilia.common.serde.packed_shapes`; a record of named tensors is compared with the
  ``state_dict`` the same way);
- for a classifier-calibration ``query`` reply instead: exactly the per-class aggregates
  ``counts`` (C,), ``sums`` (C, D) and ``outer-sums`` (C, D, D) of the head's input features;
- a ``MetricRecord`` ``"metrics"`` of scalar numbers (no lists);
- a ``ConfigRecord`` ``"site"`` holding only ``{"name": <site name>}``;
- in a training reply, optionally a ``ConfigRecord`` ``"received-model-evaluation"``: the
  site's scalar validation scores of the model it received (``site_evaluation:
  with-next-round``);
- nothing else: no other record, so no image, label or per-example array can leave the site.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from uuid import uuid4

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from consilia.common.constants import CalibrationKey, MessageKey, MetricKey, SiteRecordKey
from consilia.common.flower.wire_format import message_from_bytes, message_to_bytes

__all__ = ["audit_reply", "load_recorded_replies", "recording_client_app"]

#: The arrays of a classifier-calibration reply, in the order they are checked.
_CALIBRATION_ARRAYS = tuple(key.value for key in CalibrationKey)
_FLOAT_DTYPES = {"float16", "bfloat16", "float32", "float64"}
#: What a site's evaluation of a model may hold (``SiteTrainer.evaluate``).
EVALUATION_KEYS = {MetricKey.EVAL_LOSS.value, MetricKey.ACCURACY.value,
                   MetricKey.BALANCED_ACCURACY.value, MetricKey.AUC.value, MetricKey.F1.value,
                   MetricKey.NUM_EXAMPLES.value}


def recording_client_app(base: ClientApp, out_dir: Path) -> ClientApp:
    """Return a ClientApp that runs ``base`` and saves every reply it sends to ``out_dir``.

    Each reply is one ``<message type>-<uuid>.pb`` file (Flower's protobuf ``Message``).
    Exceptions propagate unchanged (Flower turns them into error replies, which carry no
    content).
    """
    out = Path(out_dir).resolve()
    app = ClientApp()

    def _run(msg: Message, context: Context) -> Message:
        reply = base(msg, context)
        out.mkdir(parents=True, exist_ok=True)
        kind = msg.metadata.message_type.split(".")[0]
        path = out / f"{kind}-{uuid4().hex}.pb"
        path.write_bytes(message_to_bytes(reply))
        return reply

    app.train()(_run)
    app.evaluate()(_run)
    app.query()(_run)
    return app


def load_recorded_replies(out_dir: Path) -> list[tuple[str, Message]]:
    """Read back the replies saved by :func:`recording_client_app` as ``(type, Message)``."""
    replies = []
    for path in sorted(Path(out_dir).glob("*.pb")):
        replies.append((path.name.split("-")[0], message_from_bytes(path.read_bytes())))
    return replies


def audit_reply(
    reply: Message, expected_arrays: Mapping[str, tuple[int, ...]], message_type: str
) -> list[str]:
    """Return every way ``reply`` breaks the site's message contract (empty list: clean).

    Parameters
    ----------
    reply : Message
        A reply a site sent.
    expected_arrays : mapping
        The keys and shapes a training reply's weights must have
        (:func:`consilia.common.serde.packed_shapes` of the model's ``state_dict``).
    message_type : str
        ``"train"`` (weights expected), ``"evaluate"`` (no arrays allowed) or ``"query"``
        (per-class feature aggregates only).

    """
    problems: list[str] = []
    if reply.has_error():
        return problems  # an error reply carries a reason string only, no content
    content = reply.content
    allowed = {MessageKey.METRICS.value, MessageKey.SITE.value}
    if message_type in ("train", "query"):
        allowed.add(MessageKey.ARRAYS.value)
    if message_type == "train":
        allowed.add(MessageKey.EVALUATION.value)
    extra = set(content.keys()) - allowed
    if extra:
        problems.append(f"unexpected record(s) {sorted(extra)}")
    for name, record in content.array_records.items():
        if name == MessageKey.ARRAYS.value and message_type == "query":
            problems.extend(_audit_feature_stats(record))
            continue
        if name != MessageKey.ARRAYS.value or message_type != "train":
            problems.append(f"array record '{name}' in a {message_type} reply")
            continue
        keys, model_keys = set(record.keys()), set(expected_arrays)
        if keys != model_keys:
            problems.append(f"array keys differ from the model's: extra "
                            f"{sorted(keys - model_keys)}, missing {sorted(model_keys - keys)}")
        for key, array in record.items():
            want = expected_arrays.get(key)
            if want is not None and tuple(array.shape) != tuple(want):
                problems.append(f"array '{key}' has shape {tuple(array.shape)}, model {want}")
            if array.dtype not in _FLOAT_DTYPES:
                problems.append(f"array '{key}' has dtype {array.dtype} (not a weight)")
    if message_type == "train" and MessageKey.ARRAYS.value not in content.array_records:
        problems.append("training reply without the model's weights")
    for name, record in content.metric_records.items():
        if name != MessageKey.METRICS.value:
            problems.append(f"metric record '{name}' is not '{MessageKey.METRICS.value}'")
        for key, value in record.items():
            if not isinstance(value, int | float) or isinstance(value, bool):
                problems.append(f"metric '{key}' is {type(value).__name__}, not a scalar")
    for name, record in content.config_records.items():
        if name == MessageKey.EVALUATION.value and message_type == "train":
            problems.extend(_audit_evaluation(record))
            continue
        if name != MessageKey.SITE.value:
            problems.append(f"config record '{name}' is not '{MessageKey.SITE.value}'")
            continue
        name = SiteRecordKey.NAME.value
        if set(record.keys()) != {name} or not isinstance(record.get(name), str):
            problems.append(f"site record holds {json.dumps(sorted(record.keys()))}, "
                            "expected only the site name")
    return problems


def _audit_evaluation(record: Mapping) -> list[str]:
    """Check a train reply's evaluation of the received model holds only scalar scores."""
    problems = []
    extra = set(record.keys()) - EVALUATION_KEYS
    if extra:
        problems.append(f"evaluation record holds {sorted(extra)}, expected only "
                        f"{sorted(EVALUATION_KEYS)}")
    for key, value in record.items():
        if not isinstance(value, int | float) or isinstance(value, bool):
            problems.append(f"evaluation '{key}' is {type(value).__name__}, not a scalar")
    return problems


def _audit_feature_stats(record: Mapping) -> list[str]:
    """Check a calibration reply holds only per-class aggregates of consistent shapes."""
    keys = set(record.keys())
    if keys != set(_CALIBRATION_ARRAYS):
        return [f"feature-statistics reply holds arrays {sorted(keys)}, expected "
                "['counts', 'outer-sums', 'sums']"]
    counts, sums, outer = (tuple(record[k].shape) for k in _CALIBRATION_ARRAYS)
    problems = []
    if len(counts) != 1 or len(sums) != 2 or sums[0] != counts[0] \
            or outer != (sums[0], sums[1], sums[1]):
        problems.append(f"feature-statistics shapes are not per-class aggregates: counts "
                        f"{counts}, sums {sums}, outer-sums {outer}")
    for key in _CALIBRATION_ARRAYS:
        if record[key].dtype not in _FLOAT_DTYPES:
            problems.append(f"array '{key}' has dtype {record[key].dtype}")
    return problems
