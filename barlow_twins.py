"""Barlow Twins: Self-Supervised Learning via Redundancy Reduction (Zbontar et al., ICML 2021).

Idea: no negatives, no predictor, no momentum encoder. The projections of two views are
batch-normalised and their cross-correlation matrix (features x features, averaged over the batch)
is pushed towards the identity: the diagonal to 1 (each feature agrees across views, so the
representation is invariant to the augmentations) and the off-diagonal to 0 (different features
carry different information, which rules out collapse to a few directions).

Loss, with BN = per-feature (z - mean) / sqrt(var + 1e-5) over the batch of N images (no affine):
    C = BN(z1)^T BN(z2) / N                                                (D x D)
    L = scale * [ sum_i (1 - C_ii)^2 + lambda * sum_{i != j} C_ij^2 ]      (lambda 0.0051, scale 0.1)
Under DDP the batch is the global one: the BN moments and C are sums over samples, all-reduced.

    python barlow_twins.py --dataset synthetic                   # offline CPU demo, minutes
    python barlow_twins.py --dataset cifar10                     # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 barlow_twins.py --dataset imagenet100 --data-dir /data/imagenet100
    torchrun --nproc_per_node=4 barlow_twins.py --dataset imagenet --data-dir /data/imagenet --batch-size 64
"""
import os

import torch
import torch.nn as nn

from common import checkpoint, cli, dist, optim
from common.backbones import build_backbone
from common.run import (Run, build_data, epoch_summary, evaluate, finish, full_float32, optimizer_step,
                        prepare_model, probe_loss)

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-4,
                  warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=32, proj_hidden_dim=2048,
                  proj_output_dim=2048, lamb=0.0051, scale_loss=0.1),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-4,
                     warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=224, proj_hidden_dim=2048,
                     proj_output_dim=2048, lamb=0.0051, scale_loss=0.1),
    # ImageNet-1k, scripts/pretrain/imagenet/barlow.yaml: 64 per GPU on 4 GPUs (256 on one process), LARS eta
    # 0.001 unclipped.
    "imagenet1k": dict(backbone="resnet50", epochs=100, batch_size=256, optimizer="lars", lr=0.8, weight_decay=1.5e-6,
                       lars_eta=0.001, lars_clip=False, warmup_epochs=10, probe_lr=0.1, preset="asymmetric",
                       crop_size=224, proj_hidden_dim=4096, proj_output_dim=4096, lamb=0.0051, scale_loss=0.048),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW.
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="asymmetric", crop_size=16,
                      min_scale=0.3, proj_hidden_dim=512, proj_output_dim=512, lamb=0.0051, scale_loss=0.1,
                      data_backend="device", workers=2),
}


def parse_args(argv=None):
    p, add = cli.parser("barlow_twins", __doc__, RECIPES)
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width D (C is D x D)")
    add("--lamb", cli.nonneg_float, "weight lambda of the off-diagonal (redundancy) term")
    add("--scale-loss", cli.positive_float, "factor on the whole loss")
    args = cli.resolve(p, argv, "barlow_twins", RECIPES)
    if args.num_large_crops != 2 or args.num_small_crops:
        raise cli.UsageError("barlow_twins trains on two views: use --num-large-crops 2 --num-small-crops 0")
    return args


# ---- heads ----
def projector(in_dim, hidden_dim, out_dim):
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear (the paper's 3-layer projector)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class BarlowTwins(nn.Module):
    """Backbone -> projector, plus the online linear probe on sg(features) of every large crop."""

    def __init__(self, backbone, feature_dim, hidden_dim, output_dim, num_classes, num_large_crops=2):
        super().__init__()
        self.backbone = backbone
        self.projector = projector(feature_dim, hidden_dim, output_dim)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))
        self.num_large_crops = num_large_crops

    def forward(self, views):
        feats = [self.backbone(v) for v in views]
        return [self.projector(f) for f in feats], self.probe(torch.cat(feats[:self.num_large_crops]).detach())


