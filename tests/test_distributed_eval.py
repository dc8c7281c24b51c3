"""The end-of-epoch evaluation split over two gloo ranks gives what one process gives on the same backbone and
data (tests/dist_eval.py): probe and kNN accuracy, the validation features in dataset order, the kNN scores."""
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
    assert set(single["metrics"]) == {"probe_acc1", "probe_acc5", "knn_acc1", "knn_acc5"}
    for accuracy in single["metrics"].values():  # whole images out of 77: the padding item counted nowhere
        correct = accuracy * VAL_IMAGES / 100
        assert abs(correct - round(correct)) < 1e-9
    for r in ranks:
        assert r["metrics"] == single["metrics"]  # the same counts on every rank, summed or merged exactly
        assert r["still_training"]
        assert r["val_features"].shape == single["val_features"].shape  # padding dropped
        torch.testing.assert_close(r["val_features"], single["val_features"])  # and dataset order restored
        assert torch.equal(r["val_labels"], single["val_labels"])
        torch.testing.assert_close(r["knn_scores"], single["knn_scores"])  # no padding vote, top-k merged
    # Not trivially equal: the kNN scores carry 200 votes per query, spread over several classes.
    assert (single["knn_scores"] > 0).sum(dim=1).float().mean() > 2
