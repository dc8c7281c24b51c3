"""SwAV: Sinkhorn-Knopp codes (hand values, the sums of the paper's Algorithm 1, 2 processes = 1), the swapped
prediction loss and its gradient path, frozen prototypes, the queue through last.pt, multi-crop and DDP runs."""
import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F

from types import SimpleNamespace

from common import optim
from common.backbones import build_backbone
from common.cli import UsageError
from common.run import Accumulation, optimizer_step
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from dist_swav import inputs
from swav import MULTICROP_MIN_LR, SwAV, parse_args, sinkhorn_knopp, swav_loss

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--num-prototypes", "20"]


def tiny(out_dir, *extra):
    return ["swav.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_sinkhorn_hand_values():
    # B = 2 samples, K = 2 prototypes, eps = 1, scores = log P with P = [[3, 1], [1, 1]] (rows: samples).
    # Q = P^T / 6 = [[1/2, 1/6], [1/6, 1/6]] (rows: prototypes). Iteration 1: rows to 1/K = 1/2 (row sums
    # 2/3, 1/3) -> [[3/8, 1/8], [1/4, 1/4]]; columns to 1/B, returned times B, i.e. columns to 1 (sums 5/8,
    # 3/8): sample 0 -> (3/8, 1/4) / (5/8) = (3/5, 2/5), sample 1 -> (1/8, 1/4) / (3/8) = (1/3, 2/3).
    # Iteration 2 from Q = codes^T / 2 = [[3/10, 1/6], [1/5, 1/3]]: row sums 7/15, 8/15, rows to 1/2 ->
    # [[9/28, 5/28], [3/16, 5/16]]; column sums 57/112, 55/112 -> sample 0 (36/57, 21/57) = (12/19, 7/19),
    # sample 1 (20/55, 35/55) = (4/11, 7/11).
    log_p = torch.tensor([[3.0, 1.0], [1.0, 1.0]]).log()
    one = torch.tensor([[3 / 5, 2 / 5], [1 / 3, 2 / 3]])
    two = torch.tensor([[12 / 19, 7 / 19], [4 / 11, 7 / 11]])
    assert torch.allclose(sinkhorn_knopp(log_p, epsilon=1.0, iterations=1), one, atol=1e-6)
    assert torch.allclose(sinkhorn_knopp(log_p, epsilon=1.0, iterations=2), two, atol=1e-6)
    assert torch.allclose(sinkhorn_knopp(0.05 * log_p, epsilon=0.05, iterations=2), two, atol=1e-6)  # exp(s / eps)


def test_sinkhorn_sums_of_algorithm_1():
    """Columns (samples) sum to 1 after the final normalization; rows (prototypes) hold B/K of the mass,
    exactly just before that last column step, hence at the fixed point reached with many iterations."""
    scores = F.normalize(torch.randn(12, 5, generator=torch.Generator().manual_seed(0)), dim=1)
    for iterations in (1, 3, 10):
        codes = sinkhorn_knopp(scores, epsilon=0.05, iterations=iterations)
        assert torch.allclose(codes.sum(1), torch.ones(12), atol=1e-5) and (codes >= 0).all()
    converged = sinkhorn_knopp(scores, epsilon=0.5, iterations=500)
    assert torch.allclose(converged.sum(0), torch.full((5,), 12 / 5), atol=1e-4)
    assert not torch.allclose(sinkhorn_knopp(scores, epsilon=0.5, iterations=1).sum(0), torch.full((5,), 12 / 5),
                              atol=1e-3)  # one iteration does not reach the fixed point: the test can tell


def test_sinkhorn_invariances_and_large_scores():
    g = torch.Generator().manual_seed(1)
    scores = torch.randn(10, 4, generator=g)
    codes = sinkhorn_knopp(scores, epsilon=0.5)
    assert torch.allclose(sinkhorn_knopp(torch.zeros(6, 4)), torch.full((6, 4), 1 / 4))  # nothing to prefer
    assert torch.allclose(sinkhorn_knopp(scores + 7.0, epsilon=0.5), codes, atol=1e-6)  # a global shift cancels
    per_prototype = torch.randn(1, 4, generator=g)  # scales rows of Q: undone by the first row normalization
    assert torch.allclose(sinkhorn_knopp(scores + per_prototype, epsilon=0.5), codes, atol=1e-5)
    perm = torch.randperm(10, generator=g)
    assert torch.allclose(sinkhorn_knopp(scores[perm], epsilon=0.5), codes[perm], atol=1e-6)
    cosines = F.normalize(scores, dim=1) @ F.normalize(torch.randn(4, 4, generator=g), dim=1).T
    small_eps = sinkhorn_knopp(cosines, epsilon=0.001)  # exp(s / eps) up to e^1000: the max shift is needed
    assert torch.isfinite(small_eps).all() and torch.allclose(small_eps.sum(1), torch.ones(10), atol=1e-5)


def test_queue_takes_part_in_the_equal_partition():
    # 4 identical batch samples mildly prefer prototype 0: alone, the equal split gives them (1/2, 1/2). Queued
    # samples that strongly prefer prototype 0 take more of it, so the batch's codes move to prototype 1.
    batch, queue = torch.tensor([[0.5, 0.0]]).repeat(4, 1), torch.tensor([[1.0, 0.0]]).repeat(4, 1)
    alone = sinkhorn_knopp(batch, epsilon=0.1)
    assert torch.allclose(alone, torch.full((4, 2), 0.5))
    joint = sinkhorn_knopp(torch.cat([queue, batch]), epsilon=0.1)[-4:]
    assert (joint[:, 0] < 0.4).all()


def explicit_swav(scores, queues, num_large, t, eps, iters):
    total = 0.0
    for i in range(num_large):
        q = sinkhorn_knopp(torch.cat([queues[i], scores[i]]).detach(), eps, iters)[-len(scores[i]):]
        for v in range(len(scores)):
            if v != i:
                total += sum(-sum(q[b, k] * torch.log_softmax(scores[v][b] / t, 0)[k] for k in range(q.shape[1]))
                             for b in range(len(q))) / len(q) / (len(scores) - 1)
    return total / num_large


def test_swav_loss_uniform_scores_give_log_k():
    # equal scores: codes 1/K, log_softmax = -log K everywhere -> every term is sum_k (1/K) log K = log K
    scores = [torch.zeros(3, 7) for _ in range(4)]
    assert abs(swav_loss(scores, [torch.zeros(5, 7)] * 2, num_large_crops=2).item() - math.log(7)) < 1e-6


def test_swav_loss_matches_formula_and_codes_carry_no_gradient():
    views, queues = inputs()  # 4 views (2 large, 2 "small") of 8 images, queues of 7 rows
    views = [v.clone().requires_grad_() for v in views]
    loss = swav_loss(views, queues, num_large_crops=2, temperature=0.1, epsilon=0.05, sinkhorn_iters=3)
    loss.backward()
    ref_views = [v.detach().clone().requires_grad_() for v in views]
    ref = explicit_swav(ref_views, queues, 2, 0.1, 0.05, 3)  # codes computed from detached scores
    ref.backward()
    assert abs(loss.item() - ref.item()) < 1e-5
    for got, want in zip(views, ref_views):  # the same gradients: none flows through the codes
        assert torch.allclose(got.grad, want.grad, atol=1e-6)
    without_queue = swav_loss([v.detach() for v in views], None, num_large_crops=2)
    assert abs(without_queue.item() - loss.item()) > 1e-4  # the queue changes the codes


def test_sinkhorn_constants_drop_out():
    """Algorithm 1 written out with its constants (total, 1/K, 1/B, the final B) gives the same codes as the
    function, which leaves them out; 0 iterations (no column step, so no codes) is refused."""
    scores = torch.randn(9, 4, generator=torch.Generator().manual_seed(2)).double()
    q = torch.exp(scores / 0.5).T
    num_prototypes, num_samples = q.shape
    q = q / q.sum()
    for _ in range(3):
        q = q / q.sum(dim=1, keepdim=True) / num_prototypes
        q = q / q.sum(dim=0, keepdim=True) / num_samples
    assert torch.allclose(sinkhorn_knopp(scores, epsilon=0.5, iterations=3).double(), (q * num_samples).T, atol=1e-6)
    with pytest.raises(ValueError):
        sinkhorn_knopp(scores, iterations=0)


def test_prototypes_stay_unit_norm_and_scores_are_cosines():
    net, dim = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6)), 6
    model = SwAV(net, dim, 16, 8, 10, num_classes=3, num_large_crops=2)
    model.normalize_prototypes()
    assert torch.allclose(model.prototypes.weight.norm(dim=1), torch.ones(10))
    z, scores, logits = model([torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2), torch.randn(4, 3, 2, 2)])
    assert all(torch.allclose(x.norm(dim=1), torch.ones(4)) for x in z)
    assert all(s.abs().max() <= 1 + 1e-6 for s in scores)
    assert logits.shape == (8, 3)  # the probe sees both large crops (solo-learn), not the third (small) view


