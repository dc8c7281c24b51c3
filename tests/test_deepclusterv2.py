"""DeepCluster V2: spherical k-means (hand value, planted clusters, empty clusters), the loss and its gradient path,
the memory bank (gathered: 2 processes = 1), clusters ready for epoch 0, the bank through last.pt, DDP runs."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from common.cli import UsageError
from common.data import EpochSampler
from conftest import TINY, run_script, step_losses, torchrun
from deepclusterv2 import DeepClusterV2, cluster_bank, deepclusterv2_loss, parse_args, spherical_kmeans
from dist_deepclusterv2 import clustered, planted_batch

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--num-prototypes", "10", "10", "10"]


def tiny(out_dir, *extra):
    return ["deepclusterv2.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_kmeans_one_iteration_by_hand():
    # E-step with c0 = (1, 0), c1 = (0, 1): (1, 0) and (.8, .6) go to c0 (1 > 0, .8 > .6); (0, 1) and (-.6, .8) to c1.
    # M-step: c0 = n((1.8, .6)) = (3, 1)/sqrt(10), c1 = n((-.6, 1.8)) = (-1, 3)/sqrt(10). Final E-step: the dots with
    # (c0, c1) are (3, -1), (3, 1), (1, 3), (-1, 3) / sqrt(10): assignments stay 0, 0, 1, 1.
    x = torch.tensor([[1.0, 0.0], [0.8, 0.6], [0.0, 1.0], [-0.6, 0.8]])
    centroids, assignments = spherical_kmeans(x, torch.eye(2), iterations=1)
    assert torch.allclose(centroids, torch.tensor([[3.0, 1.0], [-1.0, 3.0]]) / math.sqrt(10), atol=1e-6)
    assert assignments.tolist() == [0, 0, 1, 1]


def test_kmeans_recovers_planted_clusters():
    g = torch.Generator().manual_seed(0)
    centers = torch.linalg.qr(torch.randn(8, 8, generator=g))[0][:4]  # 4 orthonormal directions
    labels = torch.randint(0, 4, (200,), generator=g)
    x = F.normalize(centers[labels] + 0.1 * torch.randn(200, 8, generator=g), dim=1)
    init = torch.stack([x[(labels == k).nonzero()[0, 0]] for k in range(4)])  # one member of each cluster
    centroids, assignments = spherical_kmeans(x, init, iterations=10)
    assert torch.equal(assignments, labels)
    means = F.normalize(torch.stack([x[labels == k].sum(0) for k in range(4)]), dim=1)
    assert torch.allclose(centroids, means, atol=1e-5)  # each centroid: the normalized mean of its members
    assert ((centroids * centers).sum(1) > 0.98).all()  # close to the planted directions


def test_empty_cluster_keeps_its_centroid():
    x = F.normalize(torch.rand(30, 3) + 0.1, dim=1)  # the positive octant
    lonely = F.normalize(torch.tensor([-1.0, -1.0, -1.0]), dim=0)  # negative dot with every row: never chosen
    init = torch.stack([x[0], x[1], lonely])
    centroids, assignments = spherical_kmeans(x, init, iterations=10)
    assert (assignments != 2).all() and torch.equal(centroids[2], lonely)
    assert torch.allclose(centroids.norm(dim=1), torch.ones(3))


def test_loss_by_hand():
    # views z1 = (1, 0), z2 = (0, 2) of one image (normalized: (0, 1)); T = 1. Head 0: C = I, target 0: logits
    # (1, 0) -> CE log(1 + e^-1); (0, 1) -> CE log(1 + e). Head 1: a single centroid -> CE 0. L = mean over heads.
    z = [torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])]
    prototypes = [torch.eye(2), torch.tensor([[1.0, 0.0]])]
    expected = ((math.log(1 + math.exp(-1)) + math.log(1 + math.e)) / 2 + 0) / 2
    loss = deepclusterv2_loss(z, prototypes, torch.tensor([[0], [0]]), temperature=1.0)
    assert abs(loss.item() - expected) < 1e-6
    # temperature divides the logits; unknown targets (-100) are ignored
    half = deepclusterv2_loss(z, prototypes[:1], torch.tensor([[0]]), temperature=0.5)
    assert abs(half.item() - (math.log(1 + math.exp(-2)) + math.log(1 + math.exp(2))) / 2) < 1e-6
    two = [torch.cat([v, v]) for v in z]
    assert abs(deepclusterv2_loss(two, prototypes[:1], torch.tensor([[0, -100]]), temperature=0.5).item()
               - half.item()) < 1e-6
    assert deepclusterv2_loss(z, prototypes, torch.full((2, 1), -100)).item() == 0.0  # not NaN


def test_gradient_reaches_z_not_prototypes():
    z = [torch.randn(4, 6, requires_grad=True) for _ in range(3)]
    prototypes = [F.normalize(torch.randn(k, 6), dim=1).requires_grad_() for k in (5, 7)]
    deepclusterv2_loss(z, prototypes, torch.randint(0, 5, (2, 4))).backward()
    assert all(v.grad is not None and v.grad.abs().sum() > 0 for v in z)
    assert all(p.grad is None for p in prototypes)
    # no known target: 0 with a zero gradient, z still in the graph (DDP needs every parameter used)
    unknown = deepclusterv2_loss(z, prototypes, torch.full((2, 4), -100))
    assert unknown.requires_grad and unknown.item() == 0.0
    z[0].grad = None
    unknown.backward()
    assert torch.equal(z[0].grad, torch.zeros(4, 6))


def test_probe_sees_every_large_crop_and_flag_ranges():
    model = DeepClusterV2(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6)), 6, 16, 8, [5, 7],
                          num_classes=3, num_large_crops=2)
    views = [torch.randn(4, 3, 2, 2) for _ in range(3)]  # 2 large crops and a third view
    z, logits = model(views)
    assert len(z) == 3 and logits.shape == (8, 3)  # both large crops, one batch after the other (solo-learn)
    assert torch.equal(logits, model(views[:2])[1])
    assert parse_args(["--num-prototypes", "4", "5"]).num_prototypes == [4, 5]
    for flags in (["--num-prototypes", "10", "0"], ["--temperature", "0"], ["--kmeans-iters", "-1"]):
        with pytest.raises(UsageError):
            parse_args(flags)


def test_bank_rows_and_head_views():
    z, indexes, _ = planted_batch()
    got = clustered(z, indexes)
    bank, filled, assignments = got["bank"], got["filled"], got["assignments"]
    for view in range(2):
        assert torch.equal(bank[view, indexes], z[view])
    assert filled.sum() == 24 and filled[indexes].all()
    assert (assignments[:, ~filled] == -100).all() and (assignments[:, filled] >= 0).all()
    for head, c in enumerate(got["centroids"]):  # head h clusters crop h mod 2: its final E-step on that bank
        rows = bank[head % 2, filled]
        assert torch.equal(assignments[head, filled], (rows @ c.T).argmax(1))
        assert not torch.equal(assignments[head, filled], (bank[1 - head % 2, filled] @ c.T).argmax(1))
    again = cluster_bank(bank, filled, [3, 4], iterations=10, seed=0, epoch=1)
    assert torch.equal(again[1], assignments)  # initialisation drawn from (seed, epoch, head): reproducible


def test_two_processes_cluster_like_one(tmp_path):
    torchrun("tests/dist_deepclusterv2.py", "cluster", tmp_path)
    ranks = [torch.load(tmp_path / f"cluster-rank{r}.pt") for r in range(2)]
    z, indexes, _ = planted_batch()
    single = clustered(z, indexes)
    for r in ranks:  # every rank holds the whole bank and the same clusters as one process
        assert torch.equal(r["bank"], single["bank"]) and torch.equal(r["filled"], single["filled"])
        assert torch.equal(r["assignments"], single["assignments"])
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(r["centroids"], single["centroids"]))


def test_bank_ready_for_epoch_0_saved_and_resumed(tmp_path):
    """The bank is filled before epoch 0; stopped at step 2 and resumed to step 6 (k-means again at step 4)
    = one run to step 6, bank and assignments included."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(straight, "--max-steps", "6"))
    run_script(*tiny(resumed, "--max-steps", "2"))
    shutil.copy(resumed / "last.pt", tmp_path / "step2.pt")
    run_script(*tiny(resumed, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    end_a, end_b = (torch.load(p / "last.pt", weights_only=True) for p in (straight, resumed))
    assert all(torch.allclose(end_a["model"][k].float(), end_b["model"][k].float(), atol=1e-6) for k in end_a["model"])
    for key in ("bank", "assignments", "filled"):
        assert torch.allclose(end_a["extra"][key].float(), end_b["extra"][key].float(), atol=1e-6), key
    assert end_a["extra"]["assigned_epoch"] == 1

    early = torch.load(tmp_path / "step2.pt", weights_only=True)
    bank, assignments = early["extra"]["bank"], early["extra"]["assignments"]
    assert bank.shape == (2, 64, 16) and early["extra"]["filled"].all()  # every image, before any step
    assert torch.allclose(bank.norm(dim=2), torch.ones(2, 64), atol=1e-5)
    assert assignments.shape == (3, 64) and ((assignments >= 0) & (assignments < 10)).all()
    assert early["extra"]["assigned_epoch"] == 0
    sampler = EpochSampler(64, seed=0)
    sampler.set_epoch(0)
    trained = [index for index, _ in sampler][:32]  # the rows steps 1-2 rewrote
    untouched = torch.tensor([i for i in range(64) if i not in trained])
    for head in range(3):  # prototypes = the centroids whose final E-step gave the epoch's assignments
        c = early["model"][f"prototypes.{head}.weight"]
        assert torch.allclose(c.norm(dim=1), torch.ones(10), atol=1e-5)
        assert torch.equal(assignments[head, untouched], (bank[head % 2, untouched] @ c.T).argmax(1))


def test_ddp_two_processes_keep_ranks_identical(tmp_path):
    out = tmp_path / "run"
    torchrun("tests/rank_params.py", "deepclusterv2", *tiny(out, "--max-steps", "3")[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["extra"]["filled"].all()  # 2 ranks x 2 batches x 16 = the 64 images, gathered into one bank
    assert json.loads((out / "args.json").read_text())["world_size"] == 2
