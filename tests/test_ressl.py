"""ReSSL: loss values by hand, relations against the queue only, gradient paths, both views through the online
backbone (solo-learn: its BN statistics and the probe see the weak view), the key queue (ring, last.pt, two
processes) and the script end to end."""
import json
import math
import sys

import pytest
import torch
import torch.nn.functional as F

from common.cli import UsageError
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from dist_contrastive import D, inputs, step_ressl, unit_rows
from ressl import ReSSL, check_queue_size, enqueue, ressl_loss

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--queue-size", "64"]
E1, E2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])


def tiny(out_dir, *extra):
    return ["ressl.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_hand_value():
    # q = k = e1, queue [e1, e2]: the teacher's relation is softmax([1, 0] / T_t) = [s, 1 - s] with
    # s = 1 / (1 + e^(-1/T_t)); the student's log-relation is [1/T_s, 0] - log(e^(1/T_s) + 1), so
    # L = -(s / T_s - log(e^(1/T_s) + 1)) = log(1 + e^(1/T_s)) - s / T_s.
    queue = torch.cat([E1, E2])
    for ts, tt in ((0.1, 0.04), (1.0, 1.0), (0.5, 0.25)):
        s = 1 / (1 + math.exp(-1 / tt))
        want = math.log(1 + math.exp(1 / ts)) - s / ts
        got = ressl_loss(2 * E1, 0.5 * E1, queue, student_temperature=ts, teacher_temperature=tt)
        assert abs(got.item() - want) < 1e-4


def test_relation_is_against_the_queue_only():
    """Each row's loss depends on its own q, k and the queue, never on the batch's other keys (paper, official code)."""
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 8, generator=g), torch.randn(6, 8, generator=g)
    queue = F.normalize(torch.randn(10, 8, generator=g), dim=1)
    rows = [ressl_loss(q[i:i + 1], k[i:i + 1], queue) for i in range(6)]
    assert torch.allclose(ressl_loss(q, k, queue), torch.stack(rows).mean(), atol=1e-6)
    other = k.clone()
    other[1:] = torch.randn(5, 8, generator=g)
    assert torch.allclose(ressl_loss(q[:1], other[:1], queue), rows[0])


def test_matching_relations_minimize_the_loss():
    # With T_s = T_t and q = k the student's distribution is the target: the loss is the target's entropy
    # (cross-entropy = entropy + KL, KL = 0) and its gradient vanishes.
    g = torch.Generator().manual_seed(1)
    k = F.normalize(torch.randn(4, 8, generator=g), dim=1)
    queue = F.normalize(torch.randn(12, 8, generator=g), dim=1)
    q = k.clone().requires_grad_()
    loss = ressl_loss(q, k, queue, student_temperature=0.1, teacher_temperature=0.1)
    target = (k @ queue.T / 0.1).softmax(1)
    assert torch.allclose(loss, -(target * target.log()).sum(1).mean(), atol=1e-5)
    loss.backward()
    assert q.grad.abs().max() < 1e-5
    assert ressl_loss(q.detach() + 0.3 * torch.randn(4, 8, generator=g), k, queue, 0.1, 0.1) > loss


def test_only_the_student_receives_gradient():
    q, k = torch.randn(4, 8, requires_grad=True), torch.randn(4, 8, requires_grad=True)
    queue = torch.randn(6, 8, requires_grad=True)
    ressl_loss(q, k, queue).backward()
    assert q.grad.abs().sum() > 0 and k.grad is None and queue.grad is None


def test_only_the_strong_view_is_projected_and_the_teacher_is_a_copy():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    model = ReSSL(backbone, 6, 16, 4, num_classes=3)
    teacher = model.teacher()
    strong, weak = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    q, logits = model([strong, weak])
    assert torch.equal(teacher(strong), q)  # q: the strong view's projection, whatever the weak view
    assert torch.equal(model([strong, -weak])[0], q)
    # the probe sees both views, strong rows first (solo-learn: every large crop)
    assert logits.shape == (4, 3) and torch.allclose(logits[2:], model.probe(backbone(weak)))
    assert not any(isinstance(m, torch.nn.BatchNorm1d) for m in model.projector)  # no BN in ReSSL's projector


def test_weak_view_moves_the_online_backbones_batchnorm_statistics():
    # BN momentum 0.1 from running mean 0: the strong view (all 1) gives 0.1, then the weak view (all 3)
    # 0.9 * 0.1 + 0.1 * 3 = 0.39. The strong view alone (the official code) would leave 0.1.
    backbone = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Flatten())
    model = ReSSL(backbone, 12, 16, 4, num_classes=3).train()
    model([torch.ones(4, 3, 2, 2), torch.full((4, 3, 2, 2), 3.0)])
    assert torch.allclose(backbone[0].running_mean, torch.full((3,), 0.39))
    strong_only = torch.nn.Sequential(torch.nn.BatchNorm2d(3), torch.nn.Flatten())
    ReSSL(strong_only, 12, 16, 4, num_classes=3).train()([torch.ones(4, 3, 2, 2)])
    assert torch.allclose(strong_only[0].running_mean, torch.full((3,), 0.1))