def test_multicrop_min_lr_and_flag_ranges():
    """solo-learn's cifar-multicrop/swav.yaml ends the cosine at 0.0006 (cifar/swav.yaml at 0): --preset
    multicrop sets it unless --min-lr is given."""
    assert parse_args(["--dataset", "cifar10"]).min_lr == 0.0
    assert parse_args(["--dataset", "cifar10", "--preset", "multicrop"]).min_lr == MULTICROP_MIN_LR == 0.0006
    assert parse_args(["--dataset", "cifar10", "--preset", "multicrop", "--min-lr", "0"]).min_lr == 0.0
    assert parse_args(["--preset", "multicrop", "--min-lr", "1e-5"]).min_lr == 1e-5
    for flag, value in [("--epsilon", "0"), ("--temperature", "-0.1"), ("--sinkhorn-iters", "0"),
                        ("--queue-size", "-1"), ("--num-prototypes", "0"), ("--freeze-prototypes-epochs", "1.5")]:
        with pytest.raises(UsageError):
            parse_args([flag, value])


def test_two_processes_give_the_codes_and_loss_of_one(tmp_path):
    torchrun("tests/dist_swav.py", "sinkhorn", tmp_path)
    ranks = [torch.load(tmp_path / f"sinkhorn-rank{r}.pt") for r in range(2)]
    views, queues = inputs()
    codes = sinkhorn_knopp(torch.cat([queues[0], views[0]]), epsilon=0.1, iterations=3)[-8:]
    assert torch.allclose(torch.cat([r["codes"] for r in ranks]), codes, atol=1e-6)
    loss = swav_loss(views, queues, num_large_crops=2, temperature=0.1, epsilon=0.05, sinkhorn_iters=3)
    assert abs(sum(r["loss"].item() for r in ranks) / 2 - loss.item()) < 1e-5  # equal halves: mean of means


