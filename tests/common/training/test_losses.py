"""Tests for consilia.common.training.losses."""

from __future__ import annotations

import math
import typing

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from monai.losses import FocalLoss as MonaiFocalLoss
from opacus import GradSampleModule
from torch import nn

from consilia.common.config import TrainConfig
from consilia.common.training.losses import LOSSES as LOSS_REGISTRY
from consilia.common.training.losses import build_loss, class_weights_from_counts

LOSSES = ("cross_entropy", "bce", "focal")


@pytest.fixture()
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(8, 3, generator=gen)
    targets = torch.tensor([0, 1, 2, 0, 0, 1, 2, 2])
    return logits, targets


def test_class_weights_inverse_frequency_mean_one() -> None:
    # counts [10, 30]: inverse [0.1, 0.0333], mean 0.0667 -> [1.5, 0.5]
    np.testing.assert_allclose(class_weights_from_counts(np.array([10, 30])), [1.5, 0.5])
    # counts [1, 2, 4]: inverse [1, 1/2, 1/4], mean 7/12 -> [12/7, 6/7, 3/7]
    w = class_weights_from_counts(np.array([1, 2, 4]))
    np.testing.assert_allclose(w, [12 / 7, 6 / 7, 3 / 7])
    assert w.mean() == pytest.approx(1.0)


def test_class_weights_absent_class_is_neutral() -> None:
    w = class_weights_from_counts(np.array([10, 0, 30]))
    np.testing.assert_allclose(w, [1.5, 1.0, 0.5])


@pytest.mark.parametrize("counts", [[0, 0], [-1, 3], [5], [[1, 2]]])
def test_class_weights_bad_counts(counts) -> None:
    with pytest.raises(ValueError, match="class_counts"):
        class_weights_from_counts(np.array(counts))


def test_cross_entropy_matches_torch(batch) -> None:
    logits, targets = batch
    loss = build_loss("cross_entropy", 3)
    assert loss(logits, targets).item() == pytest.approx(F.cross_entropy(logits, targets).item())


def test_weighted_cross_entropy_is_batch_mean_of_weighted_samples(batch) -> None:
    logits, targets = batch
    counts = np.array([10, 20, 40])
    w = torch.tensor(class_weights_from_counts(counts), dtype=torch.float32)
    loss = build_loss("cross_entropy", 3, class_counts=counts)
    per_sample = F.cross_entropy(logits, targets, reduction="none")
    expected = (w[targets] * per_sample).mean()  # divided by N, not by sum(w[y])
    assert loss(logits, targets).item() == pytest.approx(expected.item(), rel=1e-6)


def test_bce_matches_bce_with_logits_on_one_hot(batch) -> None:
    logits, targets = batch
    one_hot = F.one_hot(targets, 3).float()
    plain = build_loss("bce", 3)(logits, targets)
    assert plain.item() == pytest.approx(nn.BCEWithLogitsLoss()(logits, one_hot).item())
    counts = np.array([3, 2, 3])
    w = torch.tensor(class_weights_from_counts(counts), dtype=torch.float32)
    weighted = build_loss("bce", 3, class_counts=counts)(logits, targets)
    expected = nn.BCEWithLogitsLoss(weight=w)(logits, one_hot)
    assert weighted.item() == pytest.approx(expected.item(), rel=1e-6)


@pytest.mark.parametrize("counts", [None, np.array([5, 1, 2])])
def test_focal_gamma_zero_equals_cross_entropy(batch, counts) -> None:
    logits, targets = batch
    focal = build_loss("focal", 3, class_counts=counts, focal_gamma=0.0)
    ce = build_loss("cross_entropy", 3, class_counts=counts)
    assert focal(logits, targets).item() == pytest.approx(ce(logits, targets).item(), rel=1e-6)


def test_focal_hand_computed() -> None:
    # logits [0, 0], target 0: p = 1/2, CE = ln 2, focal(gamma=2) = (1 - 1/2)^2 ln 2
    loss = build_loss("focal", 2, focal_gamma=2.0)
    value = loss(torch.zeros(1, 2), torch.tensor([0]))
    assert value.item() == pytest.approx(0.25 * math.log(2))


@pytest.mark.parametrize("gamma", [0.5, 2.0, 3.0])
def test_focal_matches_monai_focal_loss(batch, gamma) -> None:
    logits, targets = batch
    ours = build_loss("focal", 3, focal_gamma=gamma)(logits, targets)
    monai_loss = MonaiFocalLoss(gamma=gamma, use_softmax=True, reduction="none")
    # MONAI keeps one column per class (zero except the target); sum them per sample
    reference = monai_loss(logits, F.one_hot(targets, 3).float()).sum(dim=1).mean()
    assert ours.item() == pytest.approx(reference.item(), rel=1e-5)


@pytest.mark.parametrize("gamma", [0.0, 0.3, 0.5, 1.0, 2.0])
def test_focal_gradients_finite_for_confident_predictions(gamma) -> None:
    # p rounds to 1 in float32 for the first row: MONAI's focal loss gives NaN for 0<gamma<1
    logits = torch.tensor([[30.0, 0.0], [0.0, 40.0]], requires_grad=True)
    build_loss("focal", 2, focal_gamma=gamma)(logits, torch.tensor([0, 0])).backward()
    assert torch.isfinite(logits.grad).all()
    assert logits.grad[1].abs().sum() > 0


