"""The end-of-epoch evaluation split over two gloo ranks gives what one process gives on the same backbone and
data (tests/dist_eval.py): probe and kNN accuracy, the validation features in dataset order, the kNN scores, the
health metrics."""
import pytest
import torch

from conftest import run_script, torchrun

TRAIN_IMAGES, VAL_IMAGES = 601, 77  # as in tests/dist_eval.py


def test_split_evaluation_matches_one_process(tmp_path):
    run_script("tests/dist_eval.py", tmp_path / "one")
    torchrun("tests/dist_eval.py", tmp_path / "two")
    single = torch.load(tmp_path / "one" / "eval-rank0.pt")
    ranks = [torch.load(tmp_path / "two" / f"eval-rank{r}.pt") for r in range(2)]

    assert single["shard_sizes"] == (VAL_IMAGES, TRAIN_IMAGES)
    # Each rank evaluated half, rounded up: rank 1's last item is padding.
    assert [r["shard_sizes"] for r in ranks] == [((VAL_IMAGES + 1) // 2, (TRAIN_IMAGES + 1) // 2)] * 2
    accuracies = {"probe_acc1", "probe_acc5", "knn_acc1", "knn_acc5"}
    health = {k for k in single["metrics"] if k.startswith("health_")}
    assert set(single["metrics"]) == accuracies | health and len(health) == 8
    assert [r["health_sizes"] for r in ranks] == [single["health_sizes"]] * 2 == [(301, 301)] * 2
    for r in ranks:  # the health of the gathered sample: the padding row dropped (a duplicate would move the rank
        # by ~1/301), the same views of each image (seeded per image); float32 features from batches split
        # otherwise, through float64 SVDs: equal to ~1e-6 relative
        for key in health:
            assert r["metrics"][key] == pytest.approx(single["metrics"][key], rel=1e-5, abs=1e-7), key
    for accuracy in (single["metrics"][k] for k in accuracies):  # whole images out of 77: the padding counted nowhere
        correct = accuracy * VAL_IMAGES / 100
        assert abs(correct - round(correct)) < 1e-9
    for r in ranks:
        for key in accuracies:  # the same counts on every rank, summed or merged exactly
            assert r["metrics"][key] == single["metrics"][key]
        assert r["still_training"]
        assert r["val_features"].shape == single["val_features"].shape  # padding dropped
        torch.testing.assert_close(r["val_features"], single["val_features"])  # and dataset order restored
        assert torch.equal(r["val_labels"], single["val_labels"])
        torch.testing.assert_close(r["knn_scores"], single["knn_scores"])  # no padding vote, top-k merged
    # Not trivially equal: the kNN scores carry 200 votes per query, spread over several classes.
    assert (single["knn_scores"] > 0).sum(dim=1).float().mean() > 2
