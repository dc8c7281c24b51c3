"""Run under `torchrun --nproc_per_node=2` by the Barlow Twins, VICReg and W-MSE tests:
`python dist_noncontrastive.py CHECK OUT_DIR`.

Each check feeds this rank's half of a fixed global batch through a DDP-wrapped linear layer into the
method's loss, backpropagates, and saves the loss and the (DDP-averaged) gradients to
OUT_DIR/CHECK-rank{r}.pt; the test compares them with one process on the whole batch.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402

N, D_IN = 8, 6


def global_batch(seed):
    return torch.randn(N, D_IN, generator=torch.Generator().manual_seed(seed))


def model_and_views(out_dim):
    """The same linear layer as the test builds (seed 0) wrapped in DDP, and this rank's rows of both
    views. The wrapper is returned so that it lives through backward: its hooks average the gradients."""
    torch.manual_seed(0)
    model = torch.nn.Linear(D_IN, out_dim)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    rank, world = dist.get_rank(), dist.get_world_size()
    local = slice(rank * N // world, (rank + 1) * N // world)
    z1, z2 = ddp(torch.cat([global_batch(1)[local], global_batch(2)[local]])).chunk(2)  # one DDP forward per step
    return ddp, z1, z2


def result(ddp, loss):
    loss.backward()
    return {"loss": loss.detach(), "grads": [p.grad for p in ddp.module.parameters()]}


def check_barlow_twins():
    from barlow_twins import barlow_twins_loss
    ddp, z1, z2 = model_and_views(5)
    return result(ddp, barlow_twins_loss(z1, z2, lamb=0.3, scale_loss=0.5))


def check_vicreg():
    from vicreg import vicreg_loss
    ddp, z1, z2 = model_and_views(5)
    return result(ddp, vicreg_loss(z1, z2, sim_coeff=2.0, std_coeff=3.0, cov_coeff=4.0))


def check_wmse():
    from wmse import wmse_loss
    ddp, z1, z2 = model_and_views(3)
    # one chunk per rank (4 rows): the partition cannot change the loss, so no seed is needed
    return result(ddp, wmse_loss([z1, z2], whitening_size=4, whitening_iters=2))


if __name__ == "__main__":
    check, out_dir = sys.argv[1], sys.argv[2]
    dist.setup("cpu")
    out = globals()[f"check_{check}"]()
    torch.save(out, os.path.join(out_dir, f"{check}-rank{dist.get_rank()}.pt"))
    dist.cleanup()  # a barrier, then the group destroyed
    dist.exit_process()  # without the interpreter's teardown, where gloo threads abort it (common/dist.py)