# ---- loss ----
@full_float32()  # no TF32: the (co)variance entries are small, TF32 keeps ~3 digits
def barlow_twins_loss(z1, z2, lamb=0.0051, scale_loss=0.1, eps=1e-5):
    """L = scale_loss * [ sum_i (1 - C_ii)^2 + lamb * sum_{i != j} C_ij^2 ],  C = BN(z1)^T BN(z2) / N,
    BN(z) = (z - mean) / sqrt(var + eps) per feature over the batch (biased variance, no affine).

    z1, z2: (B, D) projections of this process's images. Under DDP, N is the global batch: the BN
    moments and C are sums over samples, so each is all-reduced with its gradient (what the official
    code gets from SyncBatchNorm and all_reduce(C) / global batch). Every rank then holds the loss of
    the global batch and DDP's averaged gradients equal one process's on that batch."""
    z = torch.stack([z1, z2]).float()  # (2, B, D): both views' sums travel in one all-reduce
    n = z.shape[1] * dist.get_world_size()
    mean = dist.all_reduce_sum_with_grad(z.sum(1, keepdim=True)) / n
    centred = z - mean
    var = dist.all_reduce_sum_with_grad(centred.pow(2).sum(1, keepdim=True)) / n
    normed = centred / torch.sqrt(var + eps)
    c = dist.all_reduce_sum_with_grad(normed[0].T @ normed[1]) / n
    diag = torch.diagonal(c)
    on_diag = (1 - diag).pow(2).sum()
    off_diag = c.pow(2).sum() - diag.pow(2).sum()
    return scale_loss * (on_diag + lamb * off_diag)


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = BarlowTwins(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, datasets.num_classes,
                        args.num_large_crops)
    train_model = prepare_model(model, run)
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector]), args.weight_decay,
                                exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, _ = checkpoint.load(path, "barlow_twins", state)
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "barlow_twins", epoch, step, state)

    stop = "max_steps" if args.max_steps and step >= args.max_steps else None
    while epoch < args.epochs and stop is None:
        skip = step - epoch * steps_per_epoch  # > 0 when resuming mid-epoch
        datasets.loader.sampler.set_epoch(epoch, skip=skip * args.batch_size * args.accumulate_steps)
        torch.manual_seed(args.seed + 1000003 * epoch + run.rank)  # randomness a function of (seed, epoch, rank)
        model.train()
        bar = run.progress(datasets.loader, epoch)
        meter = run.meter(epoch, bar)  # the loss stays on the device: read only every --log-every steps
        for views, labels, indexes in bar:
            lr = optim.set_lr(optimizer, step, total_steps, warmup_steps, args.warmup_start_lr, args.min_lr)
            views = [run.to_device(v) for v in views]
            labels = run.labels_to_device(labels)
            with run.autocast():
                (z1, z2), logits = train_model(views)
            loss = barlow_twins_loss(z1, z2, lamb=args.lamb, scale_loss=args.scale_loss)
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip)
            if not stepped:  # --accumulate-steps: this batch's gradients wait for the optimizer step
                continue
            step += 1
            if stop := meter.update(step, loss, len(labels), lr):
                break
        finished_epoch = step == (epoch + 1) * steps_per_epoch
        final = stop == "max_steps" or (finished_epoch and epoch + 1 == args.epochs)
        if stop and stop != "max_steps":  # preempted: save and leave (exit status 3), evaluation can wait
            save(epoch, step)
            run.preempted(stop, last_pt, epoch, step)
        metrics = evaluate(run, datasets, model.backbone, model.probe, epoch, final, embed=model.projector)
        epoch_summary(run, meter, step, lr, metrics)
        epoch += finished_epoch
        save(epoch, step)
    finish(run, model.backbone, feature_dim)
    run.close()


def main(argv=None):
    cli.run_main(lambda a: train(parse_args(a)), argv)


if __name__ == "__main__":
    main()
