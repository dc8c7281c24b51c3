"""Evaluation helpers shared by the method scripts (online probe, periodic kNN) and eval/.

Everything here works on a frozen backbone: features are computed under `torch.no_grad()` with the
backbone in eval mode, and the backbone's train/eval mode is given back as it was found.

Under torchrun every rank evaluates its `Shard` of a dataset (training's end-of-epoch evaluation):
`probe_validate(..., sharded=True)` sums its counts over ranks, `unshard` gathers rows back into
dataset order, and `knn_predict(..., sharded=True)` searches each rank's shard of the kNN memory and
merges the ranks' top-k, so every rank gets what one process computes on the whole sets.
"""
import math
from contextlib import nullcontext

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from common import dist


class Shard(Dataset):
    """Rank `rank`'s part of `dataset` when `world_size` ranks evaluate it together (world_size 1: all of it).

    The rank holds positions rank, rank + W, rank + 2W, ... of the dataset padded to a multiple of W (as
    DistributedSampler without shuffling), so every rank has ceil(N / W) items: gathers need equal sizes.
    A padding position repeats an item from the start with label -1, so no accuracy count or kNN vote
    includes it; `unshard` drops the padding rows.
    """

    def __init__(self, dataset, rank=0, world_size=1):
        self.dataset, self.size = dataset, len(dataset)
        self.positions = range(rank, math.ceil(self.size / world_size) * world_size, world_size)

    def __len__(self):
        return len(self.positions)

    def __getitem__(self, index):
        position = self.positions[index]
        image, label = self.dataset[position % self.size]
        return image, label if position < self.size else -1


def unshard(rows, total):
    """The inverse of `Shard`: every rank's `rows` (one per shard item, the same count on each rank) gathered
    into dataset order, item i coming from rank i % W, and cut to the `total` items of the dataset."""
    stacked = dist.gather(rows[None])  # (W, items per rank, ...)
    return stacked.transpose(0, 1).reshape(-1, *rows.shape[1:])[:total]


def _correct_counts(logits, labels, topk):
    """Tensor [number correct at each k..., number of labelled rows], on the logits' device (no host sync);
    rows labelled -1 do not count."""
    labelled = labels >= 0
    # top-5 on a 3-class problem means "any class": cap k so topk() does not fail
    max_k = min(max(topk), logits.size(1))
    hits = (logits.topk(max_k, dim=1).indices == labels[:, None]) & labelled[:, None]
    return torch.stack([*(hits[:, :min(k, max_k)].any(dim=1).sum() for k in topk), labelled.sum()])


def _percentages(counts):
    """[100 * correct / labelled for each k] from `_correct_counts`' tensor: one read from the device."""
    *correct, total = counts.tolist()
    return [100.0 * c / max(total, 1) for c in correct]


def accuracy(logits, labels, topk=(1, 5)):
    """Top-k accuracies in percent of `logits` (N, C) against `labels` (N,), ignoring labels -1.

    k larger than C counts as C. With no labelled row every accuracy is 0.
    """
    return _percentages(_correct_counts(logits.detach(), labels.to(logits.device), topk))


def _frozen_forward_context(backbone, channels_last, autocast):
    """Shared setup for feature passes: eval mode now, and the mode to restore afterwards."""
    was_training = backbone.training
    backbone.eval()
    memory_format = torch.channels_last if channels_last else torch.contiguous_format
    return was_training, memory_format, (autocast or nullcontext)


@torch.no_grad()
def extract_features(backbone, loader, device, channels_last=False, autocast=None, on_device=False):
    """Run `backbone` over a loader of (images, labels); returns (float32 features, labels), on the CPU or,
    with `on_device`, left on `device` (for a kNN there; copying each batch back would wait on the device).

    `autocast` is a callable returning a context manager (e.g. `lambda: torch.autocast("cuda",
    torch.bfloat16)`) or None for full precision.
    """
    was_training, memory_format, autocast = _frozen_forward_context(backbone, channels_last, autocast)
    keep_on = device if on_device else "cpu"
    features, labels = [], []
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            with autocast():
                out = backbone(images)
            features.append(out.float().to(keep_on))
            labels.append(torch.as_tensor(targets).to(keep_on, non_blocking=True))
    finally:
        backbone.train(was_training)
    if not features:
        return torch.empty(0, 0, device=keep_on), torch.empty(0, dtype=torch.long, device=keep_on)
    return torch.cat(features), torch.cat(labels).long()


