"""SimSiam: Exploring Simple Siamese Representation Learning (Chen & He, CVPR 2021).

Idea: BYOL without the momentum encoder. One network (backbone + projector) encodes two views; a
small predictor MLP maps one view's projection to the other's, whose projection is treated as a
constant (stop-gradient). The paper shows that the stop-gradient alone is what prevents collapse;
the predictor's learning rate is held fixed (not decayed), which the paper finds works better.

Loss, with p = predictor(z), z = projector(backbone(x)), sg = stop-gradient (no momentum network):
    L = -( mean_i cos(p1_i, sg(z2_i)) + mean_i cos(p2_i, sg(z1_i)) ) / 2        (-1 at best)

    python simsiam.py --dataset synthetic                        # offline CPU demo, minutes
    python simsiam.py --dataset cifar10                          # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 simsiam.py --dataset imagenet100 --data-dir /data/imagenet100
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, optim
from common.backbones import build_backbone
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="sgd", lr=0.5, weight_decay=1e-5,
                  warmup_epochs=10, probe_lr=0.1, preset="symmetric_weak", crop_size=32, proj_hidden_dim=2048,
                  proj_output_dim=2048, pred_hidden_dim=512),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="sgd", lr=0.5, weight_decay=1e-5,
                     warmup_epochs=10, probe_lr=0.1, preset="asymmetric", crop_size=224, proj_hidden_dim=2048,
                     proj_output_dim=2048, pred_hidden_dim=512),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, and the asymmetric preset: the blur of the others erases 16px shapes. Not AdamW:
    # SimSiam reached kNN 25.6% with it, 32.9% with the paper's CIFAR SGD (wd 5e-4) at twice its lr.
    # Each view is colour-inverted with p 0.5: otherwise the features collapse onto the image's dark/light
    # polarity, which both crops share and jitter cannot flip (docs/synthetic.md): 47.9%.
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="sgd", lr=0.06,
                      weight_decay=5e-4, warmup_epochs=1, probe_lr=0.1, preset="asymmetric", crop_size=16,
                      min_scale=0.3, invert_prob=0.5, proj_hidden_dim=512, proj_output_dim=512, pred_hidden_dim=128,
                      data_backend="device", workers=2),
}


def parse_args(argv=None):
    p, add = cli.parser("simsiam", __doc__, RECIPES)
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width (z)")
    add("--pred-hidden-dim", cli.positive_int, "predictor bottleneck width")
    args = cli.resolve(p, argv, "simsiam", RECIPES)
    if args.num_large_crops != 2 or args.num_small_crops:
        raise cli.UsageError("simsiam trains on two views: use --num-large-crops 2 --num-small-crops 0")
    return args


# ---- heads ----
def projector(in_dim, hidden_dim, out_dim):
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear-BN(no affine). Every Linear is followed by a BN that removes
    its bias, so none has one (the official code keeps the last bias but freezes it: the same function)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                         nn.ReLU(inplace=True), nn.Linear(hidden_dim, out_dim, bias=False),
                         nn.BatchNorm1d(out_dim, affine=False))


def predictor(dim, hidden_dim):
    """Linear-BN-ReLU-Linear: a bottleneck (2048-512-2048 in the paper)."""
    return nn.Sequential(nn.Linear(dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, dim))


class SimSiam(nn.Module):
    """Backbone -> projector (z) -> predictor (p), plus the online linear probe on sg(features) of every large
    crop."""

    def __init__(self, backbone, feature_dim, proj_hidden, proj_out, pred_hidden, num_classes, num_large_crops=2):
        super().__init__()
        self.backbone = backbone
        self.projector = projector(feature_dim, proj_hidden, proj_out)
        self.predictor = predictor(proj_out, pred_hidden)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))
        self.num_large_crops = num_large_crops

    def forward(self, views):
        feats = [self.backbone(v) for v in views]
        z = [self.projector(f) for f in feats]
        return [self.predictor(x) for x in z], z, self.probe(torch.cat(feats[:self.num_large_crops]).detach())


def param_groups(model, lr, probe_lr, weight_decay, exclude_1d):
    """Backbone and projector follow the warmup-cosine schedule; the predictor keeps `lr` throughout
    (`fixed_lr`, read by optim.set_lr); the probe has its own lr and no weight decay."""
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector]), weight_decay,
                                exclude_1d=exclude_1d, lr=lr)
    groups += optim.param_groups(model.predictor, weight_decay, exclude_1d=exclude_1d, lr=lr, fixed_lr=True)
    return groups + optim.param_groups(model.probe, 0.0, lr=probe_lr)


# ---- loss ----
def simsiam_loss(p1, p2, z1, z2):
    """L = -( mean_i cos(p1_i, sg(z2_i)) + mean_i cos(p2_i, sg(z1_i)) ) / 2: from 1 (opposite) to -1
    (aligned); the projections z get no gradient through this loss (stop-gradient)."""
    def similarity(p, z):
        return F.cosine_similarity(p.float(), z.detach().float(), dim=-1).mean()
    return -(similarity(p1, z2) + similarity(p2, z1)) / 2


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = SimSiam(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, args.pred_hidden_dim,
                    datasets.num_classes, args.num_large_crops)
    train_model = prepare_model(model, run)
    groups = param_groups(model, run.scale_lr(args.lr), run.scale_lr(args.probe_lr), args.weight_decay,
                          exclude_1d=args.optimizer == "lars")
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, _ = checkpoint.load(path, "simsiam", state)
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "simsiam", epoch, step, state)

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
                (p1, p2), (z1, z2), logits = train_model(views)
            loss = simsiam_loss(p1, p2, z1, z2)
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
