"""Model weights on the wire: packed into one flat array per dtype, unpacked exactly."""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from torch import nn

from consilia.common.serde import (
    arrays_from_model,
    layout_digest,
    load_arrays_into_model,
    pack_state,
    packed_shapes,
    unpack_state,
)


def _bn_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 6 * 6, 3))


def test_pack_makes_one_array_per_dtype_and_unpacks_exactly() -> None:
    model = _bn_model()
    model(torch.randn(2, 1, 8, 8))  # running stats and num_batches_tracked (int64) move
    state = model.state_dict()
    record = pack_state(state)
    digest = layout_digest(state)
    assert sorted(record.keys()) == [f"packed-float32-{digest}", f"packed-int64-{digest}"]
    assert {k: tuple(v.shape) for k, v in record.items()} == packed_shapes(state)
    back = unpack_state(record, state)
    assert list(back) == list(state)
    for name, tensor in state.items():
        assert back[name].dtype == tensor.dtype and torch.equal(back[name], tensor), name


def test_load_arrays_into_model_accepts_packed_and_named_records() -> None:
    source, target = _bn_model(), _bn_model()
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)
    load_arrays_into_model(target, arrays_from_model(source))
    for a, b in zip(source.state_dict().values(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    other = _bn_model()
    load_arrays_into_model(other, ArrayRecord(source.state_dict()))  # named, not packed
    assert torch.equal(other[0].weight, source[0].weight)


def test_unpacking_weights_of_another_model_names_the_mismatch() -> None:
    record = pack_state(nn.Linear(4, 3).state_dict())
    with pytest.raises(ValueError, match="packed from another model"):
        unpack_state(record, nn.Linear(5, 3).state_dict())
    # the same number of weights under other names: caught by the layout fingerprint
    square = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4)).state_dict()
    renamed = OrderedDict((f"x.{k}", v) for k, v in square.items())
    with pytest.raises(ValueError, match="packed from another model"):
        unpack_state(pack_state(renamed), square)


def test_packed_message_travels_as_a_few_objects() -> None:
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    state = _bn_model().state_dict()

    def objects(arrays: ArrayRecord) -> int:
        msg = Message(RecordDict({"arrays": arrays, "config": ConfigRecord({"x": 1})}),
                      dst_node_id=1, message_type="train")
        return len(get_all_nested_objects(msg))

    named, packed = objects(ArrayRecord(state)), objects(pack_state(state))
    assert packed == 4 + 2 * 2  # message, record dict, array record, config + 2 dtypes
    assert named >= 2 * packed  # two objects (array + chunk) per distinct tensor


def test_fedavg_on_packed_weights_equals_fedavg_per_tensor() -> None:
    from flwr.serverapp.strategy import FedAvg

    rng = np.random.default_rng(0)
    states = []
    for _ in range(3):
        model = nn.Sequential(nn.Linear(4, 3), nn.GroupNorm(1, 3))
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.from_numpy(rng.normal(size=p.shape).astype(np.float32)))
        states.append(OrderedDict(model.state_dict()))
    counts = [10, 30, 60]

    def replies(pack: bool) -> list[Message]:
        out = []
        for state, n in zip(states, counts, strict=True):
            arrays = pack_state(state) if pack else ArrayRecord(state)
            out.append(Message(RecordDict({"arrays": arrays,
                                           "metrics": MetricRecord({"num-examples": n})}),
                               dst_node_id=1, message_type="train"))
        return out

    strategy = FedAvg()
    packed, _ = strategy.aggregate_train(1, replies(True))
    named, _ = strategy.aggregate_train(1, replies(False))
    unpacked = unpack_state(packed, states[0])
    for name, tensor in named.to_torch_state_dict().items():
        assert torch.allclose(unpacked[name], tensor, atol=1e-6), name
