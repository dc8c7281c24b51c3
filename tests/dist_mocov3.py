"""Run under `torchrun --nproc_per_node=2` by tests/test_mocov3.py: `python dist_mocov3.py OUT_DIR`.

One MoCo v3 training step as mocov3.train() takes it, on this rank's half of a fixed global batch, with tiny
linear encoders (online and momentum); saves the all-gathered keys, the loss averaged over ranks and the
DDP-averaged gradients to OUT_DIR/mocov3-rank{r}.pt. The test runs `step(...)` in one process on the whole
batch and compares: rank r's queries find their positives at rows r*B.. of the gathered keys only if the
loss offsets its labels by rank.
"""
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402

N, D_IN, D = 8, 6, 4  # global batch, input width, embedding width


def batch(seed):
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))


def step(x1, x2, wrap=lambda m: m):
    from mocov3 import mocov3_loss
    torch.manual_seed(0)  # the same weights on every rank and in the single-process reference
    online, momentum = nn.Linear(D_IN, D), nn.Linear(D_IN, D)
    net = wrap(online)  # held until backward: DDP averages gradients in hooks of this object
    q1, q2 = net(torch.cat([x1, x2])).chunk(2)  # one forward over both views, as in train()
    with torch.no_grad():
        k1, k2 = dist.gather(momentum(x1)), dist.gather(momentum(x2))
    loss = mocov3_loss(q1, q2, k1, k2, temperature=0.5, rank=dist.get_rank())
    loss.backward()
    return {"k1": k1, "k2": k2, "loss": dist.all_reduce_mean(loss.detach()),
            "grads": [p.grad for p in online.parameters()], "momentum_grads": [p.grad for p in momentum.parameters()]}


if __name__ == "__main__":
    out_dir = sys.argv[1]
    dist.setup("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * N // world, (rank + 1) * N // world)
    result = step(batch(1)[mine], batch(2)[mine], wrap=nn.parallel.DistributedDataParallel)
    torch.save(result, os.path.join(out_dir, f"mocov3-rank{rank}.pt"))
    dist.cleanup()  # a barrier, then the group destroyed
    dist.exit_process()  # without the interpreter's teardown, where gloo threads abort it (common/dist.py)
