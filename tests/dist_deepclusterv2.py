"""Run under `torchrun --nproc_per_node=2` by tests/test_deepclusterv2.py: `python dist_deepclusterv2.py CHECK OUT_DIR`.

Each rank writes its slice of a global batch into the memory bank and clusters it as DeepCluster V2 does,
then saves what it got to OUT_DIR/CHECK-rank{r}.pt; the test compares with one process on the whole batch.
"""
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402
from deepclusterv2 import cluster_bank, update_bank  # noqa: E402


def planted_batch(n=24, rows=32, dim=6, seed=0):
    """Both large crops of n images around 3 unit directions (crop 1 with another grouping than crop 0), and
    the n distinct bank rows (of `rows`) they belong to: rows - n rows stay unfilled."""
    g = torch.Generator().manual_seed(seed)
    centers = F.normalize(torch.randn(3, dim, generator=g), dim=1)
    labels = [torch.arange(n) % 3, torch.arange(n) // 8 % 3]
    z = [F.normalize(centers[y] + 0.15 * torch.randn(n, dim, generator=g), dim=1) for y in labels]
    return z, torch.randperm(rows, generator=g)[:n], labels


def clustered(z, indexes, rows=32, num_prototypes=(3, 4)):
    bank, filled = torch.zeros(len(z), rows, z[0].shape[1]), torch.zeros(rows, dtype=torch.bool)
    update_bank(bank, filled, z, indexes)
    centroids, assignments = cluster_bank(bank, filled, list(num_prototypes), iterations=10, seed=0, epoch=1)
    return {"bank": bank, "filled": filled, "centroids": centroids, "assignments": assignments}


def check_cluster():
    rank, world = dist.get_rank(), dist.get_world_size()
    z, indexes, _ = planted_batch()
    mine = lambda x: x.tensor_split(world)[rank]
    return clustered([mine(v) for v in z], mine(indexes))


if __name__ == "__main__":
    check, out_dir = sys.argv[1], sys.argv[2]
    dist.setup("cpu")
    result = globals()[f"check_{check}"]()
    torch.save(result, os.path.join(out_dir, f"{check}-rank{dist.get_rank()}.pt"))
    dist.cleanup()  # a barrier, then the group destroyed
    dist.exit_process()  # without the interpreter's teardown, where gloo threads abort it (common/dist.py)