# Records, during training steps, the batch mean per channel entering the online backbone's first BN (the
# teacher, a copy with the same hook, runs without gradients and is left out) and the probe's rows.
RECORDING_RUN = """import sys, torch, ressl
seen = {"bn1_means": [], "probe_rows": []}
build_backbone, probe_loss = ressl.build_backbone, ressl.probe_loss
def record_bn1(module, inputs):
    if module.training and torch.is_grad_enabled():
        seen["bn1_means"].append(inputs[0].detach().double().mean((0, 2, 3)))
def recording_backbone(*a):
    net, dim = build_backbone(*a)
    net.bn1.register_forward_pre_hook(record_bn1)
    return net, dim
def recording_probe_loss(logits, labels):
    seen["probe_rows"].append((len(logits), len(labels)))
    return probe_loss(logits, labels)
ressl.build_backbone, ressl.probe_loss = recording_backbone, recording_probe_loss
ressl.main(sys.argv[2:])
torch.save(seen, sys.argv[1])
"""


def test_run_sends_both_views_through_the_online_backbone(tmp_path):
    """One training step: the online backbone's first BN running mean is, from 0 with momentum 0.1, the hand
    value 0.9 * 0.1 * mean(strong) + 0.1 * mean(weak) of the batch means entering it (solo-learn; the strong
    view alone, the official code, would give 0.1 * mean(strong)); the probe gets both views' 2B rows."""
    out = tmp_path / "run"
    run_script(sys.executable, "-c", RECORDING_RUN, tmp_path / "seen.pt",
               *tiny(out, "--max-steps", "1", "--online-views", "both")[1:])  # synthetic's recipe says strong
    seen = torch.load(tmp_path / "seen.pt")
    running_mean = torch.load(out / "last.pt", weights_only=True)["model"]["backbone.bn1.running_mean"].double()
    strong, weak = seen["bn1_means"]
    assert not torch.allclose(strong, weak, atol=1e-3)  # the two views differ: the test can tell them apart
    assert torch.allclose(running_mean, 0.9 * 0.1 * strong + 0.1 * weak, atol=1e-6), (running_mean, strong, weak)
    assert seen["probe_rows"] == [(32, 16)]
    assert json.loads((out / "args.json").read_text())["online_views"] == "both"


def test_enqueue_is_a_ring_of_whole_batches():
    queue = torch.zeros(6, 1)
    ptr = 0
    for value in (1.0, 2.0, 3.0, 4.0):
        ptr = enqueue(queue, ptr, torch.full((2, 1), value))
    assert ptr == 2 and queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3]


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    check_queue_size(4096, 256)
    with pytest.raises(UsageError, match="--queue-size 4096"):
        check_queue_size(4000, 256)


def test_two_processes_give_the_single_process_step(tmp_path):
    torchrun("tests/dist_contrastive.py", "ressl", tmp_path)
    want = step_ressl(*inputs("ressl"))
    start = unit_rows((16, D), seed=5)
    assert want["ptr"] == 0 and torch.equal(want["queue"][:8], start[:8])
    for rank in range(2):
        got = torch.load(tmp_path / f"ressl-rank{rank}.pt")
        assert torch.allclose(got["loss"], want["loss"], atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(got["grads"], want["grads"]))
        assert torch.equal(got["queue"], want["queue"]) and got["ptr"] == want["ptr"]


def test_run_resume_and_queue_in_last_pt(tmp_path):
    """Stopped at step 2 and resumed to step 6 = one run to step 6, queue and teacher included."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(straight, "--max-steps", "6"))
    run_script(*tiny(resumed, "--max-steps", "2"))
    run_script(*tiny(resumed, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    la, lb = (torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed))
    assert la["extra"]["queue_ptr"] == lb["extra"]["queue_ptr"] == 6 * 16 % 64
    assert la["extra"]["queue"].shape == (64, 16)
    assert torch.allclose(la["extra"]["queue"], lb["extra"]["queue"], atol=1e-6)
    assert all(torch.allclose(la["teacher"][k].float(), lb["teacher"][k].float(), atol=1e-6) for k in la["teacher"])
    steps = [m for m in read_metrics(straight) if m["type"] == "step"]
    assert steps[0]["tau"] == pytest.approx(0.99) and steps[0]["tau"] < steps[-1]["tau"] < 1.0
    assert json.loads((straight / "args.json").read_text())["preset"] == "ressl"


def test_torchrun_two_processes_keep_ranks_identical(tmp_path):
    out = tmp_path / "run"
    torchrun("tests/rank_params.py", "ressl", *tiny(out, "--max-steps", "2")[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert torch.load(out / "last.pt", weights_only=True)["extra"]["queue_ptr"] == 2 * 32 % 64
