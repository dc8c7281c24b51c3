"""common/evaluation.py on inputs small enough to check by hand."""
import math
from contextlib import nullcontext

import pytest
import torch
import torch.nn as nn

from common.evaluation import Shard, accuracy, extract_features, knn_accuracy, knn_predict, probe_validate, unshard


def test_accuracy_counts_top_k_and_ignores_unlabelled_rows():
    logits = torch.tensor([[0.9, 0.1, 0.0],    # label 0: top-1 hit
                           [0.1, 0.9, 0.0],    # label 2: ranked last, a miss even at top-2
                           [0.0, 0.1, 0.9],    # label -1: not counted
                           [0.5, 0.4, 0.1]])   # label 1: second, so a top-2 hit only
    labels = torch.tensor([0, 2, -1, 1])
    acc1, acc2, acc5 = accuracy(logits, labels, topk=(1, 2, 5))
    assert acc1 == pytest.approx(100 / 3)
    assert acc2 == pytest.approx(200 / 3)
    assert acc5 == pytest.approx(100.0)  # top-5 of 3 classes is top-3: always right


def test_accuracy_without_labelled_rows_is_zero():
    assert accuracy(torch.randn(4, 10), torch.full((4,), -1)) == [0.0, 0.0]


# Unit train vectors at known angles from the query (1, 0): cosine similarities 1, 0, 0.5, -1.
TRAIN = torch.tensor([[3.0, 0.0],  # length 3: kNN must normalize it, similarity 1
                      [0.0, 1.0],
                      [0.5, math.sqrt(3) / 2],
                      [-1.0, 0.0]])
TRAIN_LABELS = torch.tensor([0, 1, 1, 0])


def test_knn_predict_weights_by_exp_similarity_over_temperature():
    queries = torch.tensor([[1.0, 0.0], [0.0, 2.0]])
    scores = knn_predict(TRAIN, TRAIN_LABELS, queries, num_classes=2, k=2, temperature=0.5)
    # Query (1, 0): neighbours s=1 (class 0) and s=0.5 (class 1) -> weights e^(1/0.5), e^(0.5/0.5).
    # Query (0, 1): neighbours s=1 and s=cos(30 deg) (both class 1).
    expected = torch.tensor([[math.exp(2.0), math.exp(1.0)],
                             [0.0, math.exp(2.0) + math.exp(math.sqrt(3) / 2 / 0.5)]])
    torch.testing.assert_close(scores, expected)


def test_knn_predict_caps_k_ignores_unlabelled_memory_and_chunks_alike():
    query = torch.tensor([[1.0, 0.0]])
    scores = knn_predict(TRAIN, TRAIN_LABELS, query, num_classes=3, k=200, temperature=0.5)
    # k=200 > 4 train points: all of them vote; class 2 has no member.
    expected = torch.tensor([[math.exp(2.0) + math.exp(-2.0), math.exp(0.0) + math.exp(1.0), 0.0]])
    torch.testing.assert_close(scores, expected)
    # A -1 row identical to the query would be its nearest neighbour; it must not vote.
    with_unlabelled = knn_predict(torch.cat([TRAIN, query]), torch.cat([TRAIN_LABELS, torch.tensor([-1])]),
                                  query, num_classes=3, k=200, temperature=0.5)
    torch.testing.assert_close(with_unlabelled, expected)
    queries = torch.randn(37, 2)
    torch.testing.assert_close(knn_predict(TRAIN, TRAIN_LABELS, queries, 2, k=3, chunk=5),
                               knn_predict(TRAIN, TRAIN_LABELS, queries, 2, k=3, chunk=1000))


def test_knn_finds_planted_clusters():
    gen = torch.Generator().manual_seed(0)
    centres = torch.randn(6, 32, generator=gen) * 3

    def sample(per_class):
        labels = torch.arange(6).repeat_interleave(per_class)
        return centres[labels] + torch.randn(len(labels), 32, generator=gen), labels

    train, train_labels = sample(40)
    queries, query_labels = sample(10)
    acc1, acc5 = knn_accuracy(train, train_labels, queries, query_labels, num_classes=6, k=20)
    assert acc1 == 100.0 and acc5 == 100.0


def small_net():
    """BatchNorm makes train and eval mode give different outputs, so the mode used is visible."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.BatchNorm1d(8), nn.ReLU())
    net[2].running_mean.fill_(0.3)  # eval mode must use these running statistics
    net[2].running_var.fill_(2.0)
    return net


def batches(num_images=23, batch_size=7):
    gen = torch.Generator().manual_seed(1)
    images = torch.randn(num_images, 3, 2, 2, generator=gen)
    labels = torch.randint(0, 5, (num_images,), generator=gen)
    labels[::4] = -1
    return [(images[i:i + batch_size], labels[i:i + batch_size]) for i in range(0, num_images, batch_size)]


@pytest.mark.parametrize("training", [True, False])
def test_extract_features_uses_eval_mode_and_restores_the_mode(training):
    net, loader = small_net().train(training), batches()
    calls = []

    def autocast():
        calls.append(1)
        return nullcontext()

    features, labels = extract_features(net, loader, "cpu", autocast=autocast)
    assert net.training is training
    assert len(calls) == len(loader)
    images = torch.cat([x for x, _ in loader])
    with torch.no_grad():
        expected = net.eval()(images)
    assert features.dtype == torch.float32 and features.device.type == "cpu"
    torch.testing.assert_close(features, expected)
    assert torch.equal(labels, torch.cat([y for _, y in loader]))


def test_probe_validate_matches_a_manual_computation():
    net, loader = small_net().train(), batches()
    probe = nn.Linear(8, 5)
    scores = probe_validate(net, probe, loader, "cpu")
    assert net.training  # restored
    images, labels = torch.cat([x for x, _ in loader]), torch.cat([y for _, y in loader])
    with torch.no_grad():
        logits = probe(net.eval()(images))
    manual1, manual5 = accuracy(logits, labels)
    correct1 = sum(int(logits[i].argmax()) == int(labels[i]) for i in range(len(labels)) if labels[i] >= 0)
    assert manual1 == pytest.approx(100 * correct1 / int((labels >= 0).sum()))
    assert scores == pytest.approx({"acc1": manual1, "acc5": manual5})
    assert scores["acc5"] == 100.0  # 5 classes: every labelled row is a top-5 hit


def test_shards_split_like_distributed_sampler_and_label_the_padding_unlabelled():
    items = [(f"image{i}", i % 3) for i in range(10)]
    shards = [Shard(items, rank, world_size=3) for rank in range(3)]
    assert [len(s) for s in shards] == [4, 4, 4]  # ceil(10 / 3) each: gathers need equal sizes
    for i, item in enumerate(items):  # item i on rank i % 3, at index i // 3
        assert shards[i % 3][i // 3] == item
    # 12 places for 10 items: the last two repeat the first two images, labelled -1 (not counted, no kNN vote).
    assert shards[1][3] == ("image0", -1) and shards[2][3] == ("image1", -1)
    whole = Shard(items)  # one process: the dataset as it is
    assert [whole[i] for i in range(len(whole))] == items
    rows = torch.arange(8.0).view(4, 2)
    assert torch.equal(unshard(rows, 3), rows[:3])  # one process: only the cut to the dataset's size
