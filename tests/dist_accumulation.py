"""Run by tests/test_accumulation.py under `torchrun --nproc_per_node=2`: `python tests/dist_accumulation.py OUT`.

Each rank trains a DDP model (no BatchNorm, a mean loss, float64) with common.run.optimizer_step and
Accumulation(3, 7): 2 epochs of 7 batches, the batches that do not step skipping the all-reduce. Every rank also
trains a plain copy on the union of both ranks' batches, in the same groups of 3, 3 and 1 batches with loss / 3
each (Lightning's): DDP averages the ranks' gradients, so both must end equal up to float64 rounding. Rank r
writes OUT/rank{r}.json: the largest difference, the optimizer steps, and how many batches all-reduced.
"""
import json
import os
import sys
from types import SimpleNamespace

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common.run import Accumulation, optimizer_step  # noqa: E402

dist.init_process_group("gloo")
rank, world = dist.get_rank(), dist.get_world_size()
torch.manual_seed(0)
make = lambda: torch.nn.Sequential(torch.nn.Linear(5, 7), torch.nn.Tanh(), torch.nn.Linear(7, 3)).double()
model, union = make(), make()
union.load_state_dict(model.state_dict())
ddp = torch.nn.parallel.DistributedDataParallel(model)
accumulation = Accumulation(3, 7)
accumulation.watch(ddp)
run = SimpleNamespace(scaler=torch.amp.GradScaler("cpu", enabled=False), watch_finite=lambda *a: None,
                      accumulation=accumulation, args=SimpleNamespace(freeze_backbone_epochs=0))
g = torch.Generator().manual_seed(1)
x = torch.randn(2, 7, world, 4, 5, generator=g, dtype=torch.float64)  # (epoch, batch, rank, rows, features)
y = torch.randn(2, 7, world, 4, 3, generator=g, dtype=torch.float64)
sgd = lambda m: torch.optim.SGD(m.parameters(), lr=0.1, momentum=0.9)
opt, opt_union = sgd(ddp), sgd(union)
step, synced = 0, 0
for epoch in range(2):
    for b in range(7):
        synced += ddp.require_backward_grad_sync  # DDP reads it in the forward below
        step += optimizer_step(run, ((ddp(x[epoch, b, rank]) - y[epoch, b, rank]) ** 2).mean(), opt, epoch, step)
    for group in ([0, 1, 2], [3, 4, 5], [6]):
        opt_union.zero_grad()
        for b in group:
            (((union(x[epoch, b].flatten(0, 1)) - y[epoch, b].flatten(0, 1)) ** 2).mean() / 3).backward()
        opt_union.step()
diff = max((a - b).abs().max().item() for a, b in zip(model.parameters(), union.parameters()))
with open(os.path.join(sys.argv[1], f"rank{rank}.json"), "w") as f:
    json.dump({"diff": diff, "steps": step, "synced": synced}, f)
dist.destroy_process_group()
