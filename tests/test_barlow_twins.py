"""Barlow Twins: loss values derived by hand, the formula against an explicit loop, BN invariances,
the recipe, two processes = one process on the global batch, resume and DDP end to end."""
import math

import pytest
import torch

from barlow_twins import BarlowTwins, barlow_twins_loss, parse_args
from common import cli
from common.backbones import load_backbone
from conftest import TINY, read_metrics, run_script, step_losses, torchrun

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16"]
# 4 images, 2 features of mean 0 and (biased) variance 1, uncorrelated: BN leaves them as they are
# (up to eps, set to 0 below) and BN(z)^T BN(z) / 4 = I.
Z = torch.tensor([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])


def tiny(out_dir, *extra):
    return ["barlow_twins.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_hand_values():
    # identical views: C = I, both sums are 0
    assert barlow_twins_loss(Z, Z, eps=0.0).item() == pytest.approx(0.0, abs=1e-7)
    # opposite views: C = -I, so sum_i (1 - (-1))^2 = 2 * 4 = 8 and no off-diagonal: 0.1 * 8
    assert barlow_twins_loss(Z, -Z, eps=0.0).item() == pytest.approx(0.8)
    # features swapped in view 2: C_ij = mean_n z_ni z_nj' = [[0, 1], [1, 0]]: on-diagonal (1 - 0)^2 * 2 = 2,
    # off-diagonal 1^2 * 2 = 2 -> scale * (2 + lambda * 2) = 0.1 * (2 + 0.5 * 2) = 0.3
    assert barlow_twins_loss(Z, Z[:, [1, 0]], lamb=0.5, eps=0.0).item() == pytest.approx(0.3)
    # lambda = 0 ignores the off-diagonal; scale multiplies the whole loss: 2 * 2 = 4
    assert barlow_twins_loss(Z, Z[:, [1, 0]], lamb=0.0, scale_loss=2.0, eps=0.0).item() == pytest.approx(4.0)


def test_matches_explicit_loop_with_torch_batchnorm():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(16, 5, generator=g) * 3 + 1, torch.randn(16, 5, generator=g)
    bn = torch.nn.BatchNorm1d(5, affine=False).train()  # batch statistics, eps 1e-5, as the paper's BN
    c = bn(z1).T @ bn(z2) / 16
    expected = sum((1 - c[i, i]) ** 2 + 0.0051 * sum(c[i, j] ** 2 for j in range(5) if j != i) for i in range(5))
    assert barlow_twins_loss(z1, z2).item() == pytest.approx(0.1 * expected.item(), rel=1e-5)


def test_invariant_to_per_feature_affine_maps_and_batch_order():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(12, 4, generator=g), torch.randn(12, 4, generator=g)
    base = barlow_twins_loss(z1, z2, eps=0.0)
    scaled = barlow_twins_loss(z1 * torch.tensor([0.1, 2.0, 5.0, 1.0]) + 7, z2 - 3, eps=0.0)
    perm = torch.randperm(12, generator=g)
    assert torch.allclose(base, scaled, atol=1e-5)
    assert torch.allclose(base, barlow_twins_loss(z1[perm], z2[perm], eps=0.0), atol=1e-6)


def test_gradient_reaches_both_views():
    z1, z2 = torch.randn(8, 4, requires_grad=True), torch.randn(8, 4, requires_grad=True)
    barlow_twins_loss(z1, z2).backward()
    assert z1.grad.abs().sum() > 0 and z2.grad.abs().sum() > 0


def test_recipe_and_heads():
    args = parse_args(["--dataset", "cifar10"])
    assert (args.optimizer, args.lr, args.weight_decay, args.preset) == ("lars", 0.3, 1e-4, "asymmetric")
    assert (args.lamb, args.scale_loss, args.proj_hidden_dim, args.proj_output_dim) == (0.0051, 0.1, 2048, 2048)
    model = BarlowTwins(torch.nn.Flatten(), 12, 2048, 2048, num_classes=10)
    kinds = [type(m).__name__ for m in model.projector]
    assert kinds == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [m.out_features for m in model.projector if isinstance(m, torch.nn.Linear)] == [2048, 2048, 2048]
    with pytest.raises(cli.UsageError):
        parse_args(["--num-large-crops", "3"])
    for bad in (["--lamb", "-0.1"], ["--scale-loss", "0"], ["--proj-hidden-dim", "0"]):
        with pytest.raises(cli.UsageError):
            parse_args(bad)


def test_probe_sees_every_large_crop():
    model = BarlowTwins(torch.nn.Flatten(), 12, 8, 4, num_classes=3)
    (z1, z2), logits = model([torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)])
    assert z1.shape == z2.shape == (5, 4) and logits.shape == (10, 3)


def test_two_processes_match_one_process(tmp_path):
    """Global BN moments and C all-reduced: each rank holds the global-batch loss, and DDP's
    averaged gradients equal one process's on the 8 rows (see tests/dist_noncontrastive.py)."""
    torchrun("tests/dist_noncontrastive.py", "barlow_twins", tmp_path)
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 5)  # seed 0: the workers' initial weights
    x = lambda s: torch.randn(8, 6, generator=torch.Generator().manual_seed(s))
    loss = barlow_twins_loss(model(x(1)), model(x(2)), lamb=0.3, scale_loss=0.5)
    loss.backward()
    for r in range(2):
        got = torch.load(tmp_path / f"barlow_twins-rank{r}.pt")
        assert torch.allclose(got["loss"], loss.detach(), atol=1e-5)
        for a, b in zip(got["grads"], [p.grad for p in model.parameters()]):
            assert torch.allclose(a, b, atol=1e-5)


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
    assert last_a["method"] == "barlow_twins" and last_a["step"] == 6
    assert all(torch.allclose(last_a["model"][k].float(), last_b["model"][k].float(), atol=1e-6)
               for k in last_a["model"])
    net, meta = load_backbone(straight / "backbone.pt")
    assert meta["method"] == "barlow_twins" and net(torch.randn(2, 3, 32, 32)).shape == (2, meta["feature_dim"])


def test_ddp_two_processes_keep_ranks_identical(tmp_path):
    out = tmp_path / "run"
    torchrun("tests/rank_params.py", "barlow_twins", *tiny(out, "--max-steps", "3")[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
