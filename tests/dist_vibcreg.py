"""Run under `torchrun --nproc_per_node=2` by tests/test_vibcreg.py: `python dist_vibcreg.py OUT_DIR`.

One VIbCReg step on this rank's half of a fixed global batch: a DDP-wrapped linear layer and IterNorm (which
whitens each process's batch, as in train()) per view, then vibcreg_loss; saves the loss, the DDP-averaged
gradients and IterNorm's running statistics to OUT_DIR/vibcreg-rank{r}.pt. The test runs `step(...)` in one
process on the whole batch with IterNorm applied to each rank's half, and compares.
"""
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402
from vibcreg import IterNorm, vibcreg_loss  # noqa: E402

N, D_IN, D = 8, 6, 4  # global batch, input width, projection width (IterNorm: 2 groups of 2)


def batch(seed):
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))


class Head(nn.Module):
    """Linear then IterNorm, view by view (whitening the two views together would mix them)."""

    def __init__(self):
        super().__init__()
        self.linear, self.norm = nn.Linear(D_IN, D), IterNorm(D, num_groups=2, iters=5)

    def forward(self, x1, x2, halves=1):
        # halves=2: the one-process reference whitens each rank's half on its own, as two processes do
        return [torch.cat([self.norm(self.linear(h)) for h in x.chunk(halves)]) for x in (x1, x2)]


def step(x1, x2, wrap=lambda m: m, halves=1):
    torch.manual_seed(0)  # the same weights on every rank and in the reference
    head = Head()
    net = wrap(head)  # held until backward: DDP averages gradients in hooks of this object
    z1, z2 = net(x1, x2, halves=halves)
    loss = vibcreg_loss(z1, z2, sim_coeff=2.0, std_coeff=3.0, cov_coeff=4.0)
    loss.backward()
    return {"loss": dist.all_reduce_mean(loss.detach()), "grads": [p.grad for p in head.parameters()],
            "z1": dist.gather(z1.detach())}


if __name__ == "__main__":
    out_dir = sys.argv[1]
    dist.setup("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * N // world, (rank + 1) * N // world)
    result = step(batch(1)[mine], batch(2)[mine], wrap=nn.parallel.DistributedDataParallel)
    torch.save(result, os.path.join(out_dir, f"vibcreg-rank{rank}.pt"))
    dist.cleanup()  # a barrier, then the group destroyed
    dist.exit_process()  # without the interpreter's teardown, where gloo threads abort it (common/dist.py)
