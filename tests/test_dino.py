"""DINO: loss values derived by hand, centering and sharpening, cross-view pairs, gradient paths, the
weight-normed and frozen last layer, recipes, 2-process equality and runs end to end (ResNet and ViT)."""
import json
import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from PIL import Image

from common import optim
from common.cli import UsageError
from common.run import Accumulation, optimizer_step
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from dino import (DINO, RECIPES, VIT_OVERRIDES, DINOHead, NormalizedLinear, cancel_last_layer_grad, dino_loss,
                  parse_args, set_weight_decay, teacher_temperature, update_center)

HEAD = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--num-prototypes", "64"]
LN3 = math.log(3)


def tiny(out_dir, *extra):
    return ["dino.py", *TINY, *HEAD, "--out-dir", out_dir, *extra]


# ---- loss ----
def test_hand_values_with_and_without_centering():
    # One large crop (teacher view 0) and one other student view: the only pair is (u=0, v=1).
    # Teacher logits [0.04 ln 3, 0] at tau_t 0.04 -> softmax([ln 3, 0]) = [3/4, 1/4]; student logits
    # [0.1 ln 3, 0] at tau_s 0.1 -> log_softmax = [ln 3/4, ln 1/4]. CE = entropy of (3/4, 1/4).
    teacher = [torch.tensor([[0.04 * LN3, 0.0]])]
    student = [torch.tensor([[5.0, -5.0]]), torch.tensor([[0.1 * LN3, 0.0]])]
    zero = torch.zeros(2)
    loss = dino_loss(student, teacher, zero, student_temp=0.1, teacher_temp=0.04)
    assert abs(loss.item() - -(0.75 * math.log(0.75) + 0.25 * math.log(0.25))) < 1e-6
    # center = the teacher's logits: target uniform (1/2, 1/2), CE = -(ln 3/4 + ln 1/4) / 2 = ln(16/3) / 2
    loss = dino_loss(student, teacher, teacher[0][0], student_temp=0.1, teacher_temp=0.04)
    assert abs(loss.item() - 0.5 * math.log(16 / 3)) < 1e-6


def test_constant_teacher_output_becomes_a_uniform_target_once_centered():
    """A teacher that outputs the same logits t for every input (a collapsed one) is centered to a
    uniform target: c_n = t (1 - 0.9^n) after n updates from 0, so (t - c) / tau_t -> 0."""
    t = torch.tensor([3.0, -1.0, 0.5, 2.0])
    constant = t.expand(2, 8, 4)  # 2 views x 8 images, all alike
    center = torch.zeros(4)
    for _ in range(300):
        center = update_center(center, constant, momentum=0.9)
    assert torch.allclose(center, t, atol=1e-6)
    student = [torch.randn(8, 4) for _ in range(3)]
    got = dino_loss(student, list(constant), center, teacher_temp=0.04)
    h = [-F.log_softmax(s / 0.1, dim=-1).mean() for s in student]  # CE against 1/K: -1/K sum_k log p_k
    want = (h[1] + h[2] + h[0] + h[2]) / 4  # pairs (0, 1), (0, 2), (1, 0), (1, 2)
    assert abs(got.item() - want.item()) < 1e-4


def test_center_moves_by_the_stated_momentum():
    # 0.9 * [1, 2] + 0.1 * mean([3, 4], [5, 6], [7, 8], [9, 10]) = [0.9, 1.8] + 0.1 * [6, 7] = [1.5, 2.5]
    teacher = torch.tensor([[[3.0, 4.0], [5.0, 6.0]], [[7.0, 8.0], [9.0, 10.0]]])  # 2 views x 2 images
    assert torch.allclose(update_center(torch.tensor([1.0, 2.0]), teacher), torch.tensor([1.5, 2.5]))
    assert torch.allclose(update_center(torch.tensor([1.0, 2.0]), teacher, momentum=0.5), torch.tensor([3.5, 4.5]))


def test_only_cross_view_pairs_are_counted():
    g = torch.Generator().manual_seed(0)
    teacher = [torch.randn(4, 6, generator=g) for _ in range(2)]
    student = [torch.randn(4, 6, generator=g) for _ in range(4)]  # 2 large + 2 small crops
    center = torch.randn(6, generator=g)
    ce = lambda u, v: F.cross_entropy(student[v] / 0.1, F.softmax((teacher[u] - center) / 0.05, dim=-1))
    pairs = [(0, 1), (0, 2), (0, 3), (1, 0), (1, 2), (1, 3)]  # 6 = 2 * 4 - 2 same-view pairs left out
    want = sum(ce(u, v) for u, v in pairs) / len(pairs)
    assert torch.allclose(dino_loss(student, teacher, center, teacher_temp=0.05), want, atol=1e-5)
    # with a single large crop, the student's own view of that crop cannot change the loss
    other = [torch.randn(4, 6, generator=g)] + student[1:]
    one_view = lambda s: dino_loss(s, teacher[:1], center, teacher_temp=0.05)
    assert torch.equal(one_view(student), one_view(other))