@pytest.mark.parametrize("name", ["lars", "sgd", "adamw"])
def test_frozen_prototypes_then_trained(name):
    """The script's freezing (gradient None: no step, no momentum, no weight decay) with each optimizer, then
    the first step that trains them: with momentum optimizers their momentum state starts there."""
    torch.manual_seed(0)
    model = SwAV(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6)), 6, 16, 8, 10, num_classes=3)
    groups = optim.param_groups(torch.nn.ModuleList([model.backbone, model.projector, model.prototypes]), 1e-3,
                                exclude_1d=name == "lars")
    opt = optim.build_optimizer(name, groups, 0.1, 1e-3)
    run = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False), watch_finite=lambda *args: None,
                          accumulation=Accumulation(1, 1),
                          args=SimpleNamespace(freeze_backbone_epochs=0))
    freeze = lambda: setattr(model.prototypes.weight, "grad", None)
    views = [torch.randn(8, 3, 2, 2) for _ in range(2)]
    for hook in (freeze, freeze, None, None):  # epochs 0 and 1 frozen, then trained
        before = model.prototypes.weight.detach().clone(), model.projector[0].weight.detach().clone()
        model.normalize_prototypes()
        _, scores, _ = model(views)
        optimizer_step(run, swav_loss(scores), opt, 0, 0, 0.0, hook)
        assert torch.equal(model.prototypes.weight, F.normalize(before[0], dim=1)) == (hook is not None)
        assert not torch.equal(model.projector[0].weight, before[1])


