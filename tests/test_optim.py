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


class _CountItem(torch.utils._python_dispatch.TorchDispatchMode):
    """Counts aten._local_scalar_dense: .item(), bool(t), float(t), the host waiting for the device."""
    def __init__(self):
        super().__init__()
        self.reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.reads += func is torch.ops.aten._local_scalar_dense.default
        return func(*args, **(kwargs or {}))


def _scaled_params(seed):
    """A decayed 2-D weight, an excluded bias and a weight whose first gradient comes at the second step."""
    gen = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(3, 4, generator=gen)), torch.nn.Parameter(torch.randn(4, generator=gen)),
            torch.nn.Parameter(torch.randn(2, 3, generator=gen))]


def _grads(step, seed=7):
    gen = torch.Generator().manual_seed(seed + step)
    grads = [torch.randn(3, 4, generator=gen), torch.randn(4, generator=gen), torch.randn(2, 3, generator=gen)]
    return grads if step else [*grads[:2], None]


def _optimizer(name, params):
    groups = [{"params": [params[0], params[2]], "weight_decay": 0.1},
              {"params": [params[1]], "weight_decay": 0.0, "lars_exclude": True}]
    return optim.build_optimizer(name, groups, 0.5, 0.1)


@pytest.mark.parametrize("name", ["lars", "sgd"])
@pytest.mark.parametrize("clip", [False, True])
def test_scaled_step_equals_unscaled_step_and_skips_inf(name, clip):
    """GradScaler.step on our LARS/SGD (scaling-aware) against the same optimizer stepped on the true gradients,
    over 4 steps: the 3rd step's gradient holds an inf (then a NaN when clipping), which must change nothing.
    The scale is a power of two, so unscaling is exact and both paths see the same gradients; they differ only in
    rounding p - lr * buf (a tensor lr on the scaled path): a few float32 ulps, so atol 1e-6 on values of order 1.
    clip: scaler.unscale_ first (the --grad-clip path: GradScaler then passes grad_scale None)."""
    scaled, plain = _scaled_params(0), _scaled_params(0)
    opt, ref = _optimizer(name, scaled), _optimizer(name, plain)
    assert opt._step_supports_amp_scaling
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 12)
    scaler.scale(torch.zeros(()))  # creates the scale tensor, as scaling a loss does
    for step in range(4):
        grads = _grads(step)
        bad = step == 2
        if bad:
            grads[0][1, 2] = float("nan") if clip else float("inf")
        scale = scaler.get_scale()
        for p, q, g in zip(scaled, plain, grads):
            p.grad = None if g is None else g * scale
            q.grad = None if g is None else g.clone()
        before = [p.detach().clone() for p in scaled], {k: v["momentum_buffer"].clone() for k, v in opt.state.items()}
        with _CountItem() as counter:
            if clip:
                scaler.unscale_(opt)
                torch.nn.utils.clip_grad_norm_(scaled, 1.0, foreach=True)
            scaler.step(opt)
        assert counter.reads == 0  # the inf flag is never read back
        scaler.update()
        if bad:  # skipped: parameters and momentum as before, the scale halved
            assert all(torch.equal(p, b) for p, b in zip(scaled, before[0]))
            assert all(torch.equal(opt.state[k]["momentum_buffer"], v) for k, v in before[1].items())
            assert scaler.get_scale() == scale / 2
            continue
        if clip:
            torch.nn.utils.clip_grad_norm_(plain, 1.0, foreach=True)
        ref.step()
        for p, q in zip(scaled, plain):
            assert torch.allclose(p, q, rtol=0, atol=1e-6)
            if q.grad is None:  # no gradient yet: no momentum on either path
                assert p not in opt.state and q not in ref.state
                continue
            assert torch.allclose(opt.state[p]["momentum_buffer"], ref.state[q]["momentum_buffer"], rtol=0, atol=1e-6)
    assert scaled[2].detach().ne(_scaled_params(0)[2]).all()  # the late parameter did move


def test_sgd_matches_torch_sgd():
    """Our SGD without a scaler is torch's SGD (momentum 0.9, L2 weight decay in the gradient, the first
    momentum buffer = the gradient), including a parameter whose first gradient comes late: same ops, equal values."""
    ours, theirs = _scaled_params(1), _scaled_params(1)
    opt = optim.build_optimizer("sgd", [{"params": ours, "weight_decay": 0.1}], 0.5, 0.1)
    ref = torch.optim.SGD([{"params": theirs, "weight_decay": 0.1}], lr=0.5, momentum=0.9, foreach=True)
    for step in range(3):
        for p, q, g in zip(ours, theirs, _grads(step)):
            p.grad, q.grad = (None, None) if g is None else (g.clone(), g.clone())
        opt.step(), ref.step()
        assert all(torch.allclose(p, q, rtol=0, atol=1e-6) for p, q in zip(ours, theirs))


def test_torch_sgd_would_read_the_inf_flag_back():
    """The counter above can fail: torch's SGD (not scaling-aware) makes GradScaler.step read found_inf back."""
    p = torch.nn.Parameter(torch.ones(2))
    opt, scaler = torch.optim.SGD([p], lr=0.1, momentum=0.9, foreach=True), torch.amp.GradScaler("cpu")
    p.grad = scaler.scale(torch.ones(2))
    with _CountItem() as counter:
        scaler.step(opt)
    assert counter.reads > 0
