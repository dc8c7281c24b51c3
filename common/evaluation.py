"""Evaluation helpers shared by the method scripts (online probe, periodic kNN) and eval/.

Everything here works on a frozen backbone: features are computed under `torch.no_grad()` with the
backbone in eval mode, and the backbone's train/eval mode is given back as it was found.
"""
from contextlib import nullcontext

import torch
import torch.nn.functional as F


def _correct_counts(logits, labels, topk):
    """(number correct at each k, number of labelled rows); rows labelled -1 do not count."""
    keep = labels >= 0
    logits, labels = logits[keep], labels[keep]
    if labels.numel() == 0:
        return [0] * len(topk), 0
    # top-5 on a 3-class problem means "any class": cap k so topk() does not fail
    max_k = min(max(topk), logits.size(1))
    predictions = logits.topk(max_k, dim=1).indices
    hits = predictions == labels[:, None]
    return [int(hits[:, :min(k, max_k)].any(dim=1).sum()) for k in topk], labels.numel()


def accuracy(logits, labels, topk=(1, 5)):
    """Top-k accuracies in percent of `logits` (N, C) against `labels` (N,), ignoring labels -1.

    k larger than C counts as C. With no labelled row every accuracy is 0.
    """
    correct, total = _correct_counts(logits.detach(), labels.to(logits.device), topk)
    return [100.0 * c / max(total, 1) for c in correct]


def _frozen_forward_context(backbone, channels_last, autocast):
    """Shared setup for feature passes: eval mode now, and the mode to restore afterwards."""
    was_training = backbone.training
    backbone.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return was_training, memory_format, (autocast or nullcontext)


@torch.no_grad()
def extract_features(backbone, loader, device, channels_last=False, autocast=None):
    """Run `backbone` over a loader of (images, labels); returns (float32 CPU features, CPU labels).

    `autocast` is a callable returning a context manager (e.g. `lambda: torch.autocast("cuda",
    torch.bfloat16)`) or None for full precision.
    """
    was_training, memory_format, autocast = _frozen_forward_context(backbone, channels_last, autocast)
    features, labels = [], []
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            with autocast():
                out = backbone(images)
            features.append(out.float().cpu())
            labels.append(torch.as_tensor(targets).cpu())
    finally:
        backbone.train(was_training)
    if not features:
        return torch.empty(0, 0), torch.empty(0, dtype=torch.long)
    return torch.cat(features), torch.cat(labels).long()


@torch.no_grad()
def knn_predict(train_features, train_labels, query_features, num_classes, k=200, temperature=0.1, chunk=256):
    """Class scores (N_query, num_classes) of a weighted cosine kNN (InstDisc, Wu et al. 2018).

    Features are L2-normalized; each query takes its k most similar train features (similarities
    s_i), and each neighbour votes for its class with weight exp(s_i / temperature). Train rows
    labelled -1 do not vote. Queries are processed `chunk` at a time so the (N_query, N_train)
    similarity matrix never exists in full.
    """
    train_labels = train_labels.to(train_features.device).long()
    keep = train_labels >= 0
    train_features = F.normalize(train_features[keep].float(), dim=1)
    train_labels = train_labels[keep]
    query_features = F.normalize(query_features.float(), dim=1).to(train_features.device)
    k = min(k, train_features.size(0))
    scores = torch.zeros(query_features.size(0), num_classes, device=train_features.device)
    if k == 0:
        return scores
    for start in range(0, query_features.size(0), chunk):
        similarity = query_features[start:start + chunk] @ train_features.T
        top_similarity, top_index = similarity.topk(k, dim=1)
        weights = (top_similarity / temperature).exp()
        scores[start:start + chunk].scatter_add_(1, train_labels[top_index], weights)
    return scores


def knn_accuracy(train_features, train_labels, query_features, query_labels, num_classes,
                 k=200, temperature=0.1, chunk=256):
    """(acc1, acc5) in percent of the weighted kNN of `knn_predict`; query labels -1 are ignored."""
    scores = knn_predict(train_features, train_labels, query_features, num_classes, k, temperature, chunk)
    acc1, acc5 = accuracy(scores, query_labels.to(scores.device), topk=(1, 5))
    return acc1, acc5


@torch.no_grad()
def probe_validate(backbone, probe, loader, device, channels_last=False, autocast=None):
    """{"acc1", "acc5"} in percent of the linear `probe` on frozen backbone features over `loader`.

    Counts are accumulated batch by batch, so no (N, classes) logits matrix is kept. The probe
    runs in float32 on float32 features, like the probe's training step.
    """
    was_training, memory_format, autocast = _frozen_forward_context(backbone, channels_last, autocast)
    correct, total = [0, 0], 0
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            with autocast():
                features = backbone(images)
            logits = probe(features.float())
            batch_correct, batch_total = _correct_counts(logits, torch.as_tensor(targets).to(logits.device), (1, 5))
            correct = [c + b for c, b in zip(correct, batch_correct)]
            total += batch_total
    finally:
        backbone.train(was_training)
    return {"acc1": 100.0 * correct[0] / max(total, 1), "acc5": 100.0 * correct[1] / max(total, 1)}
