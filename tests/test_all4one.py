"""All4One: the positional encoding, the three objectives by hand (contrast, view pairing, redundancy), the
transformer's sequences, the k nearest neighbours, gradient paths (each objective reaches its heads only; the
neighbours, the support set and the momentum network get nothing), the support set (ring with labels, two
processes, last.pt and an exact resume), nn_acc in the metrics, and the script end to end."""
import math

import pytest
import torch
import torch.nn.functional as F

from all4one import (All4One, all4one_loss, check_queue_size, contrastive, enqueue, nearest_neighbours, parse_args,
                     positional_encoding, redundancy)
from common.cli import UsageError
from conftest import TINY, read_metrics, run_script, step_losses, torchrun
from dist_all4one import LABELS, batch, start_queue, step

HEADS = ["--proj-hidden-dim", "32", "--proj-output-dim", "16", "--pred-hidden-dim", "32", "--queue-size", "64"]
E1, E2 = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])


def tiny(out_dir, *extra):
    return ["all4one.py", *TINY, *HEADS, "--out-dir", out_dir, *extra]


def test_positional_encoding_runs_along_the_features():
    # k = 5 tokens: 6 channels, frequencies 10000^(-0/6), 10000^(-2/6), 10000^(-4/6); token j at feature d gets
    # sin (j even) or cos (j odd) of d times the frequency of pair j // 2
    pe, d = positional_encoding(5, 16), torch.arange(16.0)
    f1, f2 = 10000 ** (-1 / 3), 10000 ** (-2 / 3)
    want = torch.stack([d.sin(), d.cos(), (d * f1).sin(), (d * f1).cos(), (d * f2).sin()])
    assert pe.shape == (5, 16) and torch.allclose(pe, want, atol=1e-6)
    # k = 4: 4 channels, frequencies 1 and 10000^(-1/2) = 0.01
    assert torch.allclose(positional_encoding(4, 3)[3], (torch.arange(3.0) * 0.01).cos())


def test_contrast_hand_values():
    # l(a, b) row i: -log softmax_k(n(a_i).n(b_k) / T)_i; a = b = [e1, e2]: logits {1/T own, 0 other} per row
    t = 0.5
    lo, hi = math.log(1 + math.exp(-1 / t)), math.log(1 + math.exp(1 / t))
    ab = torch.cat([E1, E2])
    assert contrastive(ab, 3 * ab, t).item() == pytest.approx(lo, rel=1e-6)  # b's scale does not matter
    assert contrastive(ab, ab.flip(0), t).item() == pytest.approx(hi, rel=1e-6)  # own column is the other one


def test_view_pairing_of_both_contrasts():
    """L_nn pairs view 1's neighbour with view 2's prediction (and back); L_ctr the centroid of view 1's
    neighbours with view 2's own-prediction centroid (and back). With nn1 = [e1, e2], p2 = [e1, e2]: lo;
    nn2 = [e1, e1], p1 = [e2, e1]: rows (0 own, 1/T) and (0, 1/T own): (hi + lo) / 2. Pairing nn1 with p1
    instead would give (hi + lo) / 2 in the first place."""
    t = 0.5
    lo, hi = math.log(1 + math.exp(-1 / t)), math.log(1 + math.exp(1 / t))
    nn1, nn2, p1, p2 = torch.cat([E1, E2]), torch.cat([E1, E1]), torch.cat([E2, E1]), torch.cat([E1, E2])
    m, z = torch.eye(2), torch.eye(2)  # a zero redundancy term
    want = (lo + (hi + lo) / 2) / 2
    neighbour = all4one_loss(nn1, nn2, p1, p2, nn1, nn1, nn1, nn1, m, m, z, z, temperature=t, centroid_weight=0.0,
                             neighbour_weight=1.0, redundancy_weight=1.0)
    centroid = all4one_loss(nn1, nn1, nn1, nn1, nn1, nn2, p1, p2, m, m, z, z, centroid_temperature=t,
                            centroid_weight=1.0, neighbour_weight=0.0, redundancy_weight=1.0)
    assert neighbour.item() == pytest.approx(want, rel=1e-6) and centroid.item() == pytest.approx(want, rel=1e-6)


def test_redundancy_hand_values():
    m = torch.eye(2)  # two samples, two features, columns e1 and e2
    assert redundancy(m, m, m, m).item() == pytest.approx(0.0, abs=1e-6)  # R = I
    # z's features swapped: R = [[0, 1], [1, 0]]: on = sqrt(mean (0 - 1)^2) = 1, off = sqrt(mean 1^2) = 1: 10
    swapped = m.flip(1)
    assert redundancy(m, m, 3 * swapped, swapped).item() == pytest.approx(10.0, rel=1e-6)  # column scale cancels
    # z's columns (1, 1)/sqrt 2 and (1, -1)/sqrt 2: R = [[s, s], [s, -s]], s = 1/sqrt 2:
    # on^2 = ((s - 1)^2 + (s + 1)^2) / 2 = 3/2, off^2 = s^2 = 1/2: 10 * (sqrt(3/2) + sqrt(1/2)) / 2
    z = torch.tensor([[1.0, 1.0], [1.0, -1.0]])
    assert redundancy(m, m, z, z).item() == pytest.approx(5 * (math.sqrt(1.5) + math.sqrt(0.5)), rel=1e-6)
    # the pairs are (m1, z2) and (m2, z1): a perfect second pair halves the squares under the roots
    assert redundancy(m, m, m, swapped).item() == pytest.approx(10 * (math.sqrt(0.5) + math.sqrt(0.5)) / 2, rel=1e-6)