def test_no_gradient_reaches_the_teacher():
    s = [torch.randn(4, 8, requires_grad=True) for _ in range(3)]
    t = [torch.randn(4, 8, requires_grad=True) for _ in range(2)]
    center = torch.zeros(8, requires_grad=True)
    dino_loss(s, t, center).backward()
    assert all(x.grad is not None and x.grad.abs().sum() > 0 for x in s)
    assert all(x.grad is None for x in t) and center.grad is None
    # the networks: the momentum copy of backbone + head gets no gradient, the student does
    model = DINO(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), 6, 16, 8, 32, num_classes=3, num_large_crops=2)
    teacher = model.teacher()
    views = [torch.randn(4, 3, 2, 2) for _ in range(2)]
    student, logits = model(views)
    assert logits.shape == (8, 3)  # the probe sees both large crops (solo-learn), one batch after the other
    assert torch.equal(model(views + [torch.randn(4, 3, 2, 2)])[1], logits)  # and never a small one
    dino_loss(student, [teacher(v) for v in views], torch.zeros(32)).backward()
    assert all(p.grad is None for p in teacher.parameters())
    assert all(p.grad is not None for p in model.head.parameters())


def test_teacher_temperature_warmup():
    # official np.linspace(0.04, 0.07, 4) = 0.04, 0.05, 0.06, 0.07, then 0.07
    assert [round(teacher_temperature(e, 4), 10) for e in range(6)] == [0.04, 0.05, 0.06, 0.07, 0.07, 0.07]
    assert teacher_temperature(0, 0) == 0.07  # CIFAR: no warm-up
    assert abs(teacher_temperature(25, 51) - 0.055) < 1e-12  # half-way


# ---- head ----
def test_normalized_linear_is_weight_norm_with_g_fixed_at_1():
    torch.manual_seed(0)
    ours = NormalizedLinear(5, 7)
    ref = nn.utils.parametrizations.weight_norm(nn.Linear(5, 7, bias=False))
    with torch.no_grad():
        ref.parametrizations.weight.original1.copy_(ours.weight)
        ref.parametrizations.weight.original0.fill_(1.0)
    x = torch.randn(3, 5)
    out_ours, out_ref = ours(x), ref(x)
    assert torch.allclose(out_ours, out_ref, atol=1e-6)
    out_ours.square().sum().backward()
    out_ref.square().sum().backward()
    assert torch.allclose(ours.weight.grad, ref.parametrizations.weight.original1.grad, atol=1e-6)
    with torch.no_grad():
        ours.weight.mul_(torch.linspace(0.1, 10, 7)[:, None])  # row scale is irrelevant: rows are used at norm 1
    assert torch.allclose(ours(x), out_ref, atol=1e-5)
    plain = nn.Linear(5, 7, bias=False)
    plain.load_state_dict(ours.state_dict())  # a plain `weight`: nothing to convert
    # the optional BN (official --use_bn_in_head) leaves the Linear layers' keys where they were
    with_bn, without = DINOHead(6, 16, 8, 32, use_bn=True), DINOHead(6, 16, 8, 32)
    assert sum(isinstance(m, nn.BatchNorm1d) for m in with_bn.modules()) == 2
    assert set(without.state_dict()) <= set(with_bn.state_dict())


def fake_run():
    """What optimizer_step uses of a Run: the scaler, the non-finite check (a no-op here), no accumulation."""
    return SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False), watch_finite=lambda *args: None,
                           accumulation=Accumulation(1, 1), args=SimpleNamespace(freeze_backbone_epochs=0))


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_last_layer_frozen_in_epoch_0_then_trained_and_kept_at_norm_1(name):
    torch.manual_seed(0)
    head = DINOHead(6, 16, 8, 32)
    groups = optim.param_groups(head, 0.1)  # weight decay too: a zeroed (not removed) gradient would move it
    opt = optim.build_optimizer(name, groups, 0.5, 0.1)
    x = torch.randn(16, 6)

    def step(hook):
        before = {n: p.detach().clone() for n, p in head.named_parameters()}
        loss = dino_loss([head(x), head(x + 0.1)], [head(x).detach() + 1.0], torch.zeros(32))
        optimizer_step(fake_run(), loss, opt, 0, 0, 0.0, hook)
        return {n: not torch.equal(before[n], p) for n, p in head.named_parameters()}

    changed = step(lambda: cancel_last_layer_grad(head))  # epoch 0: frozen
    assert not changed["last_layer.weight"] and changed["mlp.0.weight"]
    changed = step(None)  # epoch 1: trained
    assert changed["last_layer.weight"]
    rows = F.normalize(head.last_layer.weight, dim=1).norm(dim=1)
    assert torch.allclose(rows, torch.ones(32))
    assert head(torch.randn(5, 6) * 100).abs().max() <= 1 + 1e-5  # cosine of two unit vectors


