import numpy as np
import torch
from torch import nn

from consilia.common.training.engine import proximal_term, snapshot_params, train_epochs
from consilia.common.training.inference import evaluate_model


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(4, 3))


def test_proximal_term_value_is_half_mu_squared_distance():
    model = _tiny_model()
    anchors = snapshot_params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # every coordinate moved by 0.5
    n = sum(p.numel() for p in model.parameters())
    mu = 0.2
    value = proximal_term(model.parameters(), anchors, mu)
    # (mu/2) * sum (0.5)^2 over n coordinates -- squared, not the plain norm
    assert torch.isclose(value, torch.tensor(mu / 2 * n * 0.25))


def test_proximal_term_gradient_is_mu_times_difference():
    model = _tiny_model()
    anchors = snapshot_params(model)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    mu = 0.7
    proximal_term(model.parameters(), anchors, mu).backward()
    for p, g in zip(model.parameters(), anchors, strict=True):
        assert torch.allclose(p.grad, mu * (p.detach() - g), atol=1e-6)


def test_proximal_term_is_zero_at_the_anchor():
    model = _tiny_model()
    assert float(proximal_term(model.parameters(), snapshot_params(model), 1.0)) == 0.0


def _loader(n=40):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(n, 1, 2, 2, generator=g)
    y = (x.flatten(1).sum(1) > 0).long()
    ds = torch.utils.data.TensorDataset(x, y)
    return torch.utils.data.DataLoader(ds, batch_size=8, shuffle=False)


def test_train_reports_samples_not_batches_and_learns():
    model = _tiny_model()
    loader = _loader()
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    first = evaluate_model(model, loader, nn.CrossEntropyLoss()).loss
    result = train_epochs(model, loader, opt, nn.CrossEntropyLoss(), epochs=5)
    assert result.num_examples == 40  # len(dataset), never len(loader) == 5
    assert result.steps == 25
    assert evaluate_model(model, loader, nn.CrossEntropyLoss()).loss < first


def test_large_mu_keeps_weights_near_the_anchor():
    free, prox = _tiny_model(), _tiny_model()
    anchors = snapshot_params(prox)
    for model, mu in ((free, 0.0), (prox, 50.0)):
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        train_epochs(model, _loader(), opt, nn.CrossEntropyLoss(), 3, mu,
                     anchors if mu else None)
    dist = [sum(float((p - a).pow(2).sum()) for p, a in zip(m.parameters(), anchors, strict=True))
            for m in (free, prox)]
    assert dist[1] < dist[0]


def test_evaluate_returns_probabilities():
    res = evaluate_model(_tiny_model(), _loader(), nn.CrossEntropyLoss())
    assert res.y_prob.shape == (40, 3)
    assert np.allclose(res.y_prob.sum(1), 1.0)
    assert res.num_examples == 40
