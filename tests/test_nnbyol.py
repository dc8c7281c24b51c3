"""NNBYOL: loss values by hand and the view pairing, nearest neighbours, gradient paths (neighbours, support set
and momentum network get none), the support set (ring with labels, two processes, last.pt and an exact resume),
nn_acc in the metrics, and the script end to end."""
import math

import pytest
import torch
import torch.nn.functional as F

from common.cli import UsageError
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from dist_nnbyol import LABELS, batch, start_queue, step
from nnbyol import NNBYOL, check_queue_size, enqueue, nearest_neighbour, nnbyol_loss

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--pred-hidden-dim", "32", "--queue-size", "64"]
E1, E2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])


def tiny(out_dir, *extra):
    return ["nnbyol.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_hand_values_and_view_pairing():
    # byol(p, t) = 2 - 2 cos: 0 aligned, 2 orthogonal, 4 opposite; L = byol(p1, nn2) + byol(p2, nn1)
    # p1 = nn2 and p2 = nn1 up to scale: 0; pairing p1 with nn1 (e1 against e2) would give 2 + 2
    assert abs(nnbyol_loss(E1, E2, 5 * E2, 3 * E1).item()) < 1e-6
    # p1 = e1 against nn2 = -e1 (4), p2 = e1 against nn1 = e2 (2)
    assert abs(nnbyol_loss(E1, E1, E2, -E1).item() - 6) < 1e-6
    # 45 degrees in one row and aligned in the other: 2 - 2 * mean(1/sqrt 2, 1), once per view pair
    p, t = torch.tensor([[1.0, 1.0], [2.0, 0.0]]), torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    assert abs(nnbyol_loss(p, p, t, t).item() - 2 * (2 - (1 / math.sqrt(2) + 1))) < 1e-6


def test_nearest_neighbour_is_the_most_cosine_similar_row():
    queue = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]), dim=1)
    z = F.normalize(torch.tensor([[0.9, 0.1], [0.5, 0.6], [-2.0, 0.1]]), dim=1)
    # cosines of [0.5, 0.6]: 0.64 with e1, 0.77 with e2, 0.996 with the diagonal
    rows, index = nearest_neighbour(z, queue)
    assert index.tolist() == [0, 3, 2] and torch.equal(rows, queue[[0, 3, 2]])


def test_gradient_reaches_only_the_online_network():
    """The targets are neighbours of the momentum projections: the support set, the momentum network and the
    neighbours get no gradient; the predictor, projector and backbone do (through p)."""
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    model = NNBYOL(backbone, 6, 16, 4, 16, num_classes=3)
    target = model.target()
    queue = F.normalize(torch.randn(10, 4), dim=1).requires_grad_()
    views = [torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)]
    (p1, p2), logits = model(views)
    assert logits.shape == (10, 3)  # the probe sees both crops
    z1, z2 = (F.normalize(target(v), dim=1) for v in views)
    (nn1, _), (nn2, _) = nearest_neighbour(z1, queue), nearest_neighbour(z2, queue)
    assert not nn1.requires_grad and not nn2.requires_grad
    nnbyol_loss(p1, p2, nn1, nn2).backward()
    assert queue.grad is None and all(p.grad is None for p in target.parameters())
    for part in (model.predictor, model.projector, model.backbone):
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in part.parameters())


def test_enqueue_keeps_labels_with_embeddings_in_a_ring():
    queue, labels = torch.zeros(6, 1), torch.full((6,), -1)
    ptr = 0
    for value in (1, 2, 3, 4):  # batches of 2; the 4th overwrites the 1st
        ptr = enqueue(queue, labels, ptr, torch.full((2, 1), float(value)), torch.tensor([value, 10 * value]))
    assert ptr == 2 and isinstance(ptr, int)  # a Python int: the step never reads it back from the device
    assert queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3] and labels.tolist() == [4, 40, 2, 20, 3, 30]


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    check_queue_size(2048, 256)
    with pytest.raises(UsageError, match="--queue-size 64"):
        check_queue_size(60, 32)


def test_two_processes_give_the_single_process_step(tmp_path):
    torchrun("tests/dist_nnbyol.py", tmp_path)
    want = step(batch(1), batch(2), LABELS)
    start, _ = start_queue()
    assert want["ptr"] == 0 and torch.equal(want["queue"][:8], start[:8])
    assert want["queue_labels"][8:].tolist() == LABELS.tolist()
    assert 0 < want["nn_acc"] < 1 and all(g is None for g in want["target_grads"])
    for rank in range(2):
        got = torch.load(tmp_path / f"nnbyol-rank{rank}.pt")
        assert torch.allclose(got["loss"], want["loss"], atol=1e-6)
        assert torch.allclose(got["nn_acc"], want["nn_acc"])
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got["grads"], want["grads"]))
        assert all(g is None for g in got["target_grads"])
        assert torch.allclose(got["queue"], want["queue"], atol=1e-6)
        assert torch.equal(got["queue_labels"], want["queue_labels"]) and got["ptr"] == want["ptr"]


def test_run_resume_support_set_and_nn_acc(tmp_path):
    """Stopped at step 2 and resumed to step 6 = one run to step 6, support set, labels and target included."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(straight, "--max-steps", "6"))
    run_script(*tiny(resumed, "--max-steps", "2"))
    assert torch.load(resumed / "last.pt", weights_only=True)["extra"]["queue_ptr"] == 2 * 16
    run_script(*tiny(resumed, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    la, lb = (torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed))
    ea, eb = la["extra"], lb["extra"]
    assert ea["queue_ptr"] == eb["queue_ptr"] == 6 * 16 % 64
    assert torch.allclose(ea["queue"], eb["queue"], atol=1e-6) and torch.equal(ea["queue_labels"], eb["queue_labels"])
    assert ea["queue"].shape == (64, 16) and torch.allclose(ea["queue"].norm(dim=1), torch.ones(64), atol=1e-5)
    assert ((ea["queue_labels"] >= 0) & (ea["queue_labels"] < 10)).all()  # 96 embeddings went in: all rows real
    assert all(torch.allclose(la["target"][k].float(), lb["target"][k].float(), atol=1e-6) for k in la["target"])
    lines = read_metrics(straight)
    steps = [m for m in lines if m["type"] == "step"]
    # step 1 meets only random rows labelled -1: no neighbour can share the label
    assert steps[0]["nn_acc"] == 0.0 and all(0.0 <= m["nn_acc"] <= 1.0 for m in lines)
    assert all("nn_acc" in m for m in lines)
    assert all(0 <= m["loss"] <= 8 for m in steps) and steps[0]["tau"] == pytest.approx(0.99)
    assert (straight / "backbone.pt").exists()
