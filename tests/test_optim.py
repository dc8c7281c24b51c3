"""LARS, parameter groups, schedules and the momentum update, against values worked out by hand."""
import math

import pytest
import torch

from common import optim


def test_lars_step_by_hand():
    # p = (3, 4): ||p|| = 5; g = (0, 1): ||g|| = 1; wd 0.1, eta 0.02, lr 0.5
    # ratio = min(0.02 * 5 / (1 + 0.1 * 5 + 1e-8) / 0.5, 1) = 0.13333...
    # g' = (g + wd p) * ratio = (0.3, 1.4) * 0.1333 = (0.04, 0.18667); first momentum step: p - lr g'
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    bias = torch.nn.Parameter(torch.tensor([1.0, 2.0]))
    opt = optim.build_optimizer("lars", [{"params": [p], "weight_decay": 0.1},
                                         {"params": [bias], "weight_decay": 0.0, "lars_exclude": True}], 0.5, 0.1)
    p.grad = torch.tensor([[0.0, 1.0]])
    bias.grad = torch.tensor([1.0, 1.0])
    opt.step()
    ratio = 0.02 * 5 / (1 + 0.5 + 1e-8) / 0.5
    expected = torch.tensor([[3 - 0.5 * 0.3 * ratio, 4 - 0.5 * 1.4 * ratio]])
    assert torch.allclose(p.detach(), expected, atol=1e-6)
    assert torch.allclose(bias.detach(), torch.tensor([0.5, 1.5]))  # plain SGD: no adaptation, no decay


def test_lars_ratio_is_clipped_at_one():
    p = torch.nn.Parameter(torch.tensor([100.0, 0.0]).reshape(1, 2))
    opt = optim.build_optimizer("lars", [{"params": [p]}], lr=0.1, weight_decay=0.0)
    p.grad = torch.tensor([[0.0, 1e-3]])  # eta ||p|| / ||g|| / lr = 0.02 * 100 / 1e-3 / 0.1 >> 1
    opt.step()
    assert torch.allclose(p.detach(), torch.tensor([[100.0, -1e-4]]))


def test_lars_without_clipping_by_hand():
    # solo-learn's LARS without clip_lr (VIbCReg's CIFAR yaml): ratio = eta ||p|| / (||g|| + wd ||p||), not divided
    # by lr and not capped. p = (3, 4), g = (0, 1), wd 0.1, eta 0.02, lr 0.5: ratio = 0.1 / 1.5 = 0.0666...
    # (the clipped form would give 0.1333...); g' = (0.3, 1.4) * ratio; p - lr g'
    p = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))
    opt = optim.build_optimizer("lars", [{"params": [p], "weight_decay": 0.1}], 0.5, 0.1, lars_clip=False)
    p.grad = torch.tensor([[0.0, 1.0]])
    opt.step()
    ratio = 0.02 * 5 / (1 + 0.5 + 1e-8)
    assert torch.allclose(p.detach(), torch.tensor([[3 - 0.5 * 0.3 * ratio, 4 - 0.5 * 1.4 * ratio]]), atol=1e-6)
    # Large ratios are not capped either: the clipped test's case moves 20000x further.
    q = torch.nn.Parameter(torch.tensor([[100.0, 0.0]]))
    opt = optim.build_optimizer("lars", [{"params": [q]}], lr=0.1, weight_decay=0.0, lars_clip=False)
    q.grad = torch.tensor([[0.0, 1e-3]])
    opt.step()
    assert torch.allclose(q.detach(), torch.tensor([[100.0, -0.1 * 1e-3 * 0.02 * 100 / (1e-3 + 1e-8)]]))


def test_param_groups_exclude_biases_and_norms():
    m = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4))
    decay, no_decay = optim.param_groups(m, 1e-4, lr=0.3)
    assert [p.shape for p in decay["params"]] == [torch.Size([4, 3])]
    assert len(no_decay["params"]) == 3 and no_decay["weight_decay"] == 0 and no_decay["lars_exclude"]
    assert decay["lr"] == 0.3
    assert len(optim.param_groups(m, 1e-4, exclude_1d=False)) == 1


def test_warmup_cosine_points():
    f = lambda s: optim.warmup_cosine(s, total_steps=110, warmup_steps=10, base_lr=1.0, start_lr=3e-5, final_lr=0.0)
    assert f(0) == pytest.approx(3e-5)
    assert f(5) == pytest.approx(3e-5 + (1 - 3e-5) / 2)
    assert f(10) == pytest.approx(1.0)
    assert f(60) == pytest.approx(0.5)        # half-way through the cosine
    assert f(110) == pytest.approx(0.0, abs=1e-12)


def test_set_lr_keeps_fixed_groups_and_scales_each_group_from_its_base():
    a, b = torch.nn.Parameter(torch.zeros(1)), torch.nn.Parameter(torch.zeros(1))
    opt = optim.build_optimizer("sgd", [{"params": [a], "lr": 0.4}, {"params": [b], "lr": 0.1, "fixed_lr": True}],
                                lr=0.4, weight_decay=0)
    lr = optim.set_lr(opt, 60, 110, 10)
    assert lr == pytest.approx(0.2) and opt.param_groups[1]["lr"] == 0.1


def test_cosine_tau():
    assert optim.cosine_tau(0, 100, 0.99, 1.0) == pytest.approx(0.99)
    assert optim.cosine_tau(50, 100, 0.99, 1.0) == pytest.approx(0.995)
    assert optim.cosine_tau(100, 100, 0.99, 1.0) == pytest.approx(1.0)


def test_momentum_update_parameters_only():
    online, target = torch.nn.BatchNorm1d(2), torch.nn.BatchNorm1d(2)
    with torch.no_grad():
        online.weight.fill_(3.0), target.weight.fill_(1.0)
        online.running_mean.fill_(5.0)
    optim.momentum_update(online, target, tau=0.75)
    assert torch.allclose(target.weight, torch.full((2,), 0.75 * 1 + 0.25 * 3))
    assert torch.allclose(target.running_mean, torch.zeros(2))  # buffers are not averaged
