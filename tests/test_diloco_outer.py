"""Pseudo-gradient sign and the outer Nesterov step, checked against hand computation."""

from collections.abc import Iterator

import pytest
import torch
from diloco_worker import single_process_group
from torch import nn

from diloco import DiLoCo, OuterSGD, pseudo_gradient


@pytest.fixture(scope="module")
def group() -> Iterator[None]:
    with single_process_group():
        yield


def test_pseudo_gradient_points_from_local_to_global() -> None:
    global_params = torch.tensor([1.0, 1.0])
    local = torch.tensor([0.5, 2.0])  # training moved down in x0 and up in x1
    assert pseudo_gradient(global_params, local).tolist() == [0.5, -1.0]


def test_one_and_two_nesterov_steps_by_hand() -> None:
    outer = OuterSGD(lr=0.7, momentum=0.9, nesterov=True, count=1)
    theta = torch.tensor([1.0, -2.0], dtype=torch.float64)
    d1 = torch.tensor([0.5, -1.0], dtype=torch.float64)
    outer.step(0, theta, d1)
    # buf = d1; update = d1 + 0.9 d1 = 1.9 d1; theta = theta - 0.7 * 1.9 d1
    assert theta.tolist() == pytest.approx([1.0 - 1.33 * 0.5, -2.0 + 1.33])
    d2 = torch.tensor([0.25, 0.0], dtype=torch.float64)
    outer.step(0, theta, d2)
    # buf = 0.9 d1 + d2 = [0.7, -0.9]; update = d2 + 0.9 buf = [0.88, -0.81]
    assert theta.tolist() == pytest.approx([0.335 - 0.7 * 0.88, -0.67 + 0.7 * 0.81])


def test_matches_torch_sgd_nesterov_over_many_steps() -> None:
    torch.manual_seed(0)
    ours = torch.randn(7)
    reference = nn.Parameter(ours.clone())
    sgd = torch.optim.SGD([reference], lr=0.7, momentum=0.9, nesterov=True)
    outer = OuterSGD(lr=0.7, momentum=0.9, nesterov=True, count=1)
    for _ in range(5):
        grad = torch.randn(7)
        outer.step(0, ours, grad)
        reference.grad = grad.clone()
        sgd.step()
    torch.testing.assert_close(ours, reference.detach(), rtol=0, atol=1e-6)


def test_plain_momentum_and_no_momentum() -> None:
    theta = torch.zeros(1)
    OuterSGD(lr=1.0, momentum=0.0, nesterov=True, count=1).step(0, theta, torch.ones(1))
    assert theta.item() == -1.0
    outer = OuterSGD(lr=1.0, momentum=0.5, nesterov=False, count=1)
    outer.step(0, theta, torch.ones(1))  # buf 1
    outer.step(0, theta, torch.ones(1))  # buf 1.5
    assert theta.item() == -1.0 - 1.0 - 1.5


def test_one_diloco_round_moves_global_past_local_by_nesterov_factor(group: None) -> None:
    """A real (one-replica gloo) DiLoCo round: Delta = theta0 - theta_local, and the
    new global is theta0 - 0.7 * 1.9 * Delta (first Nesterov step)."""
    model = nn.Linear(3, 2)
    theta0 = {n: p.detach().clone() for n, p in model.named_parameters()}
    diloco = DiLoCo(model, sync_every=2)
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1)  # "inner training" moved every parameter by -0.1
    assert diloco.step() == []
    with torch.no_grad():
        for p in model.parameters():
            p.sub_(0.1)
    assert diloco.step() == [0]  # H = 2: fragment 0 synced and merged (tau = 0)
    for name, p in model.named_parameters():
        expected = theta0[name] - 0.7 * 1.9 * 0.2  # Delta = +0.2: outer step moves by -1.33 * 0.2
        torch.testing.assert_close(p.detach(), expected)  # alpha = 0: local <- global
        torch.testing.assert_close(diloco.global_parameters()[name], expected)
    diloco.close()


def set_weight(model: nn.Linear, values: list[float]) -> None:
    with torch.no_grad():
        model.weight.copy_(torch.tensor([values]))


def test_alpha_mixes_local_and_global(group: None) -> None:
    model = nn.Linear(2, 1, bias=False)
    set_weight(model, [1.0, 1.0])
    diloco = DiLoCo(model, sync_every=1, alpha=0.25, outer_lr=0.5, outer_momentum=0.0)
    set_weight(model, [0.0, 3.0])  # Delta = [1, -2]
    diloco.step()
    assert diloco.global_parameters()["weight"].tolist() == [[0.5, 2.0]]  # [1, 1] - Delta / 2
    # local <- 0.25 * [0, 3] + 0.75 * [0.5, 2]
    assert model.weight.detach().tolist() == [[0.375, 2.25]]
    diloco.close()


def test_overlap_merges_into_the_parameters_trained_meanwhile(group: None) -> None:
    model = nn.Linear(1, 1, bias=False)
    set_weight(model, [1.0])
    diloco = DiLoCo(
        model, sync_every=2, overlap_steps=1, alpha=0.5, outer_lr=0.5, outer_momentum=0.0
    )
    assert diloco.step() == []
    set_weight(model, [0.0])
    assert diloco.step() == [] and not diloco.quiescent  # started: Delta = 1 - 0 = 1
    set_weight(model, [10.0])  # trained on while the exchange is in flight
    assert diloco.step() == [0] and diloco.quiescent
    assert diloco.global_parameters()["weight"].tolist() == [[0.5]]
    assert model.weight.item() == 0.5 * 10.0 + 0.5 * 0.5
    diloco.close()


def test_finish_merges_early_and_training_can_go_on(group: None) -> None:
    model = nn.Linear(1, 1, bias=False)
    set_weight(model, [1.0])
    diloco = DiLoCo(model, sync_every=2, overlap_steps=1, outer_lr=1.0, outer_momentum=0.0)
    diloco.step()
    set_weight(model, [0.0])
    diloco.step()  # fragment 0 starts with Delta = 1
    set_weight(model, [5.0])
    assert diloco.finish() == [0] and diloco.quiescent
    assert model.weight.item() == 0.0  # alpha = 0: local <- global = 1 - 1.0 * Delta
    assert diloco.step() == []  # the exchange it would have merged now is already merged
    diloco.close()
    with pytest.raises(RuntimeError, match="closed"):
        diloco.step()