@torch.no_grad()
def knn_predict(train_features, train_labels, query_features, num_classes, k=200, temperature=0.1, chunk=256,
                sharded=False):
    """Class scores (N_query, num_classes) of a weighted cosine kNN (InstDisc, Wu et al. 2018).

    Features are L2-normalized; each query takes its k most similar train features (similarities
    s_i), and each neighbour votes for its class with weight exp(s_i / temperature). Train rows
    labelled -1 do not vote. Queries are processed `chunk` at a time so the (N_query, N_train)
    similarity matrix never exists in full. Runs where `train_features` are (a GPU: a few matrix products).

    sharded: `train_features` is this rank's shard of the memory and the queries are the same on every rank;
    each rank takes the top k of its shard, and the top k of the ranks' candidates are the top k of the whole
    memory, so every rank returns the scores one process would.
    """
    device = train_features.device
    memory, train_labels = train_features.float(), train_labels.to(device).long()  # float(): no copy of float32
    # Cosine similarity as (normalized query . train row) / |train row|: no normalized copy of the memory.
    # Unlabelled rows get similarity -inf: never among the k picked below.
    inverse_norm = 1 / memory.norm(dim=1).clamp(min=1e-12)
    excluded = torch.zeros_like(inverse_norm).masked_fill(train_labels < 0, -math.inf)
    vote_labels = train_labels.clamp(min=0)
    query_features = F.normalize(query_features.float(), dim=1).to(device)
    labelled = (train_labels >= 0).sum()
    k = min(k, int(dist.all_reduce_sum(labelled) if sharded else labelled))  # one read, before the search
    local_k = min(k, memory.size(0))
    scores = torch.zeros(query_features.size(0), num_classes, device=device)
    if k == 0:
        return scores
    for start in range(0, query_features.size(0), chunk):
        similarity = torch.addcmul(excluded, query_features[start:start + chunk] @ memory.T, inverse_norm)
        top_similarity, top_index = similarity.topk(local_k, dim=1)
        top_labels = vote_labels[top_index]
        if sharded and dist.get_world_size() > 1:  # (chunk, W * local_k) candidates -> the top k of them
            top_similarity, top_labels = (dist.gather(t[None]).permute(1, 0, 2).flatten(1)
                                          for t in (top_similarity, top_labels))
            top_similarity, pick = top_similarity.topk(k, dim=1)
            top_labels = top_labels.gather(1, pick)
        weights = (top_similarity / temperature).exp()
        scores[start:start + chunk].scatter_add_(1, top_labels, weights)
    return scores


def knn_accuracy(train_features, train_labels, query_features, query_labels, num_classes,
                 k=200, temperature=0.1, chunk=256, sharded=False):
    """(acc1, acc5) in percent of the weighted kNN of `knn_predict`; query labels -1 are ignored."""
    scores = knn_predict(train_features, train_labels, query_features, num_classes, k, temperature, chunk, sharded)
    acc1, acc5 = accuracy(scores, query_labels.to(scores.device), topk=(1, 5))
    return acc1, acc5


@torch.no_grad()
def probe_validate(backbone, probe, loader, device, channels_last=False, autocast=None, sharded=False):
    """{"acc1", "acc5"} in percent of the linear `probe` on frozen backbone features over `loader`.

    Counts are accumulated batch by batch on the device, so no (N, classes) logits matrix is kept and
    nothing is read back until the end. The probe runs in float32 on float32 features, like the probe's
    training step. sharded: `loader` holds this rank's `Shard`; counts are summed over ranks.
    """
    was_training, memory_format, autocast = _frozen_forward_context(backbone, channels_last, autocast)
    counts = torch.zeros(3, dtype=torch.long, device=device)  # correct at top-1, correct at top-5, labelled
    try:
        for images, targets in loader:
            images = images.to(device, non_blocking=True, memory_format=memory_format)
            with autocast():
                features = backbone(images)
            logits = probe(features.float())
            counts += _correct_counts(logits, torch.as_tensor(targets).to(logits.device, non_blocking=True), (1, 5))
    finally:
        backbone.train(was_training)
    acc1, acc5 = _percentages(dist.all_reduce_sum(counts) if sharded else counts)
    return {"acc1": acc1, "acc5": acc5}


