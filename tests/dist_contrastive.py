"""Run under `torchrun --nproc_per_node=2` by the tests of mocov2plus, nnclr, supcon and ressl:
`python dist_contrastive.py CHECK OUT_DIR`.

Each check runs one training step of the method, as its train() does, on this rank's half of a fixed
global batch with tiny linear encoders, and saves loss, DDP-averaged gradients and queues to
OUT_DIR/CHECK-rank{r}.pt. The test file runs `step_CHECK(...)` below in one process on the whole batch
and compares. Queues start from the same random rows with the pointer at 8 of 16, so that two
global batches of 8 fill the second half and wrap the pointer to 0.
"""
import os
import sys

import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402

N, D_IN, D = 8, 6, 4  # global batch, input width, embedding width


def batch(seed):
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))


def unit_rows(shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed)), dim=-1)


class ProjectPredict(nn.Module):
    """z = proj(x), p = pred(z): NNCLR's two heads in miniature."""

    def __init__(self):
        super().__init__()
        self.proj, self.pred = nn.Linear(D_IN, D), nn.Linear(D, D)

    def forward(self, x):
        z = self.proj(x)
        return z, self.pred(z)


def models(cls=lambda: nn.Linear(D_IN, D)):
    torch.manual_seed(0)  # the same weights on every rank and in the single-process reference
    return cls(), nn.Linear(D_IN, D)


def step_mocov2plus(x1, x2, wrap=lambda m: m):
    from mocov2plus import enqueue, mocov2plus_loss
    model, momentum = models()
    queue = unit_rows((16, 2, D), seed=3)
    net = wrap(model)  # held until backward: DDP averages gradients in hooks of this object
    q1, q2 = net(torch.cat([x1, x2])).chunk(2)  # one forward over both views, as in train()
    with torch.no_grad():
        k1, k2 = F.normalize(momentum(torch.cat([x1, x2])), dim=1).chunk(2)
    loss = mocov2plus_loss(q1, q2, k1, k2, queue[:, 0], queue[:, 1], temperature=0.5)
    loss.backward()
    ptr = enqueue(queue, 8, torch.stack([k1, k2], dim=1))
    return {"loss": dist.all_reduce_mean(loss.detach()), "grads": [p.grad for p in model.parameters()],
            "queue": queue, "ptr": ptr}


def step_nnclr(x1, x2, labels, wrap=lambda m: m):
    from nnclr import enqueue, nearest_neighbour, neighbour_accuracy, nnclr_loss
    model, _ = models(ProjectPredict)
    queue, queue_labels = unit_rows((16, D), seed=4), torch.arange(16) % 3
    net = wrap(model)
    (z1, p1), (z2, p2) = (out.chunk(2) for out in net(torch.cat([x1, x2])))
    z1, z2 = F.normalize(z1, dim=1), F.normalize(z2, dim=1)
    (nn1, index1), (nn2, _) = nearest_neighbour(z1, queue), nearest_neighbour(z2, queue)
    loss = nnclr_loss(*(dist.gather(x) for x in (nn1, nn2, p1, p2)), temperature=0.5)
    loss.backward()
    nn_acc = dist.all_reduce_mean(neighbour_accuracy(queue_labels[index1], labels))  # the meter's rank average
    ptr = enqueue(queue, queue_labels, 8, z1, labels)
    return {"loss": loss.detach(), "grads": [p.grad for p in model.parameters()], "queue": queue,
            "queue_labels": queue_labels, "ptr": ptr, "nn_acc": nn_acc}


def step_supcon(x1, x2, labels, wrap=lambda m: m):
    from supcon import supcon_loss
    model, _ = models()
    net = wrap(model)
    z = net(torch.cat([x1, x2]))
    z, all_labels = dist.gather(z), dist.gather(labels.repeat(2))
    out, inside = supcon_loss(z, all_labels, 0.5, form="out"), supcon_loss(z, all_labels, 0.5, form="in")
    (out + inside).backward()
    return {"out": out.detach(), "in": inside.detach(), "grads": [p.grad for p in model.parameters()]}


def step_ressl(x1, x2, wrap=lambda m: m):
    from ressl import enqueue, ressl_loss
    model, teacher = models()
    queue = unit_rows((16, D), seed=5)
    net = wrap(model)
    q, _ = net(torch.cat([x1, x2])).chunk(2)  # both views through the online net, the strong one's q in the loss
    with torch.no_grad():
        k = F.normalize(teacher(x2), dim=1)
    loss = ressl_loss(q, k, queue, student_temperature=0.1, teacher_temperature=0.04)
    loss.backward()
    ptr = enqueue(queue, 8, k)
    return {"loss": dist.all_reduce_mean(loss.detach()), "grads": [p.grad for p in model.parameters()],
            "queue": queue, "ptr": ptr}


LABELS = torch.tensor([0, 1, 0, 2, 1, 1, 2, 0])


def inputs(check):
    """The global batch of a check: two views, and labels where the method uses them."""
    return (batch(1), batch(2)) + ((LABELS,) if check in ("nnclr", "supcon") else ())


if __name__ == "__main__":
    check, out_dir = sys.argv[1], sys.argv[2]
    dist.setup("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * N // world, (rank + 1) * N // world)
    result = globals()[f"step_{check}"](*(x[mine] for x in inputs(check)), wrap=nn.parallel.DistributedDataParallel)
    torch.save(result, os.path.join(out_dir, f"{check}-rank{rank}.pt"))
    dist.cleanup()  # a barrier, then the group destroyed
    dist.exit_process()  # without the interpreter's teardown, where gloo threads abort it (common/dist.py)
