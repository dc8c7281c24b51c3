"""W-MSE: Whitening for Self-Supervised Representation Learning (Ermolov et al., ICML 2021).

Idea: instead of negatives, whiten the embeddings of each view (decorrelate them and scale them to
unit variance over a sub-batch) and only then pull positives together. A whitened batch cannot
collapse: its covariance is the identity by construction, so the points are spread over a sphere,
and the MSE between whitened views is free of the trivial solution.

Whitening, for a chunk of S rows of one view's z (S > D): Cov = (z - mean)^T (z - mean) / (S - 1) =
L L^T (Cholesky) and w = L^{-1} (z - mean), so that Cov(w) = I. Each iteration draws a random
partition of the batch into chunks of --whitening-size (the same rows for every view); the loss
averages over iterations and over the V(V-1)/2 pairs of views a < b:
    L = mean_{iterations, pairs (a, b)} [ 2 - 2 * mean_i cos(w_a,i, sg(w_b,i)) ]
The stop-gradient on the second view of each pair is solo-learn's default (`simplified=True`); the
official code's symmetric form, 2 - 2 * mean_i cos(w_a,i, w_b,i) with gradients into both views, is
--symmetric-loss (the same value, other gradients). Under DDP each process whitens its own batch, as
the official code (single GPU) and solo-learn do. The whitening runs in float64 (solo-learn: float32;
see whiten). A chunk covariance that is not positive definite makes the loss NaN, with no host sync
in the step: the run stops at the next --log-every step (or the epoch's end) naming the fix.

    python wmse.py --dataset synthetic                           # offline CPU demo, minutes
    python wmse.py --dataset cifar10                             # solo-learn CIFAR recipe
    torchrun --nproc_per_node=4 wmse.py --dataset imagenet100 --data-dir /data/imagenet100
"""
import argparse
import os

import torch
import torch.nn as nn
import torch.nn.functional as F

from common import checkpoint, cli, optim
from common.backbones import build_backbone
from common.cli import NonFiniteLoss
from common.data import mix_seed
from common.run import Run, build_data, epoch_summary, evaluate, finish, optimizer_step, prepare_model, probe_loss

# ---- hyperparameters: one recipe per dataset family; any command-line flag overrides it ----
RECIPES = {
    "cifar": dict(backbone="resnet18", epochs=1000, batch_size=256, optimizer="adam", lr=2e-3, weight_decay=1e-6,
                  warmup_epochs=10, warmup_start_lr=0.0, probe_lr=3e-3, preset="wmse", crop_size=32,
                  proj_hidden_dim=1024, proj_output_dim=64, whitening_size=128, whitening_iters=1,
                  whitening_eps=0.0),
    "imagenet": dict(backbone="resnet18", epochs=400, batch_size=256, optimizer="adam", lr=2e-3, weight_decay=1e-6,
                     warmup_epochs=10, warmup_start_lr=0.0, probe_lr=3e-3, preset="wmse", crop_size=224,
                     proj_hidden_dim=1024, proj_output_dim=64, whitening_size=128, whitening_iters=1,
                     whitening_eps=0.0),
    # synthetic: the CPU recipe all methods share (docs/synthetic.md): 16px crops of at least
    # 30% of the image, AdamW.
    "synthetic": dict(backbone="resnet_narrow", epochs=20, batch_size=256, optimizer="adamw", lr=2e-3,
                      weight_decay=0.05, warmup_epochs=1, warmup_start_lr=0.0, probe_lr=2e-3, preset="wmse",
                      crop_size=16, min_scale=0.3, proj_hidden_dim=512, proj_output_dim=32, whitening_size=64,
                      whitening_iters=1, whitening_eps=0.0, data_backend="device", workers=2,
                      symmetric_loss=True),  # the form its kNN was measured with (docs/synthetic.md)
}


