"""NNCLR: nearest neighbours, loss values by hand, gradient paths, the support set (ring with labels, last.pt,
two processes), nn_acc in the metrics, and the script end to end."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from common.cli import UsageError
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from dist_contrastive import LABELS, D, inputs, step_nnclr, unit_rows
from nnclr import NNCLR, check_queue_size, enqueue, nearest_neighbour, neighbour_accuracy, nnclr_loss

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--pred-hidden-dim", "32", "--queue-size", "64"]
E1, E2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])


def tiny(out_dir, *extra):
    return ["nnclr.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_nearest_neighbour_is_the_most_cosine_similar_row():
    queue = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]), dim=1)
    z = F.normalize(torch.tensor([[0.9, 0.1], [0.5, 0.6], [-2.0, 0.1]]), dim=1)
    # cosines of [0.5, 0.6]: 0.64 with e1, 0.77 with e2, 0.996 with the diagonal
    rows, index = nearest_neighbour(z, queue)
    assert index.tolist() == [0, 3, 2] and torch.equal(rows, queue[[0, 3, 2]])


def test_hand_value_and_view_pairing():
    # L(a, b) row i: -log softmax_k(n(a_i).n(b_k) / T)_i.
    # L(nn1 = [e1, e2], p2 = [e1, e2]): each row has logits {1/T own, 0 other} -> log(1 + e^(-1/T)).
    # L(nn2 = [e1, e1], p1 = [e2, e1]): row 0 logits [0 own, 1/T] -> log(1 + e^(1/T));
    #                                   row 1 logits [0, 1/T own] -> log(1 + e^(-1/T)).
    # Pairing nn1 with p1 instead would put log(1 + e^(1/T)) in place of the first term.
    t = 0.5
    lo, hi = math.log(1 + math.exp(-1 / t)), math.log(1 + math.exp(1 / t))
    nn1, nn2, p1, p2 = torch.cat([E1, E2]), torch.cat([E1, E1]), torch.cat([E2, E1]), torch.cat([E1, E2])
    assert abs(nnclr_loss(nn1, nn2, 3 * p1, p2, temperature=t).item() - (lo + (hi + lo) / 2) / 2) < 1e-6


def test_matches_the_formula_row_by_row():
    g = torch.Generator().manual_seed(0)
    nn1, nn2, p1, p2 = (torch.randn(5, 8, generator=g) for _ in range(4))
    t = 0.2

    def half(a, b):
        a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
        return sum(-math.log(math.exp(a[i] @ b[i] / t) / sum(math.exp(a[i] @ b[k] / t) for k in range(5)))
                   for i in range(5)) / 5

    want = (half(nn1, p2) + half(nn2, p1)) / 2
    assert abs(nnclr_loss(nn1, nn2, p1, p2, temperature=t).item() - want) < 1e-4


def test_no_gradient_flows_into_the_neighbours():
    """The paper's support set is a queue of stored embeddings: the neighbour is a lookup, p alone learns."""
    queue = F.normalize(torch.randn(10, 8), dim=1).requires_grad_()
    z1, z2 = (F.normalize(torch.randn(4, 8), dim=1).requires_grad_() for _ in range(2))
    p1, p2 = (torch.randn(4, 8, requires_grad=True) for _ in range(2))
    (nn1, _), (nn2, _) = nearest_neighbour(z1, queue), nearest_neighbour(z2, queue)
    assert not nn1.requires_grad
    nnclr_loss(nn1, nn2, p1, p2).backward()
    assert p1.grad.abs().sum() > 0 and p2.grad.abs().sum() > 0
    assert queue.grad is None and z1.grad is None and z2.grad is None


def test_heads_shapes():
    backbone = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6))
    model = NNCLR(backbone, 6, 16, 4, 8, num_classes=3)
    views = [torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)]
    (z1, z2), (p1, p2), logits = model(views)
    assert z1.shape == p1.shape == (5, 4)
    # the probe sees both views, one batch after another (solo-learn: every large crop)
    assert logits.shape == (10, 3) and torch.allclose(logits[5:], model.probe(backbone(views[1])))
    assert torch.allclose(z1.norm(dim=1), torch.ones(5))
    assert isinstance(model.projector[-1], torch.nn.BatchNorm1d)  # proj ends in BN, as in the paper