def test_weight_decay_schedule_touches_only_the_decayed_group():
    model = DINO(nn.Sequential(nn.Flatten(), nn.Linear(12, 6)), 6, 16, 8, 32, num_classes=3)
    for name in ("lars", "adamw"):
        groups = optim.param_groups(nn.ModuleList([model.backbone, model.head]), 0.04)
        groups[0]["scheduled_wd"] = True
        groups += optim.param_groups(model.probe, 0.0)
        opt = optim.build_optimizer(name, groups, 0.1, 0.04)
        wd = optim.cosine_tau(50, 100, 0.04, 0.4)  # half-way on the cosine: (0.04 + 0.4) / 2
        assert abs(wd - 0.22) < 1e-12
        set_weight_decay(opt, wd)
        key = "lars_weight_decay" if name == "lars" else "weight_decay"
        assert [g[key] for g in opt.param_groups] == [0.22, 0.0, 0.0, 0.0]


def test_recipes():
    cifar = parse_args(["--dataset", "cifar10"])
    assert (cifar.optimizer, cifar.lr, cifar.weight_decay, cifar.weight_decay_end) == ("lars", 0.3, 1e-6, 1e-6)
    assert (cifar.base_tau, cifar.num_prototypes, cifar.warmup_teacher_temp_epochs, cifar.grad_clip) == \
        (0.9995, 4096, 0, 0.0) and not cifar.use_bn_in_head
    assert parse_args(["--dataset", "imagenet100"]).warmup_teacher_temp_epochs == 50
    vit = parse_args(["--dataset", "cifar10", "--backbone", "vit_small"])
    assert (vit.optimizer, vit.lr, vit.weight_decay, vit.weight_decay_end, vit.grad_clip, vit.min_lr) == \
        ("adamw", 5e-4, 0.04, 0.4, 3.0, 1e-6)
    given = parse_args(["--backbone", "vit_tiny", "--lr", "1e-3", "--grad-clip", "0"])
    assert (given.lr, given.grad_clip, given.optimizer) == (1e-3, 0.0, "adamw")  # flags given win
    with pytest.raises(UsageError):
        parse_args(["--num-large-crops", "1"])
    for flag, value in [("--teacher-temp", "0"), ("--student-temp", "-1"), ("--center-momentum", "1.5"),
                        ("--base-tau", "2"), ("--warmup-teacher-temp-epochs", "-1"), ("--num-prototypes", "0"),
                        ("--weight-decay-end", "-0.1")]:
        with pytest.raises(UsageError):
            parse_args([flag, value])


# ---- 2 processes ----
def test_two_processes_match_one(tmp_path):
    from dist_dino import compute, global_views
    torchrun("tests/dist_dino.py", tmp_path)
    ranks = [torch.load(tmp_path / f"dino-rank{r}.pt") for r in range(2)]
    torch.manual_seed(0)
    model = nn.Linear(6, 5)  # same seed -> same initial weights as in the workers
    inputs, teacher = global_views(1)
    loss, center = compute(model, inputs, teacher, torch.linspace(-1, 1, 5))
    # the center is all-reduced: every rank holds the single-process value
    assert all(torch.allclose(r["center"], center, atol=1e-6) for r in ranks)
    rank0_alone = torch.linspace(-1, 1, 5) * 0.9 + torch.stack(teacher)[:, :4].reshape(-1, 5).mean(0) * 0.1
    assert not torch.allclose(center, rank0_alone, atol=1e-3)  # so a missing all-reduce would show
    # each rank's loss is its half's mean: their mean is the global loss; DDP-averaged gradients match
    assert torch.allclose((ranks[0]["loss"] + ranks[1]["loss"]) / 2, loss, atol=1e-6)
    for r in ranks:
        for got, want in zip(r["grads"], [p.grad for p in model.parameters()]):
            assert torch.allclose(got, want, atol=1e-6)


# ---- end to end ----
def image_folder(root, count=64, val=0):
    """PNGs of synthetic shapes: flat (no labels: no probe validation, ViT evaluation being the slow part on
    a CPU), or with `val` images, class folders under train/ and val/ (a small, fast validation set)."""
    from common.data import SYNTHETIC_CLASSES, synthetic_images
    images, labels = synthetic_images(count + val, seed=0)
    for i, (image, label) in enumerate(zip(images, labels)):
        folder = root if not val else root / ("train" if i < count else "val") / SYNTHETIC_CLASSES[label]
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(image.permute(1, 2, 0).numpy()).save(folder / f"{i}.png")
    return root