def parse_args(argv=None):
    p, add = cli.parser("wmse", __doc__, RECIPES)
    add("--proj-hidden-dim", cli.positive_int, "projector hidden width")
    add("--proj-output-dim", cli.positive_int, "projector output width D (the whitened dimension)")
    add("--whitening-size", cli.int_at_least(2), "rows per whitened chunk; divides the per-process batch")
    add("--whitening-iters", cli.positive_int, "random chunk partitions per step (losses averaged)")
    add("--whitening-eps", cli.probability, "shrinks the covariance towards I: (1 - eps) Cov + eps I, eps in [0, 1]")
    add("--symmetric-loss", help="the official code's loss, gradients into both views of a pair (default: "
        "solo-learn's, the second view of each pair detached) [default: off]", action=argparse.BooleanOptionalAction)
    args = cli.resolve(p, argv, "wmse", RECIPES)
    args.symmetric_loss = bool(args.symmetric_loss)  # solo-learn's detached form unless asked for
    if args.num_large_crops < 2 or args.num_small_crops:
        raise cli.UsageError("wmse trains on large crops only: use --num-large-crops 2 (or more) --num-small-crops 0")
    if args.batch_size % args.whitening_size:
        raise cli.UsageError(f"--batch-size {args.batch_size} is not divisible by --whitening-size "
                             f"{args.whitening_size}: pick a whitening size that divides the per-process batch")
    if args.whitening_size <= args.proj_output_dim:
        raise cli.UsageError(f"--whitening-size {args.whitening_size} must exceed --proj-output-dim "
                             f"{args.proj_output_dim}, else the chunk covariance is singular")
    return args


# ---- heads ----
def projector(in_dim, hidden_dim, out_dim):
    """Linear-BN-ReLU-Linear."""
    return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True),
                         nn.Linear(hidden_dim, out_dim))


class WMSE(nn.Module):
    """Backbone -> projector, plus the online linear probe on sg(features) of every view (all large crops)."""

    def __init__(self, backbone, feature_dim, hidden_dim, output_dim, num_classes):
        super().__init__()
        self.backbone = backbone
        self.projector = projector(feature_dim, hidden_dim, output_dim)
        self.probe = nn.Linear(feature_dim, max(num_classes, 1))

    def forward(self, views):
        feats = [self.backbone(v) for v in views]
        return [self.projector(f) for f in feats], self.probe(torch.cat(feats).detach())


# ---- loss ----
def whiten(z, eps=0.0):
    """Whiten the rows of z (..., S, D), each leading index a separate set: w = L^{-1} (z - mean) with
    L L^T = (1 - eps) Cov + eps I the Cholesky factorisation of the unbiased covariance over the S rows,
    so that Cov(w) = I (for eps 0). Returned in float32, computed in float64 whatever the autocast:
    Cholesky in half precision fails, and TF32 (which Run enables for float32 matmuls on GPUs, its 10-bit
    mantissa perturbing the covariance) never applies to float64, in the forward or the backward; a few
    D x D matrices per step cost next to nothing. (solo-learn: float32.)
    A set whose covariance is not positive definite (S <= D, duplicated or collinear rows) comes out as
    NaN rows: cholesky_ex reports the failure on the device, so no host sync is needed to pass it on."""
    with torch.autocast(z.device.type, enabled=False):
        z = z.double()
        centred = z - z.mean(-2, keepdim=True)
        cov = centred.mT @ centred / (z.shape[-2] - 1)
        eye = torch.eye(z.shape[-1], dtype=z.dtype, device=z.device)
        factor, info = torch.linalg.cholesky_ex((1 - eps) * cov + eps * eye)  # info > 0: not positive definite
        w = torch.linalg.solve_triangular(factor, centred.mT, upper=False).mT
        return torch.where((info > 0)[..., None, None], torch.nan, w).float()


