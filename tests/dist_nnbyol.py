"""Run under `torchrun --nproc_per_node=2` by tests/test_nnbyol.py: `python dist_nnbyol.py OUT_DIR`.

One NNBYOL training step as nnbyol.train() takes it, on this rank's half of a fixed global batch, with tiny
linear heads (online projector + predictor, momentum projector); saves the loss averaged over ranks, the
DDP-averaged gradients, nn_acc and the support set after the enqueue to OUT_DIR/nnbyol-rank{r}.pt. The test
runs `step(...)` in one process on the whole batch and compares. The support set starts from the same 16
random rows with the pointer at 8, so the global batch of 8 fills the second half and wraps the pointer to 0.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402

N, D_IN, D = 8, 6, 4  # global batch, input width, embedding width
LABELS = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0])


def batch(seed):
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))


def start_queue():
    """16 random unit rows labelled 0, 1, 2, 0, ...: some neighbours share the query's label, some do not."""
    return F.normalize(torch.randn(16, D, generator=torch.Generator().manual_seed(4)), dim=1), torch.arange(16) % 3


def step(x1, x2, labels, wrap=lambda m: m):
    from nnbyol import enqueue, nearest_neighbour, nnbyol_loss
    torch.manual_seed(0)  # the same weights on every rank and in the single-process reference
    online, target = nn.Sequential(nn.Linear(D_IN, D), nn.Linear(D, D)), nn.Linear(D_IN, D)
    queue, queue_labels = start_queue()
    net = wrap(online)  # held until backward: DDP averages gradients in hooks of this object
    p1, p2 = net(torch.cat([x1, x2])).chunk(2)  # one forward over both views, as in train()
    with torch.no_grad():
        z1, z2 = F.normalize(target(x1), dim=1), F.normalize(target(x2), dim=1)
    (nn1, index1), (nn2, _) = nearest_neighbour(z1, queue), nearest_neighbour(z2, queue)
    loss = nnbyol_loss(p1, p2, nn1, nn2)
    loss.backward()
    nn_acc = dist.all_reduce_mean((queue_labels[index1] == labels).float().mean())
    ptr = enqueue(queue, queue_labels, 8, z1, labels)
    return {"loss": dist.all_reduce_mean(loss.detach()), "grads": [p.grad for p in online.parameters()],
            "target_grads": [p.grad for p in target.parameters()], "nn_acc": nn_acc, "queue": queue,
            "queue_labels": queue_labels, "ptr": ptr}


if __name__ == "__main__":
    out_dir = sys.argv[1]
    dist.setup("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * N // world, (rank + 1) * N // world)
    result = step(batch(1)[mine], batch(2)[mine], LABELS[mine], wrap=nn.parallel.DistributedDataParallel)
    torch.save(result, os.path.join(out_dir, f"nnbyol-rank{rank}.pt"))
    dist.cleanup()  # a barrier, then the group destroyed
    dist.exit_process()  # without the interpreter's teardown, where gloo threads abort it (common/dist.py)
