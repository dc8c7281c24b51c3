"""SimCLR and BYOL losses: values derived by hand, the properties the papers state, gradient paths."""
import math

import pytest
import torch
import torch.nn.functional as F

from byol import BYOL, byol_loss
from common import cli
from simclr import SimCLR, parse_args, simclr_loss


def textbook_nt_xent(z1, z2, temperature):
    """NT-Xent as written in the SimCLR paper: 2N rows, the positive of row k is row k+N (mod 2N)."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n = len(z1)
    sim = z @ z.T / temperature
    sim.fill_diagonal_(float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)])
    return F.cross_entropy(sim, targets)


def test_simclr_hand_value():
    # rows: image 0 view 0, image 1 view 0, image 0 view 1, image 1 view 1; views of an image coincide,
    # images are orthogonal: each row has s=1 with its positive and s=0 with the 2 negatives, so
    # every row's loss is -log(e^(1/T) / (e^(1/T) + 2)) = log(1 + 2 e^(-1/T)).
    z = torch.tensor([[1.0, 0], [0, 1], [1, 0], [0, 1]])
    idx = torch.tensor([0, 1, 0, 1])
    for t in (0.5, 1.0):
        assert torch.allclose(simclr_loss(z, idx, temperature=t), torch.tensor(math.log(1 + 2 * math.exp(-1 / t))))


def test_simclr_equals_textbook_nt_xent():
    g = torch.Generator().manual_seed(0)
    z1, z2 = torch.randn(8, 16, generator=g), torch.randn(8, 16, generator=g)
    idx = torch.arange(8).repeat(2)
    ours = simclr_loss(torch.cat([z1, z2]), idx, temperature=0.2)
    assert torch.allclose(ours, textbook_nt_xent(z1, z2, 0.2), atol=1e-5)


def test_simclr_batch_permutation_invariant_and_scale_invariant():
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    idx = torch.arange(6).repeat(2)
    perm = torch.randperm(6, generator=g)
    base = simclr_loss(torch.cat([z1, z2]), idx)
    assert torch.allclose(base, simclr_loss(torch.cat([z1[perm], z2[perm]]), idx[torch.cat([perm, perm + 6])] % 6))
    assert torch.allclose(base, simclr_loss(torch.cat([3 * z1, 0.5 * z2]), idx), atol=1e-6)  # cosine: scale-free


def test_simclr_aligned_views_beat_random_views():
    g = torch.Generator().manual_seed(2)
    z1 = torch.randn(16, 32, generator=g)
    idx = torch.arange(16).repeat(2)
    aligned = simclr_loss(torch.cat([z1, z1 + 0.01 * torch.randn(16, 32, generator=g)]), idx)
    random = simclr_loss(torch.cat([z1, torch.randn(16, 32, generator=g)]), idx)
    assert aligned < random - 1.0


def test_simclr_multicrop_matches_explicit_sum():
    """With 3 views per image every row has 2 positives; compare with a loop over the formula."""
    g = torch.Generator().manual_seed(3)
    z = torch.randn(12, 5, generator=g)
    idx = torch.arange(4).repeat(3)
    t = 0.3
    zn = F.normalize(z, dim=1)
    total = 0.0
    for i in range(12):
        denom = sum(math.exp(zn[i] @ zn[a] / t) for a in range(12) if a != i)
        pos = [p for p in range(12) if p != i and idx[p] == idx[i]]
        total += -sum(math.log(math.exp(zn[i] @ zn[p] / t) / denom) for p in pos) / len(pos)
    assert abs(simclr_loss(z, idx, temperature=t).item() - total / 12) < 1e-4


def test_simclr_gradient_reaches_every_view():
    z = torch.randn(8, 4, requires_grad=True)
    simclr_loss(z, torch.arange(4).repeat(2)).backward()
    assert (z.grad.abs().sum(1) > 0).all()


def test_simclr_probe_sees_every_large_crop_and_flags_are_range_checked():
    model = SimCLR(torch.nn.Flatten(), 12, 8, 4, num_classes=3, num_large_crops=2)
    z, logits = model([torch.randn(5, 3, 2, 2) for _ in range(3)])  # two large crops and one small
    assert z.shape == (15, 4) and logits.shape == (10, 3)
    assert parse_args(["--temperature", "0.5"]).temperature == 0.5
    for bad in (["--temperature", "0"], ["--temperature", "nan"], ["--proj-output-dim", "0"]):
        with pytest.raises(cli.UsageError):
            parse_args(bad)


def test_byol_loss_values():
    z = torch.randn(5, 7)
    assert abs(byol_loss(z, z).item()) < 1e-6                        # aligned: 2 - 2 * 1
    assert abs(byol_loss(-z, z).item() - 4) < 1e-5                   # opposite: 2 - 2 * (-1)
    p, q = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 3.0]])
    assert abs(byol_loss(p, q).item() - 2) < 1e-6                    # orthogonal: 2 - 2 * 0
    # hand value: cos(45 deg) for one row, cos(0) for the other -> 2 - 2 * mean(1/sqrt 2, 1)
    p, q = torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert abs(byol_loss(p, q).item() - (2 - (1 / math.sqrt(2) + 1))) < 1e-6


def test_byol_stop_gradient_on_target():
    p = torch.randn(4, 8, requires_grad=True)
    z = torch.randn(4, 8, requires_grad=True)
    byol_loss(p, z).backward()
    assert p.grad is not None and p.grad.abs().sum() > 0
    assert z.grad is None


def test_byol_target_network_gets_no_gradient():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    model = BYOL(backbone, 6, 16, 4, 16, num_classes=3)
    target = model.target()
    views = [torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)]
    preds, _ = model(views)
    targets = [target(v) for v in views]
    loss = byol_loss(preds[0], targets[1]) + byol_loss(preds[1], targets[0])
    loss.backward()
    assert all(p.grad is None for p in target.parameters())
    assert all(p.grad is not None for p in model.predictor.parameters())
