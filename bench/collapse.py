"""Deliberately collapsed runs, to see what the health metrics (docs/health.md) do when a representation collapses:

    python bench/collapse.py simsiam-no-stopgrad --dataset synthetic --epochs 3 --train-subset 2048 \
        --batch-size 64 --lr 0.24 --out-dir runs/simsiam-no-stopgrad
    python byol.py --dataset synthetic --epochs 3 --train-subset 2048 --lr 0.2    # BYOL at 100x its lr: no patch needed

`simsiam-no-stopgrad` runs simsiam.py with its loss replaced by the same loss without the stop-gradient (the
projections z get gradients too), which Chen & He (2021) show collapses; any other flag goes to simsiam.py.
"""
import os
import sys

import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import simsiam  # noqa: E402


def loss_without_stop_gradient(p1, p2, z1, z2):
    """simsiam_loss with z instead of sg(z)."""
    return -(F.cosine_similarity(p1.float(), z2.float(), dim=-1).mean()
             + F.cosine_similarity(p2.float(), z1.float(), dim=-1).mean()) / 2


if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] != "simsiam-no-stopgrad":
        sys.exit(f"usage: python {sys.argv[0]} simsiam-no-stopgrad [simsiam.py flags]")
    simsiam.simsiam_loss = loss_without_stop_gradient  # train() looks the loss up in the module at call time
    simsiam.main(sys.argv[2:])