def test_resnet_runs_resumes_exactly_and_freezes_the_prototypes_in_epoch_0(tmp_path):
    """Multi-crop (2 + 1 views), 4 steps an epoch; stopped at step 2 (epoch 0) and resumed to step 6 (epoch 1)
    = straight to 6.
    On a small labelled folder (the synthetic set's 2000 validation images would dominate the time); its
    ImageNet-family recipe warms the teacher temperature up over 50 epochs, across the resume too."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    flags = ["--dataset", "folder", "--data-dir", image_folder(tmp_path / "images", val=40), "--recipe", "imagenet",
             "--crop-size", "32",
             "--backbone", "resnet_narrow", "--num-small-crops", "1", "--train-subset", "32", "--batch-size", "8",
             "--epochs", "20"]  # the recipe's 10 warmup epochs need as many epochs (6 steps are run either way)
    run_script(*tiny(straight, *flags, "--max-steps", "6"))
    run_script(*tiny(resumed, *flags, "--max-steps", "2"))
    at2 = torch.load(resumed / "last.pt", weights_only=True)
    run_script(*tiny(resumed, *flags, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    end_a = [m for m in read_metrics(straight) if m["type"] == "epoch"][-1]
    end_b = [m for m in read_metrics(resumed) if m["type"] == "epoch"][-1]
    assert end_a["probe_acc1"] == end_b["probe_acc1"] and end_a["teacher_temp"] == end_b["teacher_temp"]
    assert abs(end_a["teacher_temp"] - (0.04 + 0.03 / 49)) < 1e-12  # epoch 1 of np.linspace(0.04, 0.07, 50)
    at6 = torch.load(straight / "last.pt", weights_only=True)
    assert torch.allclose(at6["extra"]["center"], torch.load(resumed / "last.pt")["extra"]["center"], atol=1e-6)
    assert at2["extra"]["center"].shape == (64,) and at2["extra"]["center"].abs().sum() > 0
    # The teacher is an EMA of the student and starts equal: their prototypes stay equal while the
    # student's are frozen (epoch 0), and part after steps 5 and 6 (epoch 1). The backbones part at once.
    key, conv = "head.last_layer.weight", "backbone.conv1.weight"
    assert torch.allclose(at2["model"][key], at2["teacher"]["1.last_layer.weight"], rtol=0, atol=1e-7)
    assert not torch.allclose(at2["model"][conv], at2["teacher"]["0.conv1.weight"], rtol=0, atol=1e-7)
    assert not torch.allclose(at6["model"][key], at6["teacher"]["1.last_layer.weight"], rtol=0, atol=1e-7)
    assert (straight / "backbone.pt").exists()


@pytest.mark.parametrize("backbone", ["resnet_narrow", "vit_tiny"])
def test_ddp_two_processes_keep_ranks_identical(backbone, tmp_path):
    """torchrun with 2 CPU processes. The ViT trains on 32px crops and two 18px small crops (patch 4,
    position embeddings interpolated, padded to whole patches) from an unlabelled folder, whose
    ImageNet-family recipe also warms the teacher temperature up (epoch 0: 0.04)."""
    out = tmp_path / "run"
    extra = []
    if backbone == "vit_tiny":
        extra = ["--dataset", "folder", "--data-dir", image_folder(tmp_path / "images"), "--recipe", "imagenet",
                 "--crop-size", "32",
                 "--num-small-crops", "2", "--small-crop-size", "18", "--epochs", "20"]  # >= the 10 warmup epochs
    torchrun("tests/rank_params.py", "dino", *tiny(out, "--backbone", backbone, "--max-steps", "2", *extra)[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
    args = json.loads((out / "args.json").read_text())
    assert args["world_size"] == 2 and args["global_batch_size"] == 32
    recipe = {**RECIPES["imagenet"], **VIT_OVERRIDES} if backbone == "vit_tiny" else RECIPES["synthetic"]
    keys = ("optimizer", "lr", "weight_decay")
    assert [args[k] for k in keys] == [recipe[k] for k in keys]
    lines = read_metrics(out)
    assert [m["step"] for m in lines if m["type"] == "step"] == [1, 2] and (out / "backbone.pt").exists()
    # the synthetic recipe has no warm-up: its final temperature from step 1
    assert lines[-1]["teacher_temp"] == (0.04 if backbone == "vit_tiny" else recipe["teacher_temp"])
