"""Run under `torchrun --nproc_per_node=2` by tests/test_dino.py: `python dist_dino.py OUT_DIR`.

Each rank holds half of a global batch (2 large views + 1 small view), computes the DINO loss, its
DDP-averaged gradients and the all-reduced center update, and saves them to OUT_DIR/dino-rank{r}.pt;
the test compares them with one process on the whole batch.
"""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402
from dino import dino_loss, update_center  # noqa: E402

N, D, K = 8, 6, 5


def global_views(seed):
    """3 student inputs (N, D) and 2 teacher outputs (N, K), the same in every process."""
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(N, D, generator=g) for _ in range(3)], [torch.randn(N, K, generator=g) for _ in range(2)]


def compute(model, inputs, teacher, center):
    """The student forward is one call on the concatenated views (DDP allows one forward per backward)."""
    student = model(torch.cat(inputs)).chunk(len(inputs))
    loss = dino_loss(student, teacher, center, student_temp=0.1, teacher_temp=0.05)
    loss.backward()
    return loss.detach(), update_center(center, torch.stack(teacher), momentum=0.9)


if __name__ == "__main__":
    out_dir = sys.argv[1]
    dist.setup("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = torch.nn.Linear(D, K)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    inputs, teacher = global_views(1)
    local = slice(rank * N // world, (rank + 1) * N // world)
    center = torch.linspace(-1, 1, K)
    loss, new_center = compute(ddp, [x[local] for x in inputs], [t[local] for t in teacher], center)
    torch.save({"loss": loss, "center": new_center, "grads": [p.grad for p in model.parameters()]},
               os.path.join(out_dir, f"dino-rank{rank}.pt"))
    dist.cleanup()  # a barrier, then the group destroyed
    dist.exit_process()  # without the interpreter's teardown, where gloo threads abort it (common/dist.py)