def test_focal_down_weights_easy_examples(batch) -> None:
    logits, targets = batch
    focal = build_loss("focal", 3, focal_gamma=2.0)(logits, targets)
    ce = build_loss("cross_entropy", 3)(logits, targets)
    assert 0 < focal.item() < ce.item()


@pytest.mark.parametrize("name", LOSSES)
@pytest.mark.parametrize("weighted", [False, True])
def test_gradients_flow(batch, name, weighted) -> None:
    logits, targets = batch
    logits = logits.clone().requires_grad_(True)
    counts = np.array([3, 2, 3]) if weighted else None
    loss = build_loss(name, 3, class_counts=counts)
    value = loss(logits, targets)
    assert value.ndim == 0 and torch.isfinite(value)
    value.backward()
    assert logits.grad is not None
    assert torch.isfinite(logits.grad).all() and logits.grad.abs().sum() > 0


@pytest.mark.parametrize("name", LOSSES)
def test_reduction_none_gives_per_sample_losses(batch, name) -> None:
    logits, targets = batch
    loss = build_loss(name, 3, class_counts=np.array([3, 2, 3]))
    mean = loss(logits, targets)
    loss.reduction = "none"
    per_sample = loss(logits, targets)
    assert per_sample.shape == (8,)
    assert per_sample.mean().item() == pytest.approx(mean.item(), rel=1e-6)
    loss.reduction = "sum"
    assert loss(logits, targets).item() == pytest.approx(per_sample.sum().item(), rel=1e-6)


@pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")
@pytest.mark.parametrize("name", LOSSES)
def test_opacus_per_sample_gradients_match_individual_losses(batch, name) -> None:
    logits_in, targets = batch
    torch.manual_seed(0)
    model = nn.Linear(3, 3)
    loss = build_loss(name, 3, class_counts=np.array([3, 2, 3]))
    gsm = GradSampleModule(model, loss_reduction="mean")
    loss(gsm(logits_in), targets).backward()
    grad_sample = model.weight.grad_sample
    assert grad_sample.shape == (8, 3, 3)
    # the batch gradient is the mean of the per-sample gradients
    torch.testing.assert_close(grad_sample.mean(0), model.weight.grad, rtol=1e-5, atol=1e-6)
    # each per-sample gradient is the gradient of that sample's own loss
    for i in (0, 5):
        model.zero_grad()
        ref = nn.Linear(3, 3)
        ref.load_state_dict(model.state_dict())
        loss(ref(logits_in[i : i + 1]), targets[i : i + 1]).backward()
        torch.testing.assert_close(grad_sample[i], ref.weight.grad, rtol=1e-5, atol=1e-6)


@pytest.mark.filterwarnings("ignore:Full backward hook:UserWarning")
@pytest.mark.filterwarnings("ignore:Secure RNG turned off:UserWarning")
@pytest.mark.parametrize("name", LOSSES)
def test_opacus_ghost_clipping_step(name) -> None:
    from opacus import PrivacyEngine

    torch.manual_seed(0)
    x = torch.randn(16, 4)
    y = torch.randint(0, 3, (16,))
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8)
    model = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    criterion = build_loss(name, 3, class_counts=np.array([5, 6, 5]))
    engine = PrivacyEngine(accountant="rdp")
    model, optimizer, criterion, loader = engine.make_private(
        module=model,
        optimizer=optimizer,
        data_loader=loader,
        criterion=criterion,
        noise_multiplier=0.5,
        max_grad_norm=1.0,
        grad_sample_mode="ghost",
        poisson_sampling=False,
    )
    before = [p.detach().clone() for p in model.parameters()]
    xb, yb = next(iter(loader))
    optimizer.zero_grad()
    loss = criterion(model(xb), yb)
    loss.backward()
    optimizer.step()
    after = list(model.parameters())
    assert any(not torch.equal(b, a) for b, a in zip(before, after, strict=True))
    assert all(torch.isfinite(a).all() for a in after)


def test_build_loss_validation() -> None:
    with pytest.raises(ValueError, match="unknown loss"):
        build_loss("hinge", 3)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="num_classes"):
        build_loss("cross_entropy", 1)
    with pytest.raises(ValueError, match=r"class_counts has shape"):
        build_loss("cross_entropy", 3, class_counts=np.array([1, 2]))
    with pytest.raises(ValueError, match="focal_gamma"):
        build_loss("focal", 3, focal_gamma=-1.0)
    loss = build_loss("cross_entropy", 3)
    with pytest.raises(ValueError, match=r"logits must be \(N, 3\)"):
        loss(torch.zeros(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="targets must be class indices"):
        loss(torch.zeros(2, 3), torch.zeros(2, 3))


def test_weights_move_with_module() -> None:
    loss = build_loss("focal", 3, class_counts=np.array([1, 2, 3]))
    assert "weight" in dict(loss.named_buffers())
    converted = loss.to(torch.float64)
    assert converted.weight.dtype == torch.float64


def test_loss_registry_holds_exactly_the_names_the_config_allows() -> None:
    allowed = typing.get_args(TrainConfig.model_fields["loss"].annotation)
    assert LOSS_REGISTRY.names() == sorted(allowed)