def test_weights_combine_the_three_objectives_linearly():
    g = torch.Generator().manual_seed(0)
    parts = [torch.randn(6, 4, generator=g) for _ in range(12)]
    unit = [all4one_loss(*parts, centroid_weight=w[0], neighbour_weight=w[1], redundancy_weight=w[2])
            for w in ((1, 0, 0), (0, 1, 0), (0, 0, 1))]
    assert unit[2].item() == pytest.approx(redundancy(*parts[8:]).item(), rel=1e-6)
    assert all4one_loss(*parts).item() == pytest.approx(0.5 * sum(u.item() for u in unit), rel=1e-6)


def test_nearest_neighbours_are_the_k_most_cosine_similar_rows_nearest_first():
    queue = F.normalize(torch.tensor([[1.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [1.0, 1.0]]), dim=1)
    z = F.normalize(torch.tensor([[0.9, 0.1], [-2.0, 0.1]]), dim=1)
    # cosines of n(0.9, 0.1): 0.994 (e1), 0.773 (diagonal), 0.110 (e2), -0.994 (-e1)
    rows, index = nearest_neighbours(z, queue, 3)
    assert index.tolist() == [[0, 3, 1], [2, 1, 3]] and torch.equal(rows, queue[index]) and rows.shape == (2, 3, 2)


class Flip(torch.nn.Module):
    """Stands in for the transformer: token 0 of the output is the last token of the input sequence."""

    def forward(self, x):
        return x.flip(1)


def test_the_transformers_sequences():
    """ctr(NN_k) reads the k neighbours; the own-prediction sequence is [q, NN_k[:k-1]]: with a transformer that
    reverses the sequence, token 0 of the output is NN_k[k-1] + PE[k-1] for the first and NN_k[k-2] + PE[k-1]
    for the second (the farthest neighbour dropped, q in front)."""
    model = All4One(torch.nn.Flatten(), 12, 16, 8, 16, num_classes=3, num_neighbours=3)
    views, neighbours = [torch.randn(4, 3, 2, 2)] * 2, [torch.randn(4, 3, 8), torch.randn(4, 3, 8)]
    z, p, centroids, own, logits = model(views, neighbours)
    assert z[0].shape == p[0].shape == centroids[0].shape == own[0].shape == (4, 8) and logits.shape == (8, 3)
    model.transformer = Flip()
    _, _, centroids, own, _ = model(views, neighbours)
    pe = positional_encoding(3, 8)
    for v in range(2):
        assert torch.allclose(centroids[v], neighbours[v][:, 2] + pe[2])
        assert torch.allclose(own[v], neighbours[v][:, 1] + pe[2])
    model.transformer = torch.nn.Identity()
    model.eval()  # BN of the predictor in eval: q does not depend on the other rows
    z, _, centroids, own, _ = model(views, neighbours)
    assert torch.allclose(own[0], model.predictor2(z[0]) + pe[0])
    assert torch.allclose(centroids[1], neighbours[1][:, 0] + pe[0])


@pytest.mark.parametrize("weights,reached,untouched", [
    ((1, 0, 0), ("transformer", "predictor2", "projector", "backbone"), ("predictor",)),
    ((0, 1, 0), ("predictor", "projector", "backbone"), ("transformer", "predictor2")),
    ((0, 0, 1), ("projector", "backbone"), ("transformer", "predictor", "predictor2")),
])
def test_each_objective_reaches_its_heads_only(weights, reached, untouched):
    """Centroid contrast: transformer (both centroids) and predictor2 (the own-prediction token); neighbour
    contrast: the predictor; feature contrast: the projector alone. Never the momentum network, the support set
    or the neighbours."""
    torch.manual_seed(0)
    model = All4One(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 6)), 6, 16, 8, 16, num_classes=3,
                    num_neighbours=3)
    target = model.target()
    queue = F.normalize(torch.randn(10, 8), dim=1).requires_grad_()
    views = [torch.randn(5, 3, 2, 2), torch.randn(5, 3, 2, 2)]
    m1, m2 = (F.normalize(target(v), dim=1) for v in views)
    (nn1, _), (nn2, _) = nearest_neighbours(m1, queue, 3), nearest_neighbours(m2, queue, 3)
    assert not nn1.requires_grad and not nn2.requires_grad
    (z1, z2), (p1, p2), (c1, c2), (o1, o2), _ = model(views, (nn1, nn2))
    loss = all4one_loss(nn1[:, 0], nn2[:, 0], p1, p2, c1, c2, o1, o2, m1, m2, z1, z2, centroid_weight=weights[0],
                        neighbour_weight=weights[1], redundancy_weight=weights[2])
    loss.backward()
    assert queue.grad is None and all(p.grad is None for p in target.parameters())
    grad = lambda name: [p.grad for p in getattr(model, name).parameters()]
    for name in reached:
        assert any(g is not None and g.abs().sum() > 0 for g in grad(name)), name
    for name in untouched:
        assert all(g is None or g.abs().sum() == 0 for g in grad(name)), name