def test_nn_acc_counts_labelled_rows_only():
    # rows 0, 1, 3 are labelled; their neighbours match at rows 0 and 3: 2/3. Row 2 (-1, its neighbour a
    # random row of the initial support set, -1 too) is left out: a plain mean of the matches would give 3/4.
    labels, neighbour_labels = torch.tensor([0, 1, -1, 2]), torch.tensor([0, 2, -1, 2])
    assert neighbour_accuracy(neighbour_labels, labels).item() == pytest.approx(2 / 3)
    none_labelled = neighbour_accuracy(torch.tensor([-1, -1]), torch.tensor([-1, -1]))
    assert none_labelled.item() == 0.0 and none_labelled.dim() == 0  # a tensor, no branch on the data


def test_enqueue_keeps_labels_with_embeddings_in_a_ring():
    queue, labels = torch.zeros(6, 1), torch.full((6,), -1)
    ptr = 0
    for value in (1, 2, 3, 4):  # batches of 2; the 4th overwrites the 1st
        ptr = enqueue(queue, labels, ptr, torch.full((2, 1), float(value)), torch.tensor([value, 10 * value]))
    assert ptr == 2
    assert queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3] and labels.tolist() == [4, 40, 2, 20, 3, 30]


def test_queue_size_must_be_a_multiple_of_the_global_batch():
    check_queue_size(2048, 256)
    with pytest.raises(UsageError, match="--queue-size 64"):
        check_queue_size(60, 32)


def test_two_processes_give_the_single_process_step(tmp_path):
    torchrun("tests/dist_contrastive.py", "nnclr", tmp_path)
    want = step_nnclr(*inputs("nnclr"))
    start = unit_rows((16, D), seed=4)
    assert want["ptr"] == 0 and torch.equal(want["queue"][:8], start[:8])
    assert want["queue_labels"][8:].tolist() == LABELS.tolist()
    for rank in range(2):
        got = torch.load(tmp_path / f"nnclr-rank{rank}.pt")
        assert torch.allclose(got["loss"], want["loss"], atol=1e-6)
        assert torch.allclose(got["nn_acc"], want["nn_acc"])
        assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got["grads"], want["grads"]))
        assert torch.equal(got["queue"], want["queue"]) and torch.equal(got["queue_labels"], want["queue_labels"])
        assert got["ptr"] == want["ptr"]


def test_run_resume_support_set_and_nn_acc(tmp_path):
    """Stopped at step 2 and resumed to step 6 = one run to step 6, support set and labels included."""
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run_script(*tiny(straight, "--max-steps", "6"))
    run_script(*tiny(resumed, "--max-steps", "2"))
    run_script(*tiny(resumed, "--max-steps", "6"))
    a, b = step_losses(straight), step_losses(resumed)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
    assert all(abs(a[s] - b[s]) < 1e-6 for s in a), (a, b)
    la, lb = (torch.load(d / "last.pt", weights_only=True)["extra"] for d in (straight, resumed))
    assert la["queue_ptr"] == lb["queue_ptr"] == 6 * 16 % 64
    assert torch.allclose(la["queue"], lb["queue"], atol=1e-6) and torch.equal(la["queue_labels"], lb["queue_labels"])
    assert la["queue"].shape == (64, 16) and ((la["queue_labels"] >= 0) & (la["queue_labels"] < 10)).all()
    lines = read_metrics(straight)
    steps = [m for m in lines if m["type"] == "step"]
    # step 1 meets only random rows labelled -1: no neighbour can share the label
    assert steps[0]["nn_acc"] == 0.0 and all(0.0 <= m["nn_acc"] <= 1.0 for m in lines)
    assert all("nn_acc" in m for m in lines)
    assert (straight / "backbone.pt").exists()


def test_torchrun_two_processes_keep_ranks_identical(tmp_path):
    out = tmp_path / "run"
    torchrun("tests/rank_params.py", "nnclr", *tiny(out, "--max-steps", "2")[1:])
    r0, r1 = (torch.load(out / f"backbone-rank{r}.pt") for r in range(2))
    assert len(r0) > 10 and all(torch.equal(r0[k], r1[k]) for k in r0)
    assert json.loads((out / "args.json").read_text())["global_batch_size"] == 32
    assert torch.load(out / "last.pt", weights_only=True)["extra"]["queue_ptr"] == 2 * 32 % 64
