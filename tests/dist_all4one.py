"""Run under `torchrun --nproc_per_node=2` by tests/test_all4one.py: `python dist_all4one.py OUT_DIR`.

One All4One training step as all4one.train() takes it, on this rank's half of a fixed global batch: the real
All4One module (its transformer, dropout off) with tiny linear backbone and heads, a linear momentum network, a
support set of 16 random rows with the pointer at 8, so the global batch of 8 fills the second half and wraps
the pointer to 0. Saves the loss averaged over ranks, the DDP-averaged gradients, nn_acc, the neighbours and the
support set after the enqueue to OUT_DIR/all4one-rank{r}.pt. The test runs `step(...)` in one process on the
whole batch and compares: the contrasts run against the all-gathered batch, so they equal the one-process ones;
the redundancy term is each rank's own (solo-learn), so the reference averages it over the two halves.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from all4one import All4One, all4one_loss, enqueue, nearest_neighbours, redundancy  # noqa: E402
from common import dist  # noqa: E402
from common.run import probe_loss  # noqa: E402

N, D_IN, F_DIM, D, K = 8, 6, 5, 8, 3  # global batch, input width, feature width, embedding width, neighbours
LABELS = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0])


def batch(seed):
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))


def start_queue():
    """16 random unit rows labelled 0, 1, 2, 0, ...: some neighbours share the query's label, some do not."""
    return F.normalize(torch.randn(16, D, generator=torch.Generator().manual_seed(4)), dim=1), torch.arange(16) % 3


def models():
    """The same weights on every rank and in the one-process reference; linear heads (BatchNorm would see each
    rank's half only, on CPU ranks without SyncBatchNorm)."""
    torch.manual_seed(0)
    model = All4One(nn.Linear(D_IN, F_DIM), F_DIM, 8, D, 8, num_classes=3, num_neighbours=K, dropout=0.0)
    model.projector, model.predictor, model.predictor2 = nn.Linear(F_DIM, D), nn.Linear(D, D), nn.Linear(D, D)
    return model, nn.Linear(D_IN, D)


def step(x1, x2, labels, wrap=lambda m: m, halves=1):
    model, target = models()
    queue, queue_labels = start_queue()
    net = wrap(model)  # held until backward: DDP averages gradients in hooks of this object
    with torch.no_grad():
        m1, m2 = F.normalize(target(x1), dim=1), F.normalize(target(x2), dim=1)
    (nn1, index1), (nn2, _) = nearest_neighbours(m1, queue, K), nearest_neighbours(m2, queue, K)
    (z1, z2), (p1, p2), (c1, c2), (own1, own2), logits = net([x1, x2], (nn1, nn2))
    parts = (nn1[:, 0], nn2[:, 0], p1, p2, c1, c2, own1, own2, m1, m2, z1, z2)
    if halves == 1:  # as train() calls it
        loss = all4one_loss(*parts)
    else:  # the one-process reference: the contrasts on the whole batch, the redundancy term per half
        loss = all4one_loss(*parts, redundancy_weight=0.0) + 0.5 * sum(
            redundancy(*h) for h in zip(*(x.chunk(halves) for x in (m1, m2, z1, z2)))) / halves
    (loss + probe_loss(logits, labels)).backward()
    nn_acc = dist.all_reduce_mean((queue_labels[index1[:, 0]] == labels).float().mean())
    ptr = enqueue(queue, queue_labels, 8, m1, labels)
    return {"loss": dist.all_reduce_mean(loss.detach()), "grads": {k: p.grad for k, p in model.named_parameters()},
            "target_grads": [p.grad for p in target.parameters()], "nn_acc": nn_acc, "index1": dist.gather(index1),
            "queue": queue, "queue_labels": queue_labels, "ptr": ptr}


if __name__ == "__main__":
    out_dir = sys.argv[1]
    dist.setup("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * N // world, (rank + 1) * N // world)
    result = step(batch(1)[mine], batch(2)[mine], LABELS[mine], wrap=nn.parallel.DistributedDataParallel)
    torch.save(result, os.path.join(out_dir, f"all4one-rank{rank}.pt"))
    dist.cleanup()  # a barrier, then the group destroyed
    dist.exit_process()  # without the interpreter's teardown, where gloo threads abort it (common/dist.py)