def test_enqueue_keeps_labels_with_embeddings_in_a_ring():
    queue, labels = torch.zeros(6, 1), torch.full((6,), -1)
    ptr = 0
    for value in (1, 2, 3, 4):  # batches of 2; the 4th overwrites the 1st
        ptr = enqueue(queue, labels, ptr, torch.full((2, 1), float(value)), torch.tensor([value, 10 * value]))
    assert ptr == 2 and isinstance(ptr, int)  # a Python int: the step never reads it back from the device
    assert queue[:, 0].tolist() == [4, 4, 2, 2, 3, 3] and labels.tolist() == [4, 40, 2, 20, 3, 30]


def test_queue_size_and_flags():
    check_queue_size(98304, 256, 5)
    with pytest.raises(UsageError, match="--queue-size 64"):
        check_queue_size(60, 32, 5)
    with pytest.raises(UsageError, match="--queue-size 6"):  # fewer rows than neighbours
        check_queue_size(2, 2, 5)
    args = parse_args(["--dataset", "cifar100"])
    assert (args.optimizer, args.lr, args.weight_decay, args.preset, args.queue_size) == ("lars", 1.0, 1e-5,
                                                                                         "asymmetric", 98304)
    assert (args.temperature, args.centroid_temperature, args.num_neighbours, args.transformer_lr) == (0.2, 0.1, 5, 0.1)
    assert (args.centroid_weight, args.neighbour_weight, args.redundancy_weight) == (0.5, 0.5, 0.5)
    for bad in (["--proj-output-dim", "20"], ["--num-small-crops", "2"], ["--num-neighbours", "1"]):
        with pytest.raises(UsageError):
            parse_args(bad)


def test_two_processes_give_the_single_process_step(tmp_path):
    """The contrasts run against the all-gathered batch and equal the one-process ones; the feature contrast is
    each rank's own (solo-learn), so the reference averages it over the halves. Gradients (transformer included),
    nn_acc, the neighbours and the support set match."""
    torchrun("tests/dist_all4one.py", tmp_path)
    want = step(batch(1), batch(2), LABELS, halves=2)
    assert abs(step(batch(1), batch(2), LABELS)["loss"] - want["loss"]) > 1e-3  # the halving matters
    start, _ = start_queue()
    assert want["ptr"] == 0 and torch.equal(want["queue"][:8], start[:8])
    assert want["queue_labels"][8:].tolist() == LABELS.tolist() and 0 < want["nn_acc"] < 1
    assert all(g is not None and g.abs().sum() > 0 for g in want["grads"].values())
    for rank in range(2):
        got = torch.load(tmp_path / f"all4one-rank{rank}.pt")
        assert torch.allclose(got["loss"], want["loss"], atol=1e-5) and torch.allclose(got["nn_acc"], want["nn_acc"])
        assert all(torch.allclose(got["grads"][k], g, atol=1e-5) for k, g in want["grads"].items())
        assert all(g is None for g in got["target_grads"]) and torch.equal(got["index1"], want["index1"])
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
    assert all(math.isfinite(a[s]) and abs(a[s] - b[s]) < 1e-5 for s in a), (a, b)
    la, lb = (torch.load(d / "last.pt", weights_only=True) for d in (straight, resumed))
    ea, eb = la["extra"], lb["extra"]
    assert la["method"] == "all4one" and ea["queue_ptr"] == eb["queue_ptr"] == 6 * 16 % 64
    assert torch.allclose(ea["queue"], eb["queue"], atol=1e-5) and torch.equal(ea["queue_labels"], eb["queue_labels"])
    assert ea["queue"].shape == (64, 16) and torch.allclose(ea["queue"].norm(dim=1), torch.ones(64), atol=1e-5)
    assert ((ea["queue_labels"] >= 0) & (ea["queue_labels"] < 10)).all()  # 96 embeddings went in: all rows real
    assert any(k.startswith("transformer.") for k in la["model"])
    assert all(torch.allclose(la["target"][k].float(), lb["target"][k].float(), atol=1e-5) for k in la["target"])
    lines = read_metrics(straight)
    steps = [m for m in lines if m["type"] == "step"]
    # step 1 meets only random rows labelled -1: no neighbour can share the label
    assert steps[0]["nn_acc"] == 0.0 and all(0.0 <= m["nn_acc"] <= 1.0 for m in lines)
    assert steps[0]["tau"] == pytest.approx(0.99) and all("nn_acc" in m for m in lines)
    assert (straight / "backbone.pt").exists()
