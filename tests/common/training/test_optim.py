"""Tests for consilia.common.training.optimizers."""

from __future__ import annotations

import typing

import pytest
import torch
from torch import nn

from consilia.common.config import TrainConfig
from consilia.common.training.optimizers import OPTIMIZERS, build_optimizer


@pytest.mark.parametrize(
    ("name", "cls"),
    [("sgd", torch.optim.SGD), ("adam", torch.optim.Adam), ("rmsprop", torch.optim.RMSprop)],
)
def test_build_optimizer_types_and_step(name: str, cls: type) -> None:
    model = nn.Linear(3, 2)
    opt = build_optimizer(name, model.parameters(), lr=0.1, momentum=0.5, weight_decay=0.01)
    assert isinstance(opt, cls)
    group = opt.param_groups[0]
    assert group["lr"] == 0.1 and group["weight_decay"] == 0.01
    if name != "adam":
        assert group["momentum"] == 0.5
    before = model.weight.detach().clone()
    model(torch.ones(4, 3)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.weight)


def test_build_optimizer_validation() -> None:
    params = list(nn.Linear(2, 2).parameters())
    with pytest.raises(ValueError, match="unknown optimizer 'lamb'"):
        build_optimizer("lamb", params, lr=0.1)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="train.lr"):
        build_optimizer("sgd", params, lr=0.0)
    with pytest.raises(ValueError, match="train.momentum"):
        build_optimizer("sgd", params, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="train.weight_decay"):
        build_optimizer("adam", params, lr=0.1, weight_decay=-1.0)


def test_optimizer_registry_holds_exactly_the_names_the_config_allows() -> None:
    allowed = typing.get_args(TrainConfig.model_fields["optimizer"].annotation)
    assert OPTIMIZERS.names() == sorted(allowed)
