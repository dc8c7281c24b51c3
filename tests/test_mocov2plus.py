"""MoCo V2+: loss values by hand, the view/queue pairing, gradient paths, the key queue (ring, last.pt,
two processes) and the script end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from common.cli import UsageError
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from dist_contrastive import D, inputs, step_mocov2plus, unit_rows
from mocov2plus import MoCoV2Plus, check_queue_size, enqueue, mocov2plus_loss

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--queue-size", "64"]
E1, E2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])


def tiny(out_dir, *extra):
    return ["mocov2plus.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def one_pair(q, k, queue, t):
    """L(q, k, Q) alone: both halves of the symmetric loss given the same inputs."""
    return mocov2plus_loss(q, q, k, k, queue, queue, temperature=t)


def test_hand_value():
    # q = k = e1: positive logit 1/T; the queue holds e2 (logit 0) and -e1 (logit -1/T), so
    # L = -log(e^(1/T) / (e^(1/T) + 1 + e^(-1/T))) = log(1 + e^(-1/T) + e^(-2/T)).
    queue = torch.cat([E2, -E1])
    for t in (0.2, 1.0):
        want = math.log(1 + math.exp(-1 / t) + math.exp(-2 / t))
        assert abs(one_pair(E1, E1, queue, t).item() - want) < 1e-5
        assert abs(one_pair(3 * E1, 0.5 * E1, queue, t).item() - want) < 1e-5  # q and k are normalized


def test_other_keys_of_the_batch_are_not_negatives():
    # rows e1 and e2 with their own keys; the queue holds only e1. Row 0: logits [1/T, 1/T] -> log 2.
    # Row 1: [1/T, 0] -> log(1 + e^(-1/T)). Had row 1's key e2 been a negative of row 0, row 0 would differ.
    q = torch.cat([E1, E2])
    t = 0.5
    want = (math.log(2) + math.log(1 + math.exp(-1 / t))) / 2
    assert abs(one_pair(q, q, E1, t).item() - want) < 1e-6


def test_queries_meet_the_other_views_keys_and_queue():
    # q1 = k2 = e1 with queue2 = [e1]: log 2.  q2 = k1 = e2 with queue1 = [-e2]: log(1 + e^(-2/T)).
    # Pairing q1 with queue1 instead would give log(1 + e^(-1/T)) for the first half.
    t = 0.5
    loss = mocov2plus_loss(E1, E2, E2, E1, -E2, E1, temperature=t)
    assert abs(loss.item() - (math.log(2) + math.log(1 + math.exp(-2 / t))) / 2) < 1e-6


def test_matches_the_formula_row_by_row():
    g = torch.Generator().manual_seed(0)
    q, k = torch.randn(5, 8, generator=g), torch.randn(5, 8, generator=g)
    queue = F.normalize(torch.randn(7, 8, generator=g), dim=1)
    qn, kn, t = F.normalize(q, dim=1), F.normalize(k, dim=1), 0.2
    rows = [-math.log(math.exp(qn[i] @ kn[i] / t) / (math.exp(qn[i] @ kn[i] / t)
                                                      + sum(math.exp(qn[i] @ s / t) for s in queue))) for i in range(5)]
    assert abs(one_pair(q, k, queue, t).item() - sum(rows) / 5) < 1e-4


def test_only_queries_receive_gradient():
    q1, q2, k1, k2 = (torch.randn(4, 8, requires_grad=True) for _ in range(4))
    queue1, queue2 = (torch.randn(6, 8, requires_grad=True) for _ in range(2))
    mocov2plus_loss(q1, q2, k1, k2, queue1, queue2).backward()
    assert q1.grad.abs().sum() > 0 and q2.grad.abs().sum() > 0
    assert all(x.grad is None for x in (k1, k2, queue1, queue2))


def test_momentum_encoder_is_a_separate_copy():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    model = MoCoV2Plus(backbone, 6, 16, 4, num_classes=3)
    momentum = model.momentum_encoder()
    x = torch.randn(2, 3, 2, 2)
    assert torch.equal(momentum(x), model.projector(model.backbone(x)))
    assert all(a.data_ptr() != b.data_ptr() for a, b in zip(momentum.parameters(), model.parameters()))


def test_probe_sees_both_views():
    """solo-learn trains the online probe on every large crop: both views' rows, one batch after another."""
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    model = MoCoV2Plus(backbone, 6, 16, 4, num_classes=3)
    x1, x2 = torch.randn(2, 3, 2, 2), torch.randn(2, 3, 2, 2)
    (q1, q2), logits = model([x1, x2])
    assert logits.shape == (4, 3) and torch.allclose(logits[2:], model.probe(backbone(x2)))


