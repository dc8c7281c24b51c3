"""SimCLR: A Simple Framework for Contrastive Learning of Visual Representations (Chen et al., ICML 2020).

Idea: two random augmentations of the same image should be closer to each other than to every other
image in the batch. A projector maps backbone features to z; the NT-Xent (normalized temperature-scaled
cross-entropy) loss treats the other view of an image as its positive and all remaining 2N-2 views
(gathered from every GPU) as negatives. Multi-crop extends the positives to all views of the image.

Loss, for the set of all views A, P(i) = other views of view i's image, s = cosine similarity:
    L = -1/|A| sum_i 1/|P(i)| sum_{p in P(i)} log( exp(s(z_i, z_p)/T) / sum_{a in A, a != i} exp(s(z_i, z_a)/T) )

    python simclr.py --dataset synthetic                       # offline CPU demo, minutes
    python simclr.py --dataset cifar10                         # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 simclr.py --dataset imagenet100 --data-dir /data/imagenet100
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, dist, optim
from common.backbones import build_backbone
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.4, weight_decay=1e-4,
                  warmup_epochs=10, probe_lr=0.1, preset="symmetric", crop_size=32,
                  temperature=0.2, proj_hidden_dim=2048, proj_output_dim=256),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-4,
                     warmup_epochs=10, probe_lr=0.1, preset="symmetric", crop_size=224,
                     temperature=0.2, proj_hidden_dim=4096, proj_output_dim=512),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW, and the asymmetric preset: the blur of the others erases 16px shapes.
    "synthetic": dict(backbone="resnet_narrow", epochs=25, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="asymmetric", crop_size=16,
                      min_scale=0.3, temperature=0.2, proj_hidden_dim=512, proj_output_dim=128,
                      data_backend="device", workers=2),
}


def parse_args(argv=None):
    p, add = cli.parser("simclr", __doc__, RECIPES)
    add("--temperature", cli.positive_float, "NT-Xent temperature T")
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width (z)")
    return cli.resolve(p, argv, "simclr", RECIPES)


# ---- heads ----
class SimCLR(nn.Module):
    """Backbone -> projector (Linear-ReLU-Linear, no BN) and the online linear probe on sg(features) of every
    large crop."""

    def __init__(self, backbone, feature_dim, hidden_dim, output_dim, num_classes, num_large_crops=2):
        super().__init__()
        self.backbone = backbone
        self.projector = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.ReLU(inplace=True),
                                       nn.Linear(hidden_dim, output_dim))
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))
        self.num_large_crops = num_large_crops

    def forward(self, views):
        """views: list of image batches (one per crop; each through BN separately, as in the paper)."""
        feats = [self.backbone(v) for v in views]
        z = torch.cat([self.projector(f) for f in feats])
        return z, self.probe(torch.cat(feats[:self.num_large_crops]).detach())


# ---- loss ----
def simclr_loss(z, indexes, temperature=0.2):
    """NT-Xent. z: (N, D) projections of all views; indexes: (N,) image id of each row (rows that share an
    id are positives of each other). L = mean_i [ -mean_{p in P(i)} log softmax_{a != i}(cos(z_i, z_a) / T)_p ]."""
    z = F.normalize(z.float(), dim=1)
    logits = z @ z.T / temperature
    self_mask = torch.eye(len(z), dtype=torch.bool, device=z.device)
    positives = (indexes[:, None] == indexes[None, :]) & ~self_mask
    log_prob = logits.masked_fill(self_mask, float("-inf")).log_softmax(dim=1)
    return -(log_prob.masked_fill(~positives, 0).sum(1) / positives.sum(1)).mean()


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = SimCLR(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, datasets.num_classes,
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
        epoch, step, _ = checkpoint.load(path, "simclr", state)
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "simclr", epoch, step, state)

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
            labels, indexes = run.labels_to_device(labels, indexes)
            with run.autocast():
                z, logits = train_model(views)
            # all views of all ranks: each rank computes the same global loss on the gathered batch
            loss = simclr_loss(dist.gather(z), dist.gather(indexes.repeat(len(views))), temperature=args.temperature)
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
