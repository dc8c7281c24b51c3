"""Run under `torchrun --nproc_per_node=2` by the tests: `python dist_worker.py CHECK OUT_DIR`.

Each check runs on every rank and saves what it computed to OUT_DIR/CHECK-rank{r}.pt; the test
compares that with the same computation done in one process on the whole batch.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402


def global_batch(n=8, d=6, seed=0):
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def check_simclr_gather():
    """SimCLR on gathered projections: loss and DDP-averaged gradients, on this rank's half of the batch."""
    from simclr import simclr_loss
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Linear(6, 4)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    x1, x2 = global_batch(seed=1), global_batch(seed=2)
    idx = torch.arange(8)
    local = slice(rank * 8 // world, (rank + 1) * 8 // world)
    z = ddp(torch.cat([x1[local], x2[local]]))
    loss = simclr_loss(dist.gather(z), dist.gather(idx[local].repeat(2)), temperature=0.5)
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad for p in model.parameters()]}


def check_reductions():
    rank = dist.get_rank()
    x = torch.tensor([1.0 + rank, 10.0 * rank])
    return {"sum": dist.all_reduce_sum(x), "mean": dist.all_reduce_mean(x), "gathered": dist.gather(x[None])}


if __name__ == "__main__":
    check, out_dir = sys.argv[1], sys.argv[2]
    dist.setup("cpu")
    result = globals()[f"check_{check}"]()
    torch.save(result, os.path.join(out_dir, f"{check}-rank{dist.get_rank()}.pt"))
    dist.cleanup()  # a barrier, then the group destroyed
    dist.exit_process()  # without the interpreter's teardown, where gloo threads abort it (common/dist.py)
