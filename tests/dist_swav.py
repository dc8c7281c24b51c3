"""Run under `torchrun --nproc_per_node=2` by tests/test_swav.py: `python dist_swav.py CHECK OUT_DIR`.

Each rank takes its slice of a global batch (and of the queue), computes what SwAV computes, and saves
it to OUT_DIR/CHECK-rank{r}.pt; the test compares with one process on the whole batch.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402
import swav  # noqa: E402


def cosine_scores(n, k=5, d=6, seed=0):
    """Scores of n unit features against k unit prototypes, like the model's."""
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(n, d, generator=g), dim=1) @ F.normalize(torch.randn(k, d, generator=g), dim=1).T


def inputs():
    """4 views of 8 images (2 large crops) and a queue of 7 rows per large crop: 7 splits 4 + 3 over the ranks."""
    return [cosine_scores(8, seed=s) for s in range(4)], [cosine_scores(7, seed=10 + s) for s in range(2)]


def check_sinkhorn():
    rank, world = dist.get_rank(), dist.get_world_size()
    views, queues = inputs()
    mine = lambda x: x.tensor_split(world)[rank]
    batch, queue = mine(views[0]), mine(queues[0])
    codes = swav.sinkhorn_knopp(torch.cat([queue, batch]), epsilon=0.1, iterations=3)[-len(batch):]
    loss = swav.swav_loss([mine(v) for v in views], [mine(q) for q in queues], num_large_crops=2, temperature=0.1,
                          epsilon=0.05, sinkhorn_iters=3)
    return {"codes": codes, "loss": loss}


if __name__ == "__main__":
    check, out_dir = sys.argv[1], sys.argv[2]
    dist.setup("cpu")
    result = globals()[f"check_{check}"]()
    torch.save(result, os.path.join(out_dir, f"{check}-rank{dist.get_rank()}.pt"))
    dist.cleanup()  # a barrier, then the group destroyed
    dist.exit_process()  # without the interpreter's teardown, where gloo threads abort it (common/dist.py)
