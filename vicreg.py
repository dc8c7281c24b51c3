"""VICReg: Variance-Invariance-Covariance Regularization for Self-Supervised Learning (Bardes et al., ICLR 2022).

Idea: three explicit terms on the projections of two views, no negatives, no predictor, no momentum
encoder. Invariance pulls the two views of an image together (mean squared error); variance keeps the
standard deviation of every feature over the batch above 1, so the embeddings cannot collapse to a
point; covariance pushes the off-diagonal covariances to 0, so the features do not all carry the same
information (dimensional collapse).

Loss, with z1, z2 the (N, D) projections, Var/Cov over the batch (unbiased), eps 1e-4:
    inv(z1, z2) = mean_{n,d} (z1_nd - z2_nd)^2                        (this process's batch)
    v(z)        = mean_d ReLU(1 - sqrt(Var(z_d) + eps))              (all-gathered batch)
    c(z)        = sum_{i != j} Cov(z)_ij^2 / D                        (all-gathered batch)
    L = 25 * inv + 25 * (v(z1) + v(z2)) + 1 * (c(z1) + c(z2))
as solo-learn computes it (solo/losses/vicreg.py): the variance and the covariance terms are both summed
over the two views. The official code (facebookresearch/vicreg) averages the variance terms,
25 * (v(z1) + v(z2)) / 2, half solo-learn's weight on variance: `--variance-form mean`.

    python vicreg.py --dataset synthetic                         # offline CPU demo, minutes
    python vicreg.py --dataset cifar10                           # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 vicreg.py --dataset imagenet100 --data-dir /data/imagenet100
"""
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, dist, optim
from common.backbones import build_backbone
from common.run import (Run, build_data, epoch_summary, evaluate, finish, full_float32, optimizer_step,
                        prepare_model, probe_loss)

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-4,
                  warmup_epochs=10, probe_lr=0.1, preset="vicreg", crop_size=32, proj_hidden_dim=2048,
                  proj_output_dim=2048, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="lars", lr=0.3, weight_decay=1e-4,
                     warmup_epochs=10, probe_lr=0.1, preset="vicreg", crop_size=224, proj_hidden_dim=2048,
                     proj_output_dim=2048, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW.
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, probe_lr=2e-3, preset="vicreg", crop_size=16,
                      min_scale=0.3, proj_hidden_dim=512, proj_output_dim=512, sim_coeff=25.0, std_coeff=25.0,
                      cov_coeff=1.0, data_backend="device", workers=2,
                      variance_form="mean"),  # the form its kNN was measured with (docs/synthetic.md)
}


def parse_args(argv=None):
    p, add = cli.parser("vicreg", __doc__, RECIPES)
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width D")
    add("--sim-coeff", cli.nonneg_float, "weight lambda of the invariance (MSE) term")
    add("--std-coeff", cli.nonneg_float, "weight mu of the variance term")
    add("--cov-coeff", cli.nonneg_float, "weight nu of the covariance term")
    add("--variance-form", None, "sum: the two views' variance terms summed (solo-learn); mean: averaged "
        "(official code) [default: sum]", choices=VARIANCE_FORMS)
    args = cli.resolve(p, argv, "vicreg", RECIPES)
    args.variance_form = args.variance_form or "sum"
    if args.num_large_crops != 2 or args.num_small_crops:
        raise cli.UsageError("vicreg trains on two views: use --num-large-crops 2 --num-small-crops 0")
    return args


# ---- heads ----
def projector(in_dim, hidden_dim, out_dim):
    """Linear-BN-ReLU-Linear-BN-ReLU-Linear (the paper's expander)."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class VICReg(nn.Module):
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
VARIANCE_FORMS = ("sum", "mean")


@full_float32()  # no TF32: the (co)variance entries are small, TF32 keeps ~3 digits
def vicreg_loss(z1, z2, sim_coeff=25.0, std_coeff=25.0, cov_coeff=1.0, eps=1e-4, variance_form="sum"):
    """L = sim_coeff * mean (z1 - z2)^2 + std_coeff * V + cov_coeff * (c(z1) + c(z2)),
    v(z) = mean_d ReLU(1 - sqrt(Var(z_d) + eps)), c(z) = sum_{i != j} Cov(z)_ij^2 / D (unbiased Var, Cov), and
    variance_form "sum" (default, solo-learn): V = v(z1) + v(z2); "mean" (official code): V = (v(z1) + v(z2)) / 2.

    z1, z2: (B, D) projections of this process's images. The invariance term uses them as they are;
    v and c use the batch all-gathered from every rank (gradients flow back through the gather), as
    in the official code and solo-learn."""
    if variance_form not in VARIANCE_FORMS:
        raise ValueError(f"variance_form must be 'sum' or 'mean', got {variance_form!r}")
    z1, z2 = z1.float(), z2.float()
    invariance = F.mse_loss(z1, z2)
    variance, covariance = 0.0, 0.0
    for z in (dist.gather(z1), dist.gather(z2)):
        z = z - z.mean(0)
        variance = variance + F.relu(1 - torch.sqrt(z.var(0) + eps)).mean()
        cov = z.T @ z / (len(z) - 1)
        covariance = covariance + (cov.pow(2).sum() - torch.diagonal(cov).pow(2).sum()) / z.shape[1]
    if variance_form == "mean":
        variance = variance / 2
    return sim_coeff * invariance + std_coeff * variance + cov_coeff * covariance


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = VICReg(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, datasets.num_classes,
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
        epoch, step, _ = checkpoint.load(path, "vicreg", state)
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "vicreg", epoch, step, state)

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
            loss = vicreg_loss(z1, z2, sim_coeff=args.sim_coeff, std_coeff=args.std_coeff, cov_coeff=args.cov_coeff,
                               variance_form=args.variance_form)
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
