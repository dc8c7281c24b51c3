"""SimSiam: loss values derived by hand, stop-gradient, heads, the predictor's fixed lr under the
schedule, resume and DDP end to end. (No quantity is gathered or all-reduced: the loss is a mean of
per-image terms, which DDP's gradient averaging already makes global.)"""
import math

import pytest
import torch

from common import cli, optim
from common.backbones import load_backbone
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from simsiam import RECIPES, SimSiam, param_groups, parse_args, simsiam_loss

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--pred-hidden-dim", "8"]


def tiny(out_dir, *extra):
    return ["simsiam.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_hand_values():
    z1, z2 = torch.randn(5, 7), torch.randn(5, 7)
    assert simsiam_loss(z2, z1, z1, z2).item() == pytest.approx(-1.0, abs=1e-6)       # p1 = z2, p2 = z1
    assert simsiam_loss(-3 * z2, -z1, z1, z2).item() == pytest.approx(1.0, abs=1e-6)  # opposite, any scale
    # p1 at 45 degrees to z2 in row 0 and aligned in row 1: mean cos = (1/sqrt 2 + 1) / 2;
    # p2 orthogonal to z1 in both rows: mean cos = 0 -> L = -((1/sqrt 2 + 1) / 2 + 0) / 2
    p1, z2 = torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p2, z1 = torch.tensor([[0.0, 1.0], [0.0, -2.0]]), torch.tensor([[1.0, 0.0], [3.0, 0.0]])
    assert simsiam_loss(p1, p2, z1, z2).item() == pytest.approx(-(1 / math.sqrt(2) + 1) / 4, abs=1e-6)


def test_stop_gradient_on_the_projections():
    p1, p2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    z1, z2 = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    simsiam_loss(p1, p2, z1, z2).backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert z1.grad is None and z2.grad is None


def test_projector_reaches_the_loss_through_the_predictor_only():
    model = SimSiam(torch.nn.Flatten(), 12, 16, 8, 4, num_classes=3)
    p, z, _ = model([torch.randn(6, 3, 2, 2), torch.randn(6, 3, 2, 2)])
    loss = simsiam_loss(p[0], p[1], z[0], z[1])
    # the gradient w.r.t. z is exactly what flows back from p: nothing through the target branch
    via_z = torch.autograd.grad(loss, z, retain_graph=True)
    via_p = torch.autograd.grad(p, z, grad_outputs=torch.autograd.grad(loss, p, retain_graph=True))
    assert all(torch.allclose(a, b) for a, b in zip(via_z, via_p))


def test_recipe_and_heads():
    args = parse_args(["--dataset", "cifar10"])
    assert (args.optimizer, args.lr, args.weight_decay, args.preset) == ("sgd", 0.5, 1e-5, "symmetric_weak")
    model = SimSiam(torch.nn.Flatten(), 12, args.proj_hidden_dim, args.proj_output_dim, args.pred_hidden_dim, 10)
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    assert not model.projector[-1].affine and all(m.bias is None for m in model.projector if hasattr(m, "in_features"))
    pred = [m for m in model.predictor if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in pred] == [(2048, 512), (512, 2048)]
    assert type(model.predictor[1]).__name__ == "BatchNorm1d"
    with pytest.raises(cli.UsageError):
        parse_args(["--num-large-crops", "4"])
    for bad in (["--pred-hidden-dim", "0"], ["--proj-output-dim", "1.5"]):
        with pytest.raises(cli.UsageError):
            parse_args(bad)


def test_probe_sees_every_large_crop():
    model = SimSiam(torch.nn.Flatten(), 12, 16, 8, 4, num_classes=3)
    _, _, logits = model([torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)])
    assert logits.shape == (10, 3)


def test_predictor_lr_stays_at_base_lr_while_the_rest_follows_the_schedule():
    model = SimSiam(torch.nn.Flatten(), 12, 16, 8, 4, num_classes=3)
    opt = optim.build_optimizer("sgd", param_groups(model, 0.5, 0.1, 1e-5, exclude_1d=False), 0.5, 1e-5)
    fixed = {id(p) for g in opt.param_groups if g.get("fixed_lr") for p in g["params"]}
    assert fixed == {id(p) for p in model.predictor.parameters()}
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(model.parameters()))
    for step in (0, 5, 10, 60, 109):  # warmup over 10 steps, cosine to 0 at 110
        optim.set_lr(opt, step, total_steps=110, warmup_steps=10, start_lr=3e-5)
        for g in opt.param_groups:
            expected = 0.5 if g.get("fixed_lr") else optim.warmup_cosine(step, 110, 10, g["base_lr"], 3e-5)
            assert g["lr"] == pytest.approx(expected)
    assert opt.param_groups[0]["lr"] < 0.01  # near the end of the cosine, while the predictor is still at 0.5


def test_resume_continues_exactly_and_writes_every_file(tmp_path):
    """Stopped at step 2 (mid-epoch 0) and resumed to step 6 (into epoch 1) = one run to step 6."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(straight, "--max-steps", "6"))
    run_script(*tiny(resumed, "--max-steps", "2"))
    run_script(*tiny(resumed, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(math.isfinite(v) and abs(a[s] - b[s]) < 1e-6 for s, v in a.items()), (a, b)
    end_a = [m for m in read_metrics(straight) if m["type"] == "epoch"][-1]
    end_b = [m for m in read_metrics(resumed) if m["type"] == "epoch"][-1]
    assert end_a["probe_acc1"] == end_b["probe_acc1"]
    last_a, last_b = torch.load(straight / "last.pt"), torch.load(resumed / "last.pt")
    assert last_a["method"] == "simsiam" and last_a["step"] == 6
    assert all(torch.allclose(last_a["model"][k].float(), last_b["model"][k].float(), atol=1e-6)
               for k in last_a["model"])
    # at step 6 of 12 the schedule is below its base, the predictor's groups are at theirs (lr * 16 / 256)
    groups = last_a["optimizer"]["param_groups"]
    fixed = [g for g in groups if g.get("fixed_lr")]
    assert fixed and all(g["lr"] == g["base_lr"] == pytest.approx(RECIPES["synthetic"]["lr"] * 16 / 256) for g in fixed)
    assert all(g["lr"] < g["base_lr"] for g in groups if not g.get("fixed_lr"))
    net, meta = load_backbone(straight / "backbone.pt")
    assert meta["method"] == "simsiam" and net(torch.randn(2, 3, 32, 32)).shape == (2, meta["feature_dim"])


def test_ddp_two_processes_keep_ranks_identical(tmp_path):
    out = tmp_path / "run"
    torchrun("tests/rank_params.py", "simsiam", *tiny(out, "--max-steps", "3")[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