# ---- label-free health of a representation (docs/health.md) ----
def effective_rank(x):
    """RankMe (Garrido et al., ICML 2023) of the rows of `x` (N, D): exp of the entropy of its singular values
    normalised to sum 1. From 1 (rank one: a collapsed representation) to min(N, D) (all singular values equal).
    Uncentred, as in the paper. Float64: the small singular values of a nearly collapsed matrix still count."""
    s = torch.linalg.svdvals(x.double())
    p = s / s.sum().clamp(min=torch.finfo(torch.float64).tiny)
    return math.exp(-torch.xlogy(p, p).sum().item())


def alignment(u, v):
    """Wang & Isola (ICML 2020): mean ||u_i - v_i||^2 of the l2-normalised embeddings of two views of the
    same images; 0 when the views coincide, 4 when they are opposite."""
    u, v = F.normalize(u.double(), dim=1), F.normalize(v.double(), dim=1)
    return (u - v).pow(2).sum(dim=1).mean().item()


def uniformity(u, t=2.0):
    """Wang & Isola: log of the mean over pairs i < j of exp(-t ||u_i - u_j||^2) of the l2-normalised rows;
    0 when every row is the same point (collapse), about -2t for rows spread uniformly on a high-dimensional
    sphere, -4t at the most (two opposite points). Needs at least two rows."""
    u = F.normalize(u.double(), dim=1)
    logits = -t * torch.pdist(u).pow(2)
    return (torch.logsumexp(logits, dim=0) - math.log(logits.numel())).item()


def normalised_std(z):
    """The per-dimension standard deviation of the l2-normalised rows of `z`, averaged over dimensions (population
    std). 0 when every row is the same (BYOL / SimSiam collapse); 1/sqrt(D) for rows spread evenly over the sphere
    (each coordinate of a uniform point on the sphere has variance 1/D)."""
    return F.normalize(z.double(), dim=1).std(dim=0, correction=0).mean().item()


class FixedViews(Dataset):
    """(two augmented views stacked (2, C, H, W), label) of each image of `dataset`, their randomness seeded from
    (seed, index) alone: the same views at every evaluation, on any rank and with any number of workers."""

    def __init__(self, dataset, transform, seed=0):
        self.dataset, self.transform, self.seed = dataset, transform, seed

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, index):
        from common.data import mix_seed, single_threaded  # data imports this module's Shard: imported here
        image, label = self.dataset[index]
        with torch.random.fork_rng(devices=[]), single_threaded():
            torch.default_generator.manual_seed(mix_seed("health", self.seed, int(index)))
            views = self.transform(image)
        return torch.stack(views[:2]), label


def health_sample(size, count, seed):
    """The fixed sample of the health pass: `count` positions out of `size` (all when fewer), seeded, in order."""
    if count >= size:
        return list(range(size))
    return sorted(torch.randperm(size, generator=torch.Generator().manual_seed(seed))[:count].tolist())


@torch.no_grad()
def _features_and_embeddings(backbone, embed, loader, device, channels_last, autocast):
    """(backbone features, embed(features)) in float32 on `device` over a loader of images (N, C, H, W) or view
    pairs (N, 2, C, H, W) (returned as (N, 2, D)). Backbone and head in eval mode, their modes restored."""
    heads = [m for m in (embed,) if isinstance(m, torch.nn.Module)]
    modes = [m.training for m in heads]
    was_training, memory_format, autocast = _frozen_forward_context(backbone, channels_last, autocast)
    for m in heads:
        m.eval()
    features, embeddings = [], []
    try:
        for images, _ in loader:
            shape = images.shape
            images = images.flatten(0, images.dim() - 4).to(device, non_blocking=True, memory_format=memory_format)
            with autocast():
                f = backbone(images)
                z = embed(f) if embed is not None else f
            features.append(f.float().reshape(*shape[:-3], -1))
            embeddings.append(z.float().reshape(*shape[:-3], -1))
    finally:
        backbone.train(was_training)
        for m, mode in zip(heads, modes):
            m.train(mode)
    return torch.cat(features), torch.cat(embeddings)