def initial_prototypes():
    """The prototypes a run with seed 0 starts from: the script seeds, then builds backbone and heads."""
    torch.manual_seed(0)
    backbone, dim = build_backbone("resnet_narrow", 32)
    return F.normalize(SwAV(backbone, dim, 32, 16, 20, 10).prototypes.weight.detach(), dim=1)


def test_multicrop_queue_frozen_prototypes_and_resume(tmp_path):
    """2 x 32px + 2 x 18px crops, a queue of 3 batches used from epoch 0, prototypes frozen in epoch 0 (steps 1-4).
    Stopped at step 2 and resumed to step 6 = one run to step 6 (the queue goes through last.pt)."""
    flags = ["--preset", "multicrop", "--num-small-crops", "2", "--queue-size", "48", "--queue-start-epoch", "0",
             "--freeze-prototypes-epochs", "1"]
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(straight, *flags, "--max-steps", "6"))
    run_script(*tiny(resumed, *flags, "--max-steps", "2"))
    shutil.copy(resumed / "last.pt", tmp_path / "step2.pt")
    run_script(*tiny(resumed, *flags, "--max-steps", "6"))

    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    used = {m["step"]: m["queue_used"] for m in read_metrics(straight) if m["type"] == "step"}
    assert used == {1: 0, 2: 1, 3: 1, 4: 1, 5: 1, 6: 1}  # empty before the first enqueue
    args = json.loads((straight / "args.json").read_text())
    assert args["num_small_crops"] == 2 and args["preset"] == "multicrop"
    assert args["min_lr"] == MULTICROP_MIN_LR  # the resolved value: --min-lr was not given
    # and the schedule ends there: the 6th step (index 5) is 1/8 into the cosine after 4 warmup steps (12 steps
    # in all), from the base lr 2e-3 * 16 / 256 = 1.25e-4 toward 6e-4 (min lr, not scaled by the batch)
    lrs = {m["step"]: m["lr"] for m in read_metrics(straight) if m["type"] == "step"}
    assert abs(lrs[6] - (6e-4 + (1.25e-4 - 6e-4) * 0.5 * (1 + math.cos(math.pi / 8)))) < 1e-12

    early, end_a, end_b = (torch.load(p, weights_only=True) for p in
                           (tmp_path / "step2.pt", straight / "last.pt", resumed / "last.pt"))
    assert early["extra"]["queue"].shape == (2, 48, 16) and early["extra"]["queue_filled"] == 32
    filled = early["extra"]["queue"][:, :32]
    assert torch.allclose(filled.norm(dim=2), torch.ones(2, 32), atol=1e-5)  # n(z) of the large crops
    assert (early["extra"]["queue"][:, 32:] == 0).all()
    assert end_a["extra"]["queue_filled"] == 48 and torch.allclose(end_a["extra"]["queue"], end_b["extra"]["queue"])
    assert all(torch.allclose(end_a["model"][k].float(), end_b["model"][k].float(), atol=1e-6) for k in end_a["model"])

    init = initial_prototypes()
    assert torch.allclose(early["model"]["prototypes.weight"], init, atol=1e-6)  # frozen: only renormalized
    assert not torch.allclose(early["model"]["projector.3.weight"], end_a["model"]["projector.3.weight"])
    assert not torch.allclose(end_a["model"]["prototypes.weight"], init, atol=1e-4)  # trained in epoch 1


def test_ddp_two_processes_keep_ranks_identical(tmp_path):
    out = tmp_path / "run"
    torchrun("tests/rank_params.py", "swav", *tiny(out, "--queue-size", "64", "--queue-start-epoch", "0",
                                                   "--freeze-prototypes-epochs", "0", "--max-steps", "3")[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
    last = torch.load(out / "last.pt", weights_only=True)
    assert last["extra"]["queue_filled"] == 64  # 3 steps of 2 x 16 gathered features, capped at the size
    assert json.loads((out / "args.json").read_text())["world_size"] == 2