def test_enqueue_is_a_ring_of_whole_batches():
    queue = torch.zeros(6, 2, 1)
    ptr = 0
    for value in (1.0, 2.0, 3.0, 4.0):  # batches of 2 keys per view; the 4th overwrites the 1st
        ptr = enqueue(queue, ptr, torch.full((2, 2, 1), value))
    assert ptr == 2
    assert queue[:, 0, 0].tolist() == [4, 4, 2, 2, 3, 3]


def test_queue_size_must_be_a_multiple_of_the_global_batch(tmp_path):
    check_queue_size(64, 32)
    with pytest.raises(UsageError, match="--queue-size 96"):
        check_queue_size(100, 16)
    proc = run_script(*tiny(tmp_path / "run", "--queue-size", "100"), check=False)
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert proc.returncode == 2 and len(lines) == 1 and "use e.g. --queue-size 96" in lines[0], proc.stderr


def test_two_processes_give_the_single_process_step(tmp_path):
    torchrun("tests/dist_contrastive.py", "mocov2plus", tmp_path)
    want = step_mocov2plus(*inputs("mocov2plus"))
    start = unit_rows((16, 2, D), seed=3)  # the worker's initial queue: the batch's 8 keys land in rows 8..15
    assert want["ptr"] == 0 and torch.equal(want["queue"][:8], start[:8])
    assert not torch.isclose(want["queue"][8:], start[8:]).all(-1).any()
    for rank in range(2):
        got = torch.load(tmp_path / f"mocov2plus-rank{rank}.pt")
        assert torch.allclose(got["loss"], want["loss"], atol=1e-6)
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got["grads"], want["grads"]))
        assert torch.equal(got["queue"], want["queue"]) and got["ptr"] == want["ptr"]


def test_run_resume_and_queue_in_last_pt(tmp_path):
    """Stopped at step 2 and resumed to step 6 = one run to step 6, queue included (64 keys, 16 a step: it wraps)."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(straight, "--max-steps", "6"))
    run_script(*tiny(resumed, "--max-steps", "2"))
    first = torch.load(resumed / "last.pt", weights_only=True)["extra"]
    assert first["queue_ptr"] == 32
    run_script(*tiny(resumed, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    la, lb = (torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed))
    assert la["extra"]["queue_ptr"] == lb["extra"]["queue_ptr"] == 6 * 16 % 64
    assert la["extra"]["queue"].shape == (64, 2, 16)
    assert torch.allclose(la["extra"]["queue"], lb["extra"]["queue"], atol=1e-6)
    assert torch.allclose(la["extra"]["queue"].norm(dim=-1), torch.ones(64, 2), atol=1e-5)
    assert all(torch.allclose(la["momentum"][k].float(), lb["momentum"][k].float(), atol=1e-6) for k in la["momentum"])
    steps = [m for m in read_metrics(straight) if m["type"] == "step"]
    assert steps[0]["tau"] == pytest.approx(0.99) and steps[0]["tau"] < steps[-1]["tau"] < 0.999
    assert (straight / "backbone.pt").exists()


def test_torchrun_two_processes_keep_ranks_identical(tmp_path):
    out = tmp_path / "run"
    torchrun("tests/rank_params.py", "mocov2plus", *tiny(out, "--max-steps", "2")[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert json.loads((out / "args.json").read_text())["global_batch_size"] == 32
    assert torch.load(out / "last.pt", weights_only=True)["extra"]["queue_ptr"] == 2 * 32 % 64