def health_metrics(backbone, embed, clean, pairs, sizes, device, channels_last=False, autocast=None, sharded=False):
    """The label-free health of a representation (docs/health.md), as a dict of floats:
    effective rank (RankMe) of the backbone features and of the embedding (`embed(features)`, the vectors the
    loss sees; the features themselves when `embed` is None) with their maxima min(N, D); the per-dimension std of
    the l2-normalised embedding and its healthy value 1/sqrt(D); alignment and uniformity of the embeddings of two
    augmented views. `clean`: a loader of (images, labels) (the sample's clean views); `pairs`: of (view pairs,
    labels); sizes: (items of clean, items of pairs). sharded: each loader holds this rank's `Shard`; rows are
    gathered into dataset order, so every rank computes what one process does."""
    ctx = dict(device=device, channels_last=channels_last, autocast=autocast)
    features, embeddings = _features_and_embeddings(backbone, embed, clean, **ctx)
    _, views = _features_and_embeddings(backbone, embed, pairs, **ctx)
    if sharded:
        features, embeddings, views = (unshard(t, n) for t, n in zip((features, embeddings, views), (*sizes, sizes[1])))
    n, d = embeddings.shape
    metrics = {"health_rank_backbone": effective_rank(features), "health_rank_backbone_max": min(features.shape),
               "health_rank_embed": effective_rank(embeddings), "health_rank_embed_max": min(n, d),
               "health_std": normalised_std(embeddings), "health_std_healthy": 1 / math.sqrt(d)}
    if len(views) >= 2:
        u, v = views[:, 0], views[:, 1]
        metrics["health_alignment"] = alignment(u, v)
        metrics["health_uniformity"] = (uniformity(u) + uniformity(v)) / 2
    return metrics


# A collapsing representation (docs/health.md, where these thresholds are measured on synthetic runs). Collapsed:
# the embedding's effective rank under COLLAPSED_RANK of its maximum, or the std of its normalised rows under
# COLLAPSED_STD of 1/sqrt(D). Collapsing: the rank has fallen under DECLINE of the best rank this run measured, and
# it is under PARTIAL_RANK of its maximum while the std is under PARTIAL_STD of 1/sqrt(D) (a network near its
# random init sits that low too, which is why the fall is required).
COLLAPSED_RANK, COLLAPSED_STD = 0.02, 0.05
PARTIAL_RANK, PARTIAL_STD, DECLINE = 0.1, 0.25, 0.25
_CAUSES = {  # the usual causes per family of methods, named in the warning
    ("byol", "nnbyol", "all4one", "mocov3"): "a target momentum too low (--base-tau), a predictor lr too high",
    ("simsiam", "nnsiam"): "a predictor lr that decays or is too high, a missing stop-gradient",
    ("simclr", "nnclr", "supcon", "mocov2plus", "ressl"): "a temperature too high or too low",
    ("swav", "deepclusterv2", "dino"): "temperatures, too few epochs with frozen prototypes, a teacher momentum "
                                      "too low",
    ("barlow_twins", "vicreg", "vibcreg", "wmse"): "the weights of the variance or decorrelation terms",
}


def collapse_warning(metrics, method, best_rank=None):
    """One line when health_metrics' `metrics` show a collapsing embedding (None when healthy): what was seen and
    the likely causes for `method`'s family. best_rank: the highest embedding rank of this run so far, if any."""
    rank, max_rank = metrics["health_rank_embed"], metrics["health_rank_embed_max"]
    std, healthy = metrics["health_std"], metrics["health_std_healthy"]
    one_point = std < COLLAPSED_STD * healthy  # the BYOL / SimSiam collapse; else a spread along few directions
    collapsed = one_point or rank < COLLAPSED_RANK * max_rank
    falling = best_rank is not None and rank < DECLINE * best_rank
    if not (collapsed or falling and rank < PARTIAL_RANK * max_rank and std < PARTIAL_STD * healthy):
        return None
    causes = next((c for names, c in _CAUSES.items() if method in names), "")
    seen = "" if collapsed else f", down from {best_rank:.1f}"
    state = "collapsing" if not collapsed else "collapsed to one point" if one_point else \
        f"collapsed onto about {max(1, round(rank))} direction{'s' if round(rank) > 1 else ''}"
    return (f"the representation is {state} (effective rank {rank:.2f} of at "
            f"most {max_rank}{seen}, std of the normalised embedding {std:.2g}, healthy about {healthy:.2g}): likely "
            f"an lr too high (--lr){', ' + causes if causes else ''} (docs/health.md)")
