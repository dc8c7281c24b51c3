"""Run under `torchrun --nproc_per_node=2` by tests/test_mae.py: `python dist_mae.py OUT_DIR`.

One MAE training step as mae.train() takes it (masked encoder, decoder, mae_loss + probe_loss, DDP's gradient
average) on this rank's half of a fixed global batch and of its mask noise, with a tiny ViT; saves the loss
averaged over ranks and the gradients to OUT_DIR/mae-rank{r}.pt. MAE gathers nothing: each rank's loss is the
mean over its own masked patches, and since every rank masks as many patches, DDP's average of the ranks'
gradients must equal the gradient of the mean over the whole batch, which the test computes in one process.
"""
import os
import sys

import torch
import torch.nn as nn

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from common import dist  # noqa: E402

N, SIZE, PATCH, CLASSES = 4, 8, 4, 3  # global batch, crop side (4 patches of 4px: 1 visible, 3 masked), classes


def tiny_vit(size=SIZE, patch=PATCH, width=16):
    """A one-block timm ViT built like common.backbones' (dynamic size and padding), with MAE's init."""
    from timm.models.vision_transformer import VisionTransformer
    from mae import mae_vit_
    return mae_vit_(VisionTransformer(img_size=size, patch_size=patch, embed_dim=width, depth=1, num_heads=2,
                                      num_classes=0, dynamic_img_size=True, dynamic_img_pad=True))


def batch():
    g = torch.Generator().manual_seed(0)
    images, noise = torch.randn(N, 3, SIZE, SIZE, generator=g), torch.rand(N, (SIZE // PATCH) ** 2, generator=g)
    return images, noise, torch.tensor([0, 2, 1, 1])


def step(images, noise, labels, wrap=lambda m: m):
    from common.run import probe_loss
    from mae import MAE, mae_loss
    torch.manual_seed(0)  # the same weights on every rank and in the single-process reference
    model = MAE(tiny_vit(), 8, 1, 2, CLASSES)
    net = wrap(model)  # held until backward: DDP averages gradients in hooks of this object
    pred, mask, logits = net(images, noise)
    loss = mae_loss(images, pred, mask, model.patch_size)
    (loss + probe_loss(logits, labels)).backward()
    return {"loss": dist.all_reduce_mean(loss.detach()),
            "grads": {name: p.grad for name, p in model.named_parameters() if p.requires_grad}}


if __name__ == "__main__":
    out_dir = sys.argv[1]
    dist.setup("cpu")
    rank, world = dist.get_rank(), dist.get_world_size()
    mine = slice(rank * N // world, (rank + 1) * N // world)
    images, noise, labels = batch()
    result = step(images[mine], noise[mine], labels[mine], wrap=nn.parallel.DistributedDataParallel)
    torch.save(result, os.path.join(out_dir, f"mae-rank{rank}.pt"))
    dist.cleanup()  # a barrier, then the group destroyed
    dist.exit_process()  # without the interpreter's teardown, where gloo threads abort it (common/dist.py)