def wmse_loss(z, whitening_size=128, whitening_iters=1, eps=0.0, symmetric=False):
    """L = mean over whitening_iters partitions and over view pairs a < b of 2 - 2 * mean_i cos(w_a,i, sg(w_b,i)),
    w = whiten(z) within chunks of whitening_size rows, each view separately, the same rows for every view.
    sg (the second view of each pair gets no gradient from it) is solo-learn's default; symmetric=True drops it
    (the official code): the same value, gradients into both views. NaN when a chunk's covariance is not
    positive definite (see whiten).

    z: list of V >= 2 tensors (B, D), row i of each from the same image. The partitions come from
    torch.randperm on z's device and its global generator: seed it to reproduce a loss."""
    b, d = z[0].shape
    if b % whitening_size:
        raise cli.UsageError(f"a batch of {b} rows cannot be cut into whitening chunks of {whitening_size}: "
                             f"pick a --whitening-size that divides the per-process batch")
    total, terms = 0.0, 0
    for _ in range(whitening_iters):
        perm = torch.randperm(b, device=z[0].device)  # drawn on the device: no copy from the host
        w = [whiten(v[perm].view(b // whitening_size, whitening_size, d), eps) for v in z]
        for i in range(len(w)):
            for j in range(i + 1, len(w)):
                target = w[j] if symmetric else w[j].detach()
                total = total + 2 - 2 * F.cosine_similarity(w[i], target, dim=-1).mean()
                terms += 1
    return total / terms


# ---- training ----
def train(args):
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    run = Run(args)
    datasets = build_data(args, run)
    backbone, feature_dim = build_backbone(args.backbone, args.crop_size)
    model = WMSE(backbone, feature_dim, args.proj_hidden_dim, args.proj_output_dim, datasets.num_classes)
    train_model = prepare_model(model, run)
    groups = optim.param_groups(nn.ModuleList([model.backbone, model.projector]), args.weight_decay,
                                exclude_1d=args.optimizer == "lars", lr=run.scale_lr(args.lr))
    groups += optim.param_groups(model.probe, 0.0, lr=run.scale_lr(args.probe_lr))
    optimizer = optim.build_optimizer(args.optimizer, groups, run.scale_lr(args.lr), args.weight_decay,
                                      eta=args.lars_eta, lars_clip=args.lars_clip)

    state = {"model": model, "optimizer": optimizer, "scaler": run.scaler}
    epoch, step = 0, 0
    if path := checkpoint.resume_path(args):
        epoch, step, _ = checkpoint.load(path, "wmse", state)
        run.print(f"resumed from {path} at epoch {epoch}, step {step}")
    steps_per_epoch = datasets.steps_per_epoch
    total_steps, warmup_steps = args.epochs * steps_per_epoch, int(args.warmup_epochs * steps_per_epoch)
    last_pt = os.path.join(args.out_dir, "last.pt")
    save = lambda epoch, step: run.save(last_pt, "wmse", epoch, step, state)
    # Set on the device when the loss is not finite while the embeddings are: the whitening failed (a chunk
    # covariance not positive definite). Read only when the run stops for a non-finite loss, and once at each
    # epoch's end, to say which fix applies.
    whitening_failed = torch.zeros((), dtype=torch.bool, device=run.device)

    def stop_if_whitening_failed():
        (failed,), bad_step, _ = run.read_flags([whitening_failed])  # one sync; a collective under DDP
        if failed > 0:
            mine = bad_step is not None and bad_step[0] >= 0
            where = f"at epoch {bad_step[0]}, step {bad_step[1]}" if mine else "on another rank"
            raise NonFiniteLoss(f"the whitening failed {where}: a chunk covariance was not positive definite; "
                                "last.pt holds the last good state (use a larger --whitening-size, with a "
                                "--batch-size it divides, or --whitening-eps 0.01, or --precision fp32)")

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
                z, logits = train_model(views)
            # chunks a function of (seed, batch, rank) alone: a run resumed mid-epoch draws the same ones
            torch.manual_seed(mix_seed("wmse", args.seed, run.accumulation.batch_number(step), run.rank))
            loss = wmse_loss(z, whitening_size=args.whitening_size, whitening_iters=args.whitening_iters,
                             eps=args.whitening_eps, symmetric=args.symmetric_loss)
            embeddings_finite = torch.stack([torch.isfinite(v.detach()).all() for v in z]).all()
            whitening_failed |= embeddings_finite & ~torch.isfinite(loss.detach())
            stepped = optimizer_step(run, loss + probe_loss(logits, labels), optimizer, epoch, step, args.grad_clip)
            if not stepped:  # --accumulate-steps: this batch's gradients wait for the optimizer step
                continue
            step += 1
            try:
                stop = meter.update(step, loss, len(labels), lr)
            except NonFiniteLoss:  # name the whitening's fix when it is the cause
                stop_if_whitening_failed()
                raise
            if stop:
                break
        stop_if_whitening_failed()  # before saving or evaluating, which would stop with the generic message
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
